"""Streaming conversion (aim_megatron/checkpoint/streaming.py) gives exactly what the in-memory paths give:
exports from TP=2 and PP=2 (distributed optimizer) checkpoints are bit-identical (safetensors
byte for byte), a streamed import loads into TP=2 and TP=2 x PP=2 as the in-memory import does
and trains identically from a fresh optimizer, the files are read by safetensors, torch.load
and zip tools with the released AIM v1 key set, and a reshard links the files unchanged."""
import json
import shutil
import zipfile

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from aim_megatron.checkpoint import checkpointer as checkpoint
from aim_megatron.checkpoint import convert, reshard, streaming
from aim_megatron.checkpoint.official import RELEASED_LAYERNORM_EPS, reference_to_megatron
from aim_megatron.config import load_config
from aim_megatron.distributed import parallel
from conftest import TINY, run_distributed
from test_convert import official_state_dict
from test_training import BASE, losses, pretrain

pytestmark = pytest.mark.usefixtures("one_thread")


def released_trunk_shapes(d: int, depth: int, patch: int, channels: int) -> dict:
    """The released AIM v1 trunk keys and shapes (ml-aim's state dict, FACTS §1)."""
    shapes = {"preprocessor.patchifier.proj.weight": (d, channels, patch, patch),
              "preprocessor.patchifier.proj.bias": (d,), "preprocessor.patchifier.norm.weight": (d,),
              "preprocessor.patchifier.norm.bias": (d,), "trunk.post_trunk_norm.weight": (d,),
              "trunk.post_trunk_norm.bias": (d,)}
    for i in range(depth):
        b = f"trunk.blocks.{i}."
        shapes.update({b + "norm_1.weight": (d,), b + "norm_1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                       b + "attn.proj.weight": (d, d), b + "norm_2.weight": (d,), b + "norm_2.bias": (d,),
                       b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc2.weight": (d, 4 * d)})
    return shapes


def assert_identical(a: dict, b: dict):
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def in_memory_full_weights(step) -> dict:
    cfg = checkpoint.config_from_checkpoint(step, convert.SINGLE_PROCESS)
    try:
        parallel.initialize(cfg)
        model = parallel.build_model(cfg, wrap_ddp=False)
        checkpoint.load(step, cfg, model)
        return parallel.gather_full_state_dict(model)
    finally:
        parallel.shutdown()


@pytest.mark.parametrize("layout,nproc", [(["parallel.tp=2"], 2),
                                          (["parallel.pp=2", "parallel.use_distributed_optimizer=true"], 2)])
def test_streamed_export_equals_in_memory_export(tmp_path, layout, nproc):
    pretrain(tmp_path / "run", ["train.train_iters=1", *layout], nproc=nproc)
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    try:
        old = convert.export_official(step)
    finally:
        parallel.shutdown()
    for suffix in (".safetensors", ".pth"):
        checkpoint.write_state_dict(old, tmp_path / f"old{suffix}")
        convert.export_streamed(step, tmp_path / f"new{suffix}")
    assert (tmp_path / "new.safetensors").read_bytes() == (tmp_path / "old.safetensors").read_bytes()
    assert_identical(torch.load(tmp_path / "old.pth"), torch.load(tmp_path / "new.pth", mmap=True))
    assert zipfile.ZipFile(tmp_path / "new.pth").testzip() is None  # CRCs of the filled records
    m = load_config(None, BASE).model
    assert {k: tuple(v.shape) for k, v in load_file(tmp_path / "new.safetensors").items()} == \
        released_trunk_shapes(m.hidden_size, m.num_layers, m.patch_size, m.in_channels)

    # reshard_checkpoint export: megatron names with the head = the gathered full model.
    full = in_memory_full_weights(step)
    assert reshard.main(["export", "--src", str(step), "--out", str(tmp_path / "m.safetensors"),
                         "--names", "megatron", "--with-head"]) == 0
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        assert f.metadata() == {"model": "None", "names": "megatron"}
        assert sorted(f.keys()) == sorted(full)
        for k in full:
            assert torch.equal(f.get_tensor(k), full[k]), k

    # reshard: the same files (hard links), the new layout's config, the source untouched.
    before = {p.name: p.read_bytes() for p in step.iterdir()}
    assert reshard.main(["reshard", "--src", str(step), "--dst", str(tmp_path / "b"), "parallel.tp=1",
                         "parallel.pp=1"]) == 0
    new = tmp_path / "b" / "checkpoints" / "step_00000001"
    assert {p.name: p.read_bytes() for p in step.iterdir()} == before
    for p in step.iterdir():
        if p.name != checkpoint.META_FILE:
            assert (new / p.name).stat().st_ino == p.stat().st_ino, p.name
    meta = checkpoint.read_meta(new)
    assert meta["config"]["parallel"]["tp"] == 1 and meta["layout"] == checkpoint.read_meta(step)["layout"]


def in_memory_import(src, dst, overrides):
    cfg = load_config(None, [RELEASED_LAYERNORM_EPS, *overrides, f"train.output_dir={dst}"])
    try:
        return convert.import_official(src, dst, cfg)
    finally:
        parallel.shutdown()


def test_streamed_import_loads_into_layouts_as_the_in_memory_import(tmp_path):
    sd = official_state_dict()
    src = tmp_path / "official.safetensors"
    from safetensors.torch import save_file
    save_file(sd, src)
    assert convert.main(["import", "--src", str(src), "--dst", str(tmp_path / "s"), *TINY]) == 0
    streamed = checkpoint.resolve(tmp_path / "s" / "checkpoints")
    assert checkpoint.read_meta(streamed)["weights_only"]
    old = in_memory_import(src, tmp_path / "o", TINY)

    cfg = load_config(None, [RELEASED_LAYERNORM_EPS, *TINY])
    trunk = {k: v for k, v in sd.items() if not k.startswith("head.")}
    expected = reference_to_megatron({**trunk, **convert.fresh_pretraining_head(cfg.model, cfg.train.seed)},
                                     cfg.model)
    expected = {k: expected[k] for k in sorted(expected)}
    for step, nproc, layout in [(streamed, 4, ["parallel.tp=2", "parallel.pp=2"]), (old, 2, ["parallel.tp=2"])]:
        run_distributed("tests/convert_worker.py", nproc,
                        ["dump", "--src", str(step), "--out", str(tmp_path / "full.pt"), *layout])
        assert_identical(expected, torch.load(tmp_path / "full.pt"))


def test_training_from_streamed_import_matches_in_memory_import(tmp_path):
    """The weights-only import trains with a fresh optimizer and LR schedule, exactly as the
    in-memory import's weights do. (The in-memory import's own step-0 checkpoint does not
    resume: its optimizer has no state yet, "lacks ... exp_avg".) The distributed optimizer
    at DP=2 trains from the same import to 1e-5."""
    src = tmp_path / "official.pth"
    torch.save(official_state_dict(["model.in_channels=1"], with_probe=False), src)
    run = ["train.train_iters=3", "model.layernorm_eps=1e-6"]
    assert convert.main(["import", "--src", str(src), "--dst", str(tmp_path / "s"), *BASE, *run]) == 0
    old = in_memory_import(src, tmp_path / "o", [*BASE, *run])
    meta = checkpoint.read_meta(old)
    (old / checkpoint.META_FILE).write_text(json.dumps({**meta, "weights_only": True}))  # its weights only
    assert "holds weights only" in pretrain(tmp_path / "s", run).stderr
    pretrain(tmp_path / "o", run)
    a, b = losses(tmp_path / "o"), losses(tmp_path / "s")
    assert sorted(a) == [1, 2, 3] and a == b
    (tmp_path / "s" / "metrics.jsonl").unlink()
    shutil.rmtree(tmp_path / "s" / "checkpoints" / "step_00000003")
    (tmp_path / "s" / "checkpoints" / "latest").write_text("step_00000000")
    pretrain(tmp_path / "s", [*run, "parallel.use_distributed_optimizer=true"], nproc=2)
    for step, loss in losses(tmp_path / "s").items():
        assert abs(loss - a[step]) <= 1e-5 * abs(a[step]), (step, loss, a[step])


def test_streaming_writers_round_trip(tmp_path):
    specs = {"b": ((3, 5), torch.bfloat16), "a": ((4,), torch.float32), "n": ((), torch.int64)}
    g = torch.Generator().manual_seed(0)
    tensors = {"b": torch.randn(3, 5, generator=g).bfloat16(), "a": torch.randn(4, generator=g),
               "n": torch.tensor(7)}
    streaming.write_single_file(tmp_path / "x.safetensors", specs, lambda names: {n: tensors[n] for n in names},
                                metadata={"k": "v"})
    from safetensors.torch import save_file
    save_file(tensors, tmp_path / "y.safetensors", metadata={"k": "v"})
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "y.safetensors").read_bytes()
    streaming.write_single_file(tmp_path / "x.pt", specs, lambda names: {n: tensors[n] for n in names})
    assert_identical({k: tensors[k] for k in specs}, torch.load(tmp_path / "x.pt", weights_only=True))
    assert zipfile.ZipFile(tmp_path / "x.pt").testzip() is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt", "x.safetensors", "y.safetensors"]
    with pytest.raises(ValueError, match="expected n"):  # a stream out of order leaves nothing behind
        streaming.write_safetensors(tmp_path / "z.safetensors", specs, iter([("b", tensors["b"])]))
    assert not (tmp_path / "z.safetensors").exists()
