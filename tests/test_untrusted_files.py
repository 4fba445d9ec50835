"""Files a user receives from someone else (issue #27): loading one runs none of the code it carries.

Each hostile file holds a pickle payload whose ``__reduce__`` would ``touch`` a marker file; every
loader either refuses it (one line, exit code 1 through a command) or reads its data without
running the payload, and the marker never appears. Covered: probes (safetensors now, older
probe.pt), training checkpoints (DCP ``.metadata``, ``common.pt``, ``aim_meta.json``), imports
(AIM v1 .pth, ml-l3m .pth and DCP directories), YAML (configs, probe configs, sweep specs, run
configs read back by collect), labelled .npz data; and a scan of every loader in the package."""
import ast
import dataclasses
import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from aim_megatron.checkpoint import checkpointer as checkpoint
from aim_megatron.checkpoint import convert, pickled_files
from aim_megatron.checkpoint import l3m as l3m_format
from aim_megatron.config import ConfigError, load_config
from aim_megatron.distributed import parallel
from aim_megatron.evaluation import labelled_data
from aim_megatron.evaluation import probe as P
from aim_megatron.scaling import cli as sweep_cli
from aim_megatron.scaling import collect
from conftest import ROOT, TINY, one_line
from test_convert import official_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """What a hostile pickle carries: unpickling it runs ``touch marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "the payload ran"




def poison_metadata(step_dir: Path, marker: Path) -> None:
    """A real DCP .metadata with the payload riding along in ``planner_data``."""
    metadata = pickled_files.read_dcp_metadata(step_dir / ".metadata", AssertionError)
    metadata.planner_data = Payload(marker)
    (step_dir / ".metadata").write_bytes(pickle.dumps(metadata))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A weights-only checkpoint (an import of random official weights): .metadata, .distcp,
    common.pt, metadata.json and aim_meta.json, like any checkpoint."""
    root = tmp_path_factory.mktemp("imported")
    torch.save(official_state_dict(with_probe=False), root / "official.pth")
    assert convert.main(["import", "--src", str(root / "official.pth"), "--dst", str(root / "run"), *TINY]) == 0
    return checkpoint.resolve(root / "run" / "checkpoints")


@pytest.fixture
def step_copy(imported, tmp_path):
    return Path(shutil.copytree(imported, tmp_path / imported.name))


def tiny_probe() -> tuple:
    m = load_config(None, TINY).model
    cfg = P.ProbeConfig(layers=[2, 3])
    probe = P.build_probe("attentive", m.hidden_size, m.num_heads, 3, seed=1)
    with torch.no_grad():
        probe.bn.running_mean.normal_()
    return probe, cfg, m


def old_probe_record(probe, cfg, m) -> dict:
    """What save_probe wrote before probes were safetensors (a torch.save'd dict)."""
    return {"format": P.PROBE_FORMAT, "kind": cfg.kind, "layers": [2, 3],
            "probe_config": dataclasses.asdict(cfg), "model": dataclasses.asdict(m), "num_classes": 3,
            "class_names": ["a", "b", "c"], "state_dict": probe.state_dict(), "metrics": {"top1": 0.5}}


# --------------------------------------------------------------------------- the threat is real

def test_the_payload_runs_when_unpickled_freely(tmp_path, imported):
    """The control: plain pickle runs the payload, and so does torch's own DCP reader on a
    poisoned .metadata (megatron-core reads checkpoints through it)."""
    from torch.distributed.checkpoint import FileSystemReader
    ran = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(ran)))
    assert ran.exists()
    ran.unlink()
    step = Path(shutil.copytree(imported, tmp_path / "step"))
    poison_metadata(step, ran)
    FileSystemReader(str(step)).read_metadata()
    assert ran.exists()


# --------------------------------------------------------------------------- probes

def test_probe_files_are_safetensors_with_a_json_record(tmp_path):
    probe, cfg, m = tiny_probe()
    path = tmp_path / "probe.safetensors"
    P.save_probe(path, probe, cfg, [2, 3], m, ["a", "b", "c"], {"top1": 0.5})
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    record = json.loads(header["__metadata__"][P.PROBE_RECORD_KEY])
    assert record["kind"] == "attentive" and record["layers"] == [2, 3] and record["class_names"] == ["a", "b", "c"]
    loaded, rec = P.load_probe(path)
    assert rec["model"] == dataclasses.asdict(m) and rec["probe_config"] == dataclasses.asdict(cfg)
    assert rec["metrics"] == {"top1": 0.5} and rec["num_classes"] == 3
    for key, value in probe.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value) and torch.equal(rec["state_dict"][key], value), key


@pytest.mark.parametrize("first_byte", [0x80, ord("P")])
def test_a_probe_whose_header_length_looks_like_torch_save_loads(tmp_path, first_byte):
    """The header length leads a safetensors file: 0x80 (a pickle's first byte) or "P" (a zip's)
    there must not send the file to torch.load."""
    probe, cfg, m = tiny_probe()
    path = tmp_path / "probe.safetensors"
    for pad in range(300):
        P.save_probe(path, probe, cfg, [2, 3], m, ["x" * pad])
        if path.read_bytes()[0] == first_byte:
            break
    assert path.read_bytes()[0] == first_byte
    assert P.load_probe(path)[1]["class_names"] == ["x" * pad]


@pytest.mark.parametrize("zip_format", [True, False])
def test_old_probe_pt_files_still_load(tmp_path, zip_format):
    probe, cfg, m = tiny_probe()
    path = tmp_path / "probe.pt"
    torch.save(old_probe_record(probe, cfg, m), path, _use_new_zipfile_serialization=zip_format)
    loaded, rec = P.load_probe(path)
    assert rec["layers"] == [2, 3] and rec["metrics"] == {"top1": 0.5}
    for key, value in probe.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def hostile_probe(path: Path, marker: Path, how: str) -> Path:
    probe, cfg, m = tiny_probe()
    record = old_probe_record(probe, cfg, m)
    if how == "record":        # the file: torch.save({"format": Evil()})
        torch.save({"format": Payload(marker)}, path)
    elif how == "state_dict":  # a good-looking probe with one hostile entry
        torch.save({**record, "metrics": {"top1": Payload(marker)}}, path)
    elif how == "legacy":      # the pre-zip torch.save format
        torch.save({**record, "kind": Payload(marker)}, path, _use_new_zipfile_serialization=False)
    else:                      # a bare pickle under the new name
        path.write_bytes(pickle.dumps({**record, "format": Payload(marker)}, protocol=2))
    return path


@pytest.mark.parametrize("how,name", [("record", "evil_probe.pt"), ("state_dict", "probe.pt"),
                                      ("legacy", "probe.pt"), ("bare", "probe.safetensors")])
def test_a_hostile_probe_is_refused(tmp_path, marker, how, name):
    path = hostile_probe(tmp_path / name, marker, how)
    with pytest.raises(ValueError) as err:
        P.load_probe(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "could run code" in message, message
    assert "posix.system" in message, message  # the global it would not build


def test_probe_files_that_are_not_probes_are_refused(tmp_path):
    for name, data in (("junk.safetensors", b"not a probe at all"), ("empty.pt", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match="is not an aim-megatron probe checkpoint"):
            P.load_probe(tmp_path / name)
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))  # safetensors, no record
    with pytest.raises(ValueError, match="is not an aim-megatron probe checkpoint"):
        P.load_probe(tmp_path / "weights.safetensors")


def test_a_hostile_probe_through_aim_convert_export(imported, tmp_path, marker, capsys):
    evil = hostile_probe(tmp_path / "evil_probe.pt", marker, "record")
    out = tmp_path / "x.pth"
    rc = convert.main(["export", "--src", str(imported), "--out", str(out), "--probe", str(evil)])
    one_line(rc, capsys.readouterr().err, "convert_checkpoint:", str(evil), "could run code")
    assert not out.exists()


def test_aim_convert_export_takes_a_safetensors_probe(imported, tmp_path):
    m = checkpoint.config_from_checkpoint(imported).model
    probe = P.build_probe("attentive", m.hidden_size, m.num_heads, 3, seed=2)
    P.save_probe(tmp_path / "probe.safetensors", probe, P.ProbeConfig(), [3], m, ["a", "b", "c"])
    out = tmp_path / "x.safetensors"
    assert convert.main(["export", "--src", str(imported), "--out", str(out),
                         "--probe", str(tmp_path / "probe.safetensors")]) == 0
    from safetensors.torch import load_file
    exported = load_file(str(out))
    for key, value in probe.state_dict().items():
        assert torch.equal(exported["head." + key], value), key


# --------------------------------------------------------------------------- training checkpoints

def test_a_hostile_dcp_metadata_is_refused_by_export(step_copy, tmp_path, marker, capsys):
    poison_metadata(step_copy, marker)
    rc = convert.main(["export", "--src", str(step_copy), "--out", str(tmp_path / "x.pth")])
    one_line(rc, capsys.readouterr().err, str(step_copy / ".metadata"), "posix.system", "refused")


def test_a_hostile_dcp_metadata_is_refused_before_megatron_reads_it(step_copy, marker):
    poison_metadata(step_copy, marker)
    try:
        with pytest.raises(checkpoint.CheckpointError, match="posix.system") as err:
            convert.export_official(step_copy)
    finally:
        parallel.shutdown()
    assert "\n" not in str(err.value)


def test_a_damaged_dcp_metadata_is_still_reported_as_damage(step_copy):
    (step_copy / ".metadata").write_bytes(b"\x80\x04 truncated")
    try:
        with pytest.raises(checkpoint.CheckpointError, match="It may be damaged"):
            convert.export_official(step_copy)
    finally:
        parallel.shutdown()


def test_a_hostile_object_in_a_distcp_file_is_refused(tmp_path, marker):
    """DCP stores a non-tensor entry (megatron's _extra_state) as a torch.save stream in the
    .distcp file and loads it with weights_only=False: the control shows the payload runs there."""
    import torch.distributed.checkpoint as dcp
    ran = tmp_path / "ran"
    control, step = tmp_path / "control", tmp_path / "step"
    dcp.save({"w": torch.ones(2), "layer._extra_state": Payload(ran)}, checkpoint_id=str(control), no_dist=True)
    dcp.load({"w": torch.empty(2), "layer._extra_state": None}, checkpoint_id=str(control), no_dist=True)
    assert ran.exists()
    dcp.save({"w": torch.ones(2), "layer._extra_state": Payload(marker)}, checkpoint_id=str(step), no_dist=True)
    with pytest.raises(checkpoint.CheckpointError, match="could run code") as err:
        pickled_files.check(step, checkpoint.CheckpointError)
    assert "\n" not in str(err.value) and "layer._extra_state" in str(err.value) and "posix.system" in str(err.value)


def test_an_object_entry_torch_cannot_check_is_refused(tmp_path, marker):
    """A protocol-5 pickle (which torch's weights_only reader does not follow) in an object
    entry: DCP would still unpickle it freely, so it is refused too."""
    import torch.distributed.checkpoint as dcp
    step = tmp_path / "step"
    dcp.save({"w": torch.ones(2), "layer._extra_state": 1}, checkpoint_id=str(step), no_dist=True)
    metadata = pickled_files.read_dcp_metadata(step / ".metadata", AssertionError)
    (index, info), = [(i, v) for i, v in metadata.storage_data.items() if i.fqn == "layer._extra_state"]
    payload = pickle.dumps(Payload(marker), protocol=5)
    distcp = step / info.relative_path
    raw = distcp.read_bytes()
    distcp.write_bytes(raw[:info.offset] + payload + raw[info.offset + info.length:])
    metadata.storage_data[index] = dataclasses.replace(info, length=len(payload))
    # Later entries moved with the new length: point them at their new offsets.
    shift = len(payload) - info.length
    for i, v in metadata.storage_data.items():
        if v.relative_path == info.relative_path and v.offset > info.offset:
            metadata.storage_data[i] = dataclasses.replace(v, offset=v.offset + shift)
    (step / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(checkpoint.CheckpointError, match="could run code") as err:
        pickled_files.check(step, checkpoint.CheckpointError)
    assert "\n" not in str(err.value) and "layer._extra_state" in str(err.value)


def test_a_hostile_common_pt_is_refused(step_copy, marker):
    """megatron-core reads common.pt with torch.load's default, weights_only=True (torch >= 2.6)."""
    common = torch.load(step_copy / "common.pt", weights_only=True)
    torch.save({**common, "trainer": Payload(marker)}, step_copy / "common.pt")
    try:
        with pytest.raises(checkpoint.CheckpointError, match="could run code") as err:
            convert.export_official(step_copy)
    finally:
        parallel.shutdown()
    message = str(err.value)
    assert "\n" not in message and "common.pt" in message and "posix.system" in message, message
    assert "weights_only=False" not in message, message  # no advice to run the file


def test_a_hostile_aim_meta_json_is_refused(step_copy, tmp_path, marker, capsys):
    (step_copy / checkpoint.META_FILE).write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(checkpoint.CheckpointError, match="is corrupt"):
        checkpoint.read_meta(step_copy)
    rc = convert.main(["export", "--src", str(step_copy), "--out", str(tmp_path / "x.pth")])
    one_line(rc, capsys.readouterr().err, "is corrupt")


# --------------------------------------------------------------------------- imports

def test_a_hostile_aim_v1_pth_is_refused(tmp_path, marker, capsys):
    src = tmp_path / "aim.pth"
    torch.save({**official_state_dict(), "extra": Payload(marker)}, src)
    rc = convert.main(["import", "--src", str(src), "--dst", str(tmp_path / "run"), *TINY])
    one_line(rc, capsys.readouterr().err, str(src), "holds more than tensors")
    assert not (tmp_path / "run").exists()


def test_a_hostile_ml_l3m_pth_loads_without_running_it(tmp_path, marker):
    sd = {"trunk.blocks.0.norm_1.weight": torch.randn(4)}
    torch.save({"model": sd, "cfg": Payload(marker), "iteration": 3}, tmp_path / "checkpoint_3.pth")
    read = l3m_format.read(tmp_path / "checkpoint_3.pth")
    key = "trunk.blocks.0.norm_1.weight"
    assert list(read) == [key] and torch.equal(read[key], sd[key])


def test_a_hostile_ml_l3m_dcp_directory_is_refused(tmp_path, marker, capsys):
    import torch.distributed.checkpoint as dcp
    ckpt = tmp_path / "checkpoint_3"
    dcp.save({"model": {"trunk.post_trunk_norm.weight": torch.ones(32)}}, checkpoint_id=str(ckpt), no_dist=True)
    assert set(l3m_format._read_dcp(ckpt)) == {"trunk.post_trunk_norm.weight"}  # the clean one reads
    poison_metadata(ckpt, marker)
    rc = convert.main(["import", "--format", "l3m", "--src", str(ckpt), "--dst", str(tmp_path / "run"), *TINY])
    one_line(rc, capsys.readouterr().err, str(ckpt / ".metadata"), "posix.system")


# --------------------------------------------------------------------------- YAML, JSON, arrays

def hostile_yaml(marker: Path) -> str:
    return f'!!python/object/apply:os.system ["touch {marker}"]\n'


def test_hostile_yaml_is_refused_everywhere(tmp_path, marker, capsys):
    evil = tmp_path / "evil.yaml"
    evil.write_text(hostile_yaml(marker))
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(evil)
    with pytest.raises(ConfigError, match="is not valid YAML"):
        P.load_probe_config(evil)
    rc = convert.main(["import", "--src", str(tmp_path / "aim.pth"), "--dst", str(tmp_path / "run"),
                       "--config", str(evil)])
    one_line(rc, capsys.readouterr().err)
    rc = sweep_cli.main(["plan", str(evil), "--out", str(tmp_path / "sweep")])
    one_line(rc, capsys.readouterr().err)
    # A run's config.yaml, as collect reads it back from a sweep directory: unreadable, not run.
    run = tmp_path / "sweep_run"
    run.mkdir()
    (run / "config.yaml").write_text(f"data: {hostile_yaml(marker)}")
    assert collect.expects_validation(run) is None
    # A nested tag in an otherwise valid config, and one in an override.
    (tmp_path / "nested.yaml").write_text(f"train:\n  seed: {hostile_yaml(marker)}")
    with pytest.raises(ConfigError):
        load_config(tmp_path / "nested.yaml")
    with pytest.raises(ConfigError):
        load_config(None, [f"train.seed={hostile_yaml(marker).strip()}"])


def test_npz_with_pickled_objects_is_refused(tmp_path, marker):
    objects = np.array([Payload(marker)], dtype=object)
    np.savez(tmp_path / "data.npz", train_images=objects, train_labels=np.zeros(1, dtype=np.int64))
    with pytest.raises(ValueError, match="allow_pickle"):
        labelled_data.open_labelled(str(tmp_path / "data.npz"), "train", None)


# --------------------------------------------------------------------------- every loader

ALLOWED_UNPICKLERS = {"aim_megatron/checkpoint/l3m.py", "aim_megatron/checkpoint/pickled_files.py"}


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = (f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                    else f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
            yield name, {k.arg: k.value for k in node.keywords}, node


def test_every_loader_in_the_package_runs_no_pickled_code():
    """A new loader cannot slip in unguarded: torch.load only with weights_only=True (or a
    restricted pickle_module), no free pickle, YAML only through safe_load, np.load without pickle,
    DCP only through the checked reader."""
    problems = []
    files = sorted([*ROOT.glob("aim_megatron/**/*.py"), *ROOT.glob("tools/**/*.py")])
    assert len(files) > 40
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        for name, kw, node in _calls(ast.parse(path.read_text(), rel)):
            where = f"{rel}:{node.lineno} {name}"
            true = lambda key: isinstance(kw.get(key), ast.Constant) and kw[key].value is True
            false = lambda key: isinstance(kw.get(key), ast.Constant) and kw[key].value is False
            if name == "torch.load" and not true("weights_only") and "pickle_module" not in kw:
                problems.append(f"{where}: without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "Unpickler") and rel not in ALLOWED_UNPICKLERS:
                problems.append(f"{where}: free unpickling")
            if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
                problems.append(f"{where}: not yaml.safe_load")
            if name == "np.load" and not false("allow_pickle"):
                problems.append(f"{where}: without allow_pickle=False")
            if name.rsplit(".", 1)[-1] == "FileSystemReader" and rel not in ALLOWED_UNPICKLERS:
                problems.append(f"{where}: DCP .metadata unpickled freely (use pickled_files)")
    assert not problems, "\n".join(problems)


def test_the_dcp_allow_list_reads_what_torch_writes(tmp_path):
    """Every kind of entry a checkpoint holds (tensors of several dtypes, bytes, nested
    state) passes the allow-list, and comes back as torch's own reader gives it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    state = {"a": torch.randn(3, 4), "b": torch.zeros(2, dtype=torch.bfloat16), "n": torch.tensor(7),
             "extra": {"step": 5, "name": "x", "ids": [1, 2]}, "rng": torch.get_rng_state()}
    dcp.save(state, checkpoint_id=str(tmp_path / "d"), no_dist=True)
    ours = pickled_files.CheckedFileSystemReader(tmp_path / "d", AssertionError).read_metadata()
    theirs = FileSystemReader(str(tmp_path / "d")).read_metadata()
    assert ours.state_dict_metadata == theirs.state_dict_metadata
    loaded = {"a": torch.empty(3, 4), "b": torch.empty(2, dtype=torch.bfloat16), "n": torch.tensor(0),
              "extra": {"step": 0, "name": "", "ids": []}, "rng": torch.empty_like(state["rng"])}
    dcp.load(loaded, storage_reader=pickled_files.CheckedFileSystemReader(tmp_path / "d", AssertionError),
             no_dist=True)
    assert torch.equal(loaded["a"], state["a"]) and loaded["extra"] == state["extra"]
