"""Every kind of bad input a new user can give ends in one line that names the field (or option)
and the fix, exit code 1, no traceback, and nothing written or changed on disk (issue #15).

Most cases call the entry points' main() in this process (the checks run before any process
group or model exists, so that is what a user's process does too); a few real subprocesses,
one under torchrun with two ranks, prove the same end to end."""
import importlib
import os
import re
import signal
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from conftest import ROOT, TINY, one_line

from aim_megatron import config as C

BASE = TINY + ["model.in_channels=1", "train.micro_batch_size=2", "train.global_batch_size=8",
               "train.train_iters=1", "train.tensorboard=false", "train.eval_iters=1"]


# --------------------------------------------------------------------------- helpers

def snapshot(root: Path) -> dict:
    """Every path under root with its size and mtime: 'nothing written or changed'."""
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size if p.is_file() else 0,
                                       p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def call(main, argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:  # argparse errors
        return exc.code


@pytest.fixture
def work(tmp_path):
    """A directory every command of a case writes into, if it writes anything."""
    root = tmp_path / "work"
    root.mkdir()
    return root


def pretrain_in_process(capsys, argv) -> tuple[int, str]:
    from aim_megatron.training.main import main
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        rc = call(main, argv)
    finally:  # the trainer installs its own; pytest's must come back
        for s, h in handlers.items():
            signal.signal(s, h)
    return rc, capsys.readouterr().err


# tools/<name>.py is a thin CLI over the package module that holds its main().
TOOL_MODULES = {
    "convert_checkpoint": "aim_megatron.checkpoint.convert",
    "reshard_checkpoint": "aim_megatron.checkpoint.reshard",
    "make_shards": "aim_megatron.data.make_shards",
    "scaling_sweep": "aim_megatron.scaling.cli",
    "estimate_memory": "aim_megatron.scaling.estimate_memory",
    "slurm_layout": "aim_megatron.scaling.slurm_layout",
    "plot_metrics": "aim_megatron.training.plot_metrics",
    "findings": "aim_megatron.evaluation.findings",
}


def tool(name: str):
    return importlib.import_module(TOOL_MODULES[name]).main


# --------------------------------------------------------------------------- every config field

def _bare(typ):
    if typing.get_origin(typ) is typing.Union:
        return [a for a in typing.get_args(typ) if a is not type(None)][0]
    return typ


# A value of the wrong kind for each type, and what the message says.
WRONG_KIND = {int: ("abc", "expected an integer"), float: ("abc", "expected a number"),
              bool: ("maybe", "expected true/false"), str: ("[1, 2]", "expected a string"),
              list: ("{a: 1}", "expected a list")}

# Out-of-range values: (value, extra overrides, text the message must hold besides the field).
RANGE = {
    "model.preset": ("aim-9B", [], "unknown preset"),
    "model.image_size": ("0", [], ">= 1"),
    "model.patch_size": ("0", [], ">= 1"),
    "model.in_channels": ("0", [], ">= 1"),
    "model.hidden_size": ("-32", [], ">= 1"),
    "model.num_layers": ("0", [], ">= 1"),
    "model.num_heads": ("0", [], "divisor of model.hidden_size"),
    "model.mlp_ratio": ("0", [], "> 0"),
    "model.layernorm_eps": ("0", [], "> 0"),
    "model.head_hidden_size": ("0", [], ">= 1"),
    "model.head_ffn_hidden_size": ("0", [], ">= 1"),
    "model.head_num_layers": ("-1", [], ">= 1"),
    "model.prefix_min": ("-1", [], "model.prefix_max"),
    "model.prefix_max": ("16", [], "within [1, 15]"),
    "model.head_type": ("conv", [], "'mlp' or 'linear'"),
    "model.init_std": ("-0.02", [], "> 0"),
    "model.init_method": ("xavier", [], "'official' or 'megatron'"),
    "model.backend": ("cuda", [], "'auto', 'te' or 'local'"),
    "model.attention_kernel": ("flash", [], "'varlen', 'flex' or 'masked'"),
    "parallel.tp": ("0", [], ">= 1"),
    "parallel.pp": ("-2", [], ">= 1"),
    "parallel.vp": ("0", [], ">= 1"),
    "parallel.trunk_layers_in_last_stage": ("-1", [], ">= 0"),
    "parallel.recompute_granularity": ("partial", [], "null, 'full' or 'selective'"),
    "parallel.recompute_method": ("random", [], "'uniform' or 'block'"),
    "parallel.recompute_num_layers": ("0", [], ">= 1"),
    "train.micro_batch_size": ("0", [], ">= 1"),
    "train.global_batch_size": ("0", [], "multiple of micro_batch_size"),
    "train.train_iters": ("0", [], ">= 1"),
    "train.seed": ("-1", [], ">= 0"),
    "train.lr": ("0", [], "> 0"),
    "train.min_lr": ("1.0", [], "lower train.min_lr"),
    "train.weight_decay": ("-0.1", [], ">= 0"),
    "train.adam_beta1": ("1.0", [], "below 1.0"),
    "train.adam_beta2": ("-0.5", [], ">= 0"),
    "train.adam_eps": ("0", [], "> 0"),
    "train.clip_grad": ("-1", [], "0 turns clipping off"),
    "train.warmup_fraction": ("1.5", [], "within [0, 1]"),
    "train.params_dtype": ("fp16", [], "'fp32', 'bf16' or 'auto'"),
    "train.fp8": ("e5m2", [], "null, 'hybrid' or 'e4m3'"),
    "train.fp8_recipe": ("mxfp8", [], "'delayed' or 'tensorwise'"),
    "train.fp8_amax_history_len": ("0", [], ">= 1"),
    "train.fp8_amax_reduction": ("dp", [], "'tp_dp' or 'tp'"),
    "train.optimizer_checkpoint_format": ("fully_sharded", [], "'fully_reshardable' or 'dp_reshardable'"),
    "train.output_dir": ("''", [], "an empty path"),
    "train.log_interval": ("0", [], ">= 1"),
    "train.eval_interval": ("-1", [], "0 means validate only at the end"),
    "train.eval_iters": ("0", [], ">= 1"),
    "train.save_interval": ("-5", [], "0 means checkpoint only at the end"),
    "train.keep_last": ("-1", [], "0 keeps every checkpoint"),
    "train.max_bad_steps": ("0", [], ">= 1"),
    "train.exit_after_steps": ("-1", [], ">= 0"),
    "train.hang_timeout_s": ("-5", [], "0 turns hang detection off"),
    "train.max_restarts": ("-1", [], "0 means a failure ends the job"),
    "train.lock_timeout_s": ("0", [], "> 0"),
    "train.gpu_mtbf_hours": ("0", [], "> 0"),
    "data.train_sources": ("[]", [], "name shards, a folder or 'synthetic'"),
    "data.train_weights": ("[-1.0]", [], "one positive weight per source"),
    "data.val_sources": ("['']", [], "an empty path"),
    "data.loader": ("pil", [], "'auto', 'dali' or 'torch'"),
    "data.num_workers": ("-1", [], ">= 0"),
    "data.crop_scale_min": ("0", [], "> 0"),
    "data.crop_scale_max": ("1.5", [], "data.crop_scale_min <= data.crop_scale_max <= 1"),
    "data.mean": ("[0.5, 0.5]", ["data.std=[0.5]"], "needs 1 values"),
    "data.std": ("[0.0]", ["data.mean=[0.5]"], "each > 0"),
    "data.dali_device": ("tpu", [], "'auto', 'cpu' or 'gpu'"),
    "data.shuffle_buffer": ("0", [], ">= 1"),
}
# Fields without an out-of-range value, and why (their wrong-kind case still runs).
NO_RANGE = {
    "model.target_norm": "a bool: true and false are both valid",
    "parallel.sequence_parallel": "a bool (true with tp=1 is a layout error, tested in test_config)",
    "parallel.use_distributed_optimizer": "a bool: true and false are both valid",
    "parallel.overlap_grad_reduce": "a bool: true and false are both valid",
    "parallel.overlap_param_gather": "a bool (true without the distributed optimizer is a "
                                     "combination error, tested in test_config)",
    "parallel.batch_p2p_comm": "a bool (true with vp on gloo is refused at start: test_config/training)",
    "train.scale_lr": "a bool: true and false are both valid",
    "train.tensorboard": "a bool: true and false are both valid",
    "train.async_save": "a bool: true and false are both valid",
    "train.fully_parallel_save": "a bool: true and false are both valid",
    "train.fully_parallel_load": "a bool: true and false are both valid",
    "data.hflip": "a bool: true and false are both valid",
    "data.color_jitter": "a bool: true and false are both valid",
    "data.shuffle": "a bool: true and false are both valid",
}


def all_fields() -> dict[str, typing.Any]:
    return {f"{name}.{key}": typ for name, cls in C._SECTIONS.items()
            for key, typ in C._field_types(cls).items()}


def test_the_table_covers_every_config_field():
    fields = set(all_fields())
    assert not set(RANGE) & set(NO_RANGE)
    missing = fields - set(RANGE) - set(NO_RANGE)
    assert not missing, f"add a bad-input case (or a reason to skip) for {sorted(missing)}"
    assert not (set(RANGE) | set(NO_RANGE)) - fields, "the table names fields that no longer exist"


def field_cases():
    for key, typ in all_fields().items():
        bare = _bare(typ)
        kind = WRONG_KIND[typing.get_origin(bare) or bare]
        yield pytest.param(key, kind[0], [], kind[1], id=f"{key}-kind")
        if bare is float:
            yield pytest.param(key, ".nan", [], "finite", id=f"{key}-nan")
        if key in RANGE:
            value, extra, text = RANGE[key]
            yield pytest.param(key, value, extra, text, id=f"{key}-range")


@pytest.mark.parametrize("key,value,extra,text", list(field_cases()))
def test_every_field_rejects_bad_values(key, value, extra, text, work, capsys):
    before = snapshot(work)
    rc, err = pretrain_in_process(capsys, [*BASE, f"train.output_dir={work / 'run'}", *extra,
                                           f"{key}={value}"])
    one_line(rc, err, "aim-pretrain: configuration error:", text, key)
    assert snapshot(work) == before


# --------------------------------------------------------------------------- files and YAML shapes

@pytest.mark.parametrize("content,text", [
    ("train: 5\n", "config section 'train' must be a mapping"),
    ("model:\n  - image_size\n", "config section 'model' must be a mapping"),
    ("data: synthetic\n", "config section 'data' must be a mapping"),
    ("- model\n- train\n", "must hold a mapping of sections"),
    ("42\n", "must hold a mapping of sections"),
    ("model: [1, 2\n", "is not valid YAML (line 2"),
    ("model:\n  num_layers: 4\n num_heads: 2\n", "is not valid YAML (line 3"),
    ("train:\n  lr: 1e-3\n\tseed: 1\n", "is not valid YAML"),
    ("trainer:\n  lr: 1\n", "unknown config section(s) 'trainer'"),
    ("1: 2\n", "unknown config section(s) 1"),
    ("model:\n  num_layer: 4\n", "model.num_layer: unknown field"),
    (b"\xff\xfe\x00model", "is not a text (UTF-8) file"),
])
def test_config_file_shapes(content, text, work, capsys):
    path = work / "bad.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = snapshot(work)
    rc, err = pretrain_in_process(capsys, ["--config", path, f"train.output_dir={work / 'run'}"])
    one_line(rc, err, "aim-pretrain: configuration error:", text)
    assert snapshot(work) == before


def test_config_file_missing_or_a_directory(work, capsys):
    for path, text in ((work / "nope.yaml", "does not exist; see examples/configs/"),
                       (work, "is a directory; pass a YAML file")):
        rc, err = pretrain_in_process(capsys, ["--config", path, f"train.output_dir={work / 'run'}"])
        one_line(rc, err, str(path), text)
    assert snapshot(work) == {}


def test_empty_config_file_is_announced(work, caplog):
    """Not an error, but never silent: the defaults are the official 600M recipe."""
    path = work / "empty.yaml"
    path.write_text("")
    with caplog.at_level("WARNING"):
        cfg = C.load_config(path)
    assert cfg.model.hidden_size == 1536
    assert any("is empty: every field takes its default" in r.message for r in caplog.records)


@pytest.mark.parametrize("override,text", [
    ("model.num_layers", "must look like section.key=value"),
    ("modle.num_layers=2", "key must be section.field"),
    ("model.=2", "key must be section.field"),
    ("model.num_layers.x=2", "key must be section.field"),
    ("data.train_sources=[a.tar, b.tar", "the value is not valid YAML"),
    ("train.lr={1", "the value is not valid YAML"),
    ("model.num_layers=.inf", "model.num_layers: expected an integer"),
    ("train.train_iters=2.5", "train.train_iters: expected an integer"),
])
def test_bad_overrides(override, text, work, capsys):
    rc, err = pretrain_in_process(capsys, [*BASE, f"train.output_dir={work / 'run'}", override])
    one_line(rc, err, "aim-pretrain: configuration error:", text)
    assert snapshot(work) == {}


def test_bad_command_line_and_output_dir(work, capsys):
    rc, err = pretrain_in_process(capsys, [*BASE, "--restart", "auto"])
    one_line(rc, err, "aim-pretrain: error:", "--restart", "--help")
    (work / "afile").write_text("x")
    before = snapshot(work)
    rc, err = pretrain_in_process(capsys, [*BASE, f"train.output_dir={work / 'afile'}"])
    one_line(rc, err, "train.output_dir=", "is a file; name a directory")
    assert snapshot(work) == before


# --------------------------------------------------------------------------- data paths

def data_cases(tmp: Path):
    (tmp / "empty").mkdir()
    (tmp / "notes.txt").write_text("x")
    for field in ("data.train_sources", "data.val_sources"):
        yield field, f"{field}=[{tmp / 'missing'}]", "the path does not exist"
        yield field, f"{field}=['{tmp / 'shards-*.tar'}']", "the glob matched no files"
        yield field, f"{field}=[{tmp / 'notes.txt'}]", "a file source must be a .tar shard"
        yield field, f"{field}=[{tmp / 'empty'}]", "no .tar shards and no images"


def test_data_paths_of_every_split(tmp_path, capsys):
    """Missing paths fail before any process group; an empty folder when the loaders open
    (after the model is built): both one line naming the split's field, nothing written."""
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "data").mkdir()
    for field, override, text in list(data_cases(tmp_path / "data")):
        before = snapshot(work)
        rc, err = pretrain_in_process(capsys, [*BASE, f"train.output_dir={work / 'run'}",
                                               "data.loader=torch", override])
        line = one_line(rc, err, "aim-pretrain: data error:", text, f"fix {field}")
        other = "data.val_sources" if field == "data.train_sources" else "data.train_sources"
        assert other not in line, line
        assert snapshot(work) == before


def test_data_loader_not_available(work, capsys, monkeypatch):
    from aim_megatron import data
    monkeypatch.setattr(data, "dali_available", lambda: False)
    rc, err = pretrain_in_process(capsys, [*BASE, f"train.output_dir={work / 'run'}", "data.loader=dali"])
    one_line(rc, err, "aim-pretrain: configuration error:", "data.loader=dali", "data.loader=torch")
    assert snapshot(work) == {}


# --------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run with one checkpoint (step 1), trained in this process."""
    from aim_megatron.training.main import main
    run = tmp_path_factory.mktemp("trained") / "run"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        assert main([*BASE, f"train.output_dir={run}"]) == 0
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return run


def test_bad_checkpoints(trained, work, capsys):
    before = snapshot(trained)
    cases = [
        (["--resume", work / "nope"], "does not exist"),
        (["--resume", work], "is not a complete aim-megatron checkpoint"),
        (["model.hidden_size=64"], "model.hidden_size: checkpoint 32, config 64"),
        (["train.global_batch_size=16"], "train.global_batch_size"),
        (["train.micro_batch_size=4"], "micro_batch_size: saved 2, now 4"),   # the data state
    ]
    for extra, text in cases:
        rc, err = pretrain_in_process(capsys, [*BASE, f"train.output_dir={trained}", "train.train_iters=2",
                                               *extra])
        one_line(rc, err, "aim-pretrain: checkpoint error:", text)
        assert snapshot(trained) == before
    # A `latest` that points nowhere (a copy of the run, so the fixture stays intact).
    (work / "checkpoints").mkdir()
    (work / "checkpoints" / "latest").write_text("step_00000099")
    before = snapshot(work)
    rc, err = pretrain_in_process(capsys, [*BASE, f"train.output_dir={work}", "train.train_iters=2"])
    one_line(rc, err, "aim-pretrain: checkpoint error:", "step_00000099, which does not exist")
    assert snapshot(work) == before


# --------------------------------------------------------------------------- tools

def test_convert_and_reshard_arguments(trained, work, capsys):
    ckpt = trained / "checkpoints" / "step_00000001"
    protected = snapshot(trained)
    convert, reshard = tool("convert_checkpoint"), tool("reshard_checkpoint")
    cases = [
        (convert, [], "the following arguments are required: command"),
        (convert, ["import", "--dst", work / "x"], "--src"),
        (convert, ["import", "--src", work / "aim.pth", "--dst", work / "x"], "--src"),
        (convert, ["import", "--src", work / "aim.pth", "--dst", work / "x", "model.num_layers=two"],
         "--src"),
        (convert, ["export", "--src", work / "nope", "--out", work / "a.pth"], "--src"),
        (convert, ["export", "--src", ckpt, "--out", work / "a.bin"], "--out"),
        (convert, ["export", "--src", ckpt, "--out", work / "a.pth", "--probe", work / "p.pt"], "--probe"),
        (reshard, ["reshard", "--src", work / "nope", "--dst", work / "b"], "--src"),
        (reshard, ["reshard", "--src", ckpt, "--dst", trained, "parallel.tp=1"], "already holds checkpoints"),
        (reshard, ["reshard", "--src", ckpt, "--dst", work / "b", "model.num_layers=2"],
         "only parallel.* settings"),
        (reshard, ["reshard", "--src", ckpt, "--dst", work / "b", "parallel.tp=x"],
         "parallel.tp: expected an integer"),
        (reshard, ["export", "--src", ckpt, "--out", work / "t.bin"], "--out"),
        (reshard, ["export", "--src", ckpt, "--out", work / "t.pt", "--names", "hf"], "--names"),
    ]
    for main, argv, text in cases:
        rc = call(main, argv)
        one_line(rc, capsys.readouterr().err, text)
        assert snapshot(work) == {} and snapshot(trained) == protected


def test_make_shards_arguments(work, capsys):
    main = tool("make_shards")
    (work / "images").mkdir()
    before = snapshot(work)
    cases = [
        (["--out", work / "s"], "one of the arguments"),
        (["--folder", work / "nope", "--out", work / "s"], "image folder"),
        (["--folder", work / "images"], "--out is required"),
        (["--folder", work / "images", "--out", work / "s", "--samples-per-shard", "0"], "--samples-per-shard"),
        (["--folder", work / "images", "--out", work / "s", "--workers", "-1"], "--workers"),
        (["--folder", work / "images", "--out", work / "s"], "holds no files"),
        (["--index-only", work / "a.tar"], "--index-only"),
        (["--verify", work / "images"], "no manifest.json"),
        (["--idx-images", work / "x.gz", "--out", work / "s"], "IDX file"),
    ]
    for argv, text in cases:
        rc = call(main, argv)
        one_line(rc, capsys.readouterr().err, text)
        assert snapshot(work) == before


def test_probe_arguments(trained, work, capsys):
    from aim_megatron.evaluation.probe_cli import main
    (work / "probe.yaml").write_text("probe: [1, 2\n")
    (work / "probe2.yaml").write_text("probe: 5\n")
    before, protected = snapshot(work), snapshot(trained)
    cases = [
        ([], "--checkpoint"),
        (["--checkpoint", work / "nope"], "is not a checkpoint"),
        (["--checkpoint", trained, "--config", work / "nope.yaml"], "probe config"),
        (["--checkpoint", trained, "--config", work / "probe.yaml"], "not valid YAML (line 2"),
        (["--checkpoint", trained, "--config", work / "probe2.yaml"], "one mapping named 'probe'"),
        (["--checkpoint", trained, "probe.epochs=[1"], "not valid YAML"),
        (["--checkpoint", trained, "--train-data", work], "--test-data"),
        (["--checkpoint", trained, "--train-data", work / "nope", "--test-data", work / "nope"],
         "the probe's train data (--data or --train-data): data source"),
        (["--checkpoint", trained, "--train-samples", "0"], "--train-samples"),
        (["--checkpoint", trained, "--epochs", "3"], "--epochs"),
    ]
    for argv, text in cases:
        rc = call(main, argv)
        one_line(rc, capsys.readouterr().err, text)
        assert snapshot(work) == before and snapshot(trained) == protected


def test_scaling_sweep_arguments(work, capsys):
    main = tool("scaling_sweep")
    (work / "fit.json").write_text("{}")
    (work / "spec.yaml").write_text("widths: [32\n")
    before = snapshot(work)
    cases = [
        (["plan", work / "nope.yaml", "--out", work / "s"], "does not exist"),
        (["plan", work / "spec.yaml", "--out", work / "s"], "spec.yaml"),
        (["launch", work, "--local", "--jobs", "0"], "--jobs"),
        (["launch", work / "nope", "--local"], "nope"),
        (["fit", work / "nope"], "nope"),
        (["predict", work / "nope.json", "--compute", "1e20"], "does not exist"),
        (["predict", work / "fit.json", "--compute", "1e20"], "not a fit.json"),
        (["predict", work / "fit.json", "--compute", "-1"], "--compute"),
        (["predict", work / "fit.json"], "--compute"),
    ]
    for argv, text in cases:
        rc = call(main, argv)
        one_line(rc, capsys.readouterr().err, text)
        assert snapshot(work) == before


# --------------------------------------------------------------------------- end to end

def run(cmd, nproc=1, timeout=240):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    if nproc > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd]
    return subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_subprocesses_exit_1_with_one_line(work):
    (work / "bad.yaml").write_text("train: 5\n")
    for argv, text in [
        (["--config", work / "bad.yaml"], "config section 'train' must be a mapping"),
        ([*BASE, "train.global_batch_size=0"], "train.global_batch_size=0"),
    ]:  # the other fields fail at the same point: their cases run in-process above
        proc = run(["-m", "aim_megatron.train", *argv, f"train.output_dir={work / 'run'}"])
        one_line(proc.returncode, proc.stderr, "aim-pretrain: configuration error:", text)
    proc = run(["tools/convert_checkpoint.py", "import", "--src", work / "aim.pth", "--dst", work / "x"])
    one_line(proc.returncode, proc.stderr, "convert_checkpoint: --src")
    proc = run(["tools/make_shards.py", "--folder", work / "nope", "--out", work / "s"])
    one_line(proc.returncode, proc.stderr, "does not exist")
    assert sorted(p.name for p in work.iterdir()) == ["bad.yaml"]


def _worker_output_is_one_line(stderr: str, text: str) -> None:
    """torchrun adds its own ChildFailedError report (a launcher traceback, docs/errors.md);
    the workers themselves print one line and no traceback."""
    assert "[rank" not in stderr, stderr                     # no worker traceback
    assert stderr.count("Traceback") <= 1 and "Error:" not in stderr.replace("ChildFailedError:", ""), stderr
    lines = [line for line in stderr.splitlines() if line.startswith("aim-pretrain:")]
    assert len(lines) == 1 and text in lines[0], stderr


def test_torchrun_missing_and_empty_data(work):
    """Two ranks: a missing validation path fails on every rank before any process group; an
    empty folder is seen only by the TP rank that reads (tp=2) and still ends both ranks."""
    (work / "empty").mkdir()
    before = snapshot(work)
    proc = run(["-m", "aim_megatron.train", *BASE, f"train.output_dir={work / 'run'}",
                f"data.val_sources=[{work / 'missing'}]"], nproc=2)
    assert proc.returncode == 1, proc.stderr
    _worker_output_is_one_line(proc.stderr, "data.val_sources: data source")
    proc = run(["-m", "aim_megatron.train", *BASE, f"train.output_dir={work / 'run'}", "parallel.tp=2",
                "data.loader=torch", f"data.train_sources=[{work / 'empty'}]"], nproc=2)
    assert proc.returncode == 1, proc.stderr
    _worker_output_is_one_line(proc.stderr, "no .tar shards and no images")
    assert snapshot(work) == before


# --------------------------------------------------------------------------- start-up summary

def test_startup_summary_says_what_runs_and_warns_when_absurd():
    from aim_megatron.training.startup import startup_summary
    cpu = (50e9, "CPU test device")   # a fixed 50 GFLOP/s device: no timing in the test
    lines, warning = startup_summary(C.load_config(None, []), 1, cpu)  # an empty config's defaults
    text = "\n".join(lines)
    assert "680.5M trunk" in text and "64 images per step = micro-batch 8 x 8 micro-batches x dp 1" in text
    assert "tp=1 pp=1 vp=1 dp=1" in text and "per step" in text
    assert warning is not None and "far too big for this device" in warning and "h per step" in warning
    lines, warning = startup_summary(C.load_config(None, BASE), 1, cpu)
    assert warning is None and "0.1M trunk" in lines[0]


def test_step_time_estimate_times_the_runs_own_dtype():
    # A CPU trains bf16 ~2x faster than fp32 where it has AVX512-BF16/AMX: the estimate must time bf16 then.
    from aim_megatron.training.startup import measured_matmul_flops
    for params_dtype, name in (("fp32", "float32 matmul"), ("bf16", "bfloat16 matmul")):
        rate, device = measured_matmul_flops(0.01, params_dtype=params_dtype)
        assert rate > 0 and name in device, device


# --------------------------------------------------------------------------- every command's --help

def _commands() -> dict:
    """{name: "module:function"}: the aim-* commands as setup.py installs them, and the two run as
    python -m."""
    installed = dict(re.findall(r'"(aim-[a-z-]+)=([\w.]+:\w+)"', (ROOT / "setup.py").read_text()))
    return {**installed, "baselines": "aim_megatron.evaluation.baselines:main",
            "findings": "aim_megatron.evaluation.findings:main"}


COMMANDS = _commands()


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_prints_its_help(name, capsys):
    """argparse formats help strings with %: a stray % in one (e.g. "45% of") crashes --help."""
    module, function = COMMANDS[name].split(":")
    main = getattr(importlib.import_module(module), function)
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith("usage:"), out[:500]
