"""The training loop end to end: loss goes down, resume is bit-exact (also with the distributed
optimizer and after SIGTERM), NaN steps are skipped and stop the run, checkpoints are atomic,
and bad checkpoints/configs fail clearly without touching what is on disk."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY

BASE = TINY + ["model.in_channels=1", "train.micro_batch_size=2", "train.global_batch_size=8",
               "train.lr=2e-3", "train.scale_lr=false", "train.log_interval=1",
               "train.tensorboard=false", "train.eval_iters=2"]


def pretrain(out: Path, overrides=(), nproc=1, expect=0, resume="auto", wait=True):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    args = ["--resume", resume, *BASE, f"train.output_dir={out}", *overrides]
    if nproc == 1:
        cmd = [sys.executable, "-m", "aim_megatron.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "aim_megatron.train", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, f"exit {proc.returncode}, wanted {expect}:\n{proc.stderr[-6000:]}"
    return proc


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def val_losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in records if "val_loss" in r]


def events(out: Path) -> list[tuple[int, str]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["event"]) for r in records if "event" in r]


def test_loss_goes_down(tmp_path):
    pretrain(tmp_path, ["train.train_iters=40", "train.eval_interval=20", "train.lr=3e-3"])
    curve = losses(tmp_path)
    first, last = sum(curve[s] for s in range(1, 6)) / 5, sum(curve[s] for s in range(36, 41)) / 5
    assert last < first - 0.02, (first, last)
    vals = val_losses(tmp_path)
    assert len(vals) == 2 and vals[-1] < vals[0]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000040"
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last == {"step": 40, "event": "complete", "images_seen": 40 * 8, "skipped_steps": 0}
    # The loss-curve tool plots every train step (the final "complete" record is not one) and each eval.
    proc = subprocess.run([sys.executable, "tools/plot_metrics.py", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "loss_curve.png").stat().st_size > 10_000
    from aim_megatron.training.plot_metrics import read_metrics
    train, val = read_metrics(tmp_path)
    assert [r["step"] for r in train] == list(range(1, 41)) and {r["step"]: r["loss"] for r in train} == curve
    assert [r["val_loss"] for r in val] == vals


@pytest.mark.parametrize("nproc,layout", [
    (1, []),
    (2, ["parallel.use_distributed_optimizer=true", "parallel.overlap_grad_reduce=true",
         "parallel.overlap_param_gather=true"]),
    (1, ["train.params_dtype=bf16"]),   # the demo's dtype on CPU: bf16 weights, fp32 master copy
])
def test_resume_is_bit_exact(tmp_path, nproc, layout):
    full, split = tmp_path / "full", tmp_path / "split"
    run = ["train.train_iters=8", *layout]
    pretrain(full, run, nproc)
    pretrain(split, run + ["train.exit_after_steps=4"], nproc)
    assert max(losses(split)) == 4 and events(split) == []   # stopped early: not complete
    proc = pretrain(split, run, nproc)
    assert events(split) == [(8, "complete")]
    # DP=2 resumes through megatron-core's fully parallel load (train.fully_parallel_load).
    assert ("fully parallel load of step_00000004" in proc.stderr + proc.stdout) == (nproc > 1)
    a, b = losses(full), losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(a[s] == b[s] for s in a), {s: (a[s], b[s]) for s in a if a[s] != b[s]}


def test_dp_reshardable_optimizer_state_changes_dp_but_refuses_another_tp(tmp_path):
    """train.optimizer_checkpoint_format=dp_reshardable (no gather before a save): a resume at
    another DP size trains exactly as one from the fully reshardable format; another TP is one line."""
    distopt = ["parallel.use_distributed_optimizer=true", "train.train_iters=6"]
    runs = {}
    for fmt in ("fully_reshardable", "dp_reshardable"):
        out = tmp_path / fmt
        pretrain(out, distopt + [f"train.optimizer_checkpoint_format={fmt}", "train.exit_after_steps=4"], 2)
        meta = json.loads((out / "checkpoints" / "step_00000004" / "aim_meta.json").read_text())
        assert meta["optimizer_format"] == fmt
        if fmt == "dp_reshardable":
            refused = pretrain(out, distopt + ["parallel.tp=2"], 2, expect=1)
            errors = [ln for ln in refused.stderr.splitlines() if ln.startswith("aim-pretrain:")]
            assert len(errors) == 1 and "dp_reshardable" in errors[0] and "tp=1 -> 2" in errors[0] \
                and "parallel.tp=1" in errors[0], refused.stderr[-3000:]
            reshard = subprocess.run([sys.executable, "tools/reshard_checkpoint.py", "reshard", "--src",
                                      str(out / "checkpoints" / "step_00000004"), "--dst", str(tmp_path / "tp2"),
                                      "parallel.tp=2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert reshard.returncode == 1 and "dp_reshardable" in reshard.stderr \
                and not (tmp_path / "tp2" / "checkpoints").exists(), reshard.stdout + reshard.stderr
        pretrain(out, distopt, 1)   # DP=2 -> DP=1
        runs[fmt] = losses(out)
    assert runs["dp_reshardable"] == runs["fully_reshardable"] and max(runs["dp_reshardable"]) == 6


def test_bf16_on_cpu_tracks_fp32(tmp_path):
    """The demo trains in bf16 on CPU (bf16 matmuls, math SDPA for its short sequences): from the
    same seed and data its loss curve stays within bf16 rounding of fp32's and goes down as far."""
    run = ["train.train_iters=30", "train.eval_interval=30", "train.lr=3e-3"]
    pretrain(tmp_path / "fp32", run)
    pretrain(tmp_path / "bf16", run + ["train.params_dtype=bf16"])
    fp32, bf16 = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert fp32[1] != bf16[1]                                # it did run in another precision
    assert max(abs(fp32[s] - bf16[s]) for s in fp32) < 0.05, {s: (fp32[s], bf16[s]) for s in fp32}
    mean = lambda c, steps: sum(c[s] for s in steps) / len(steps)
    assert mean(bf16, range(26, 31)) < mean(bf16, range(1, 6)) - 0.02
    assert abs(val_losses(tmp_path / "bf16")[-1] - val_losses(tmp_path / "fp32")[-1]) < 0.03


def test_auto_dtype_is_settled_when_the_run_starts(tmp_path):
    # train.params_dtype=auto becomes this machine's fast dtype, and the checkpoint records that
    # dtype: the resume check compares it, and the probe rebuilds the trunk in it.
    from aim_megatron.checkpoint import checkpointer as checkpoint
    from aim_megatron.config import fastest_params_dtype
    proc = pretrain(tmp_path, ["train.train_iters=2", "train.params_dtype=auto"])
    expected = fastest_params_dtype()
    meta = checkpoint.read_meta(tmp_path / "checkpoints" / "step_00000002")
    assert meta["config"]["train"]["params_dtype"] == expected
    assert f"2 steps in {expected}" in proc.stderr + proc.stdout


def test_sigterm_checkpoints_and_resumes_exactly(tmp_path):
    full, preempted = tmp_path / "full", tmp_path / "preempted"
    run = ["train.train_iters=30"]
    pretrain(full, run)
    proc = pretrain(preempted, run, wait=False)
    metrics = preempted / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, out[-3000:]
    stopped_at = max(losses(preempted))
    assert stopped_at < 30, "the signal arrived after the run had finished; nothing was tested"
    assert (preempted / "checkpoints" / "latest").read_text() == f"step_{stopped_at:08d}"
    pretrain(preempted, run)
    a, b = losses(full), losses(preempted)
    assert all(a[s] == b[s] for s in a)


def test_bad_checkpoints_and_mismatched_configs_fail_clearly(tmp_path):
    pretrain(tmp_path, ["train.train_iters=2"])
    ckpt = tmp_path / "checkpoints" / "step_00000002"
    snapshot = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}

    # Another model size: refused, and the message names the differing field.
    proc = pretrain(tmp_path, ["train.train_iters=4", "model.hidden_size=64"], expect=1)
    assert "model.hidden_size: checkpoint 32, config 64" in proc.stderr
    # Another global batch: the data position would be wrong.
    proc = pretrain(tmp_path, ["train.train_iters=4", "train.global_batch_size=16"], expect=1)
    assert "train.global_batch_size" in proc.stderr
    # A checkpoint path that does not exist.
    proc = pretrain(tmp_path, ["train.train_iters=4"], resume=str(tmp_path / "nope"), expect=1)
    assert "does not exist" in proc.stderr
    # Nothing was overwritten by the failed attempts.
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == snapshot
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000002"

    # A damaged checkpoint: metadata gone.
    (ckpt / "metadata.json").unlink()
    proc = pretrain(tmp_path, ["train.train_iters=4"], expect=1)
    assert "not a complete aim-megatron checkpoint" in proc.stderr
    # A damaged checkpoint: a data file truncated.
    pretrain(tmp_path / "b", ["train.train_iters=2"])
    ckpt_b = tmp_path / "b" / "checkpoints" / "step_00000002"
    for f in ckpt_b.glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])
    proc = pretrain(tmp_path / "b", ["train.train_iters=4"], expect=1)
    assert "could not read checkpoint" in proc.stderr
    # A `latest` pointing nowhere.
    (tmp_path / "b" / "checkpoints" / "latest").write_text("step_00000099")
    proc = pretrain(tmp_path / "b", ["train.train_iters=4"], expect=1)
    assert "does not exist" in proc.stderr


def test_bad_layout_fails_at_start(tmp_path):
    proc = pretrain(tmp_path, ["parallel.tp=3"], expect=1)
    assert "world size 1 is not divisible by tp*pp = 3*1 = 3" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


# --------------------------------------------------------------------------- in-process checks

def in_process_trainer(out: Path, overrides=(), loader=None):
    from aim_megatron.distributed import parallel
    from aim_megatron.config import load_config
    from aim_megatron.training.trainer import Trainer
    cfg = load_config(None, [*BASE, f"train.output_dir={out}", *overrides])
    world = parallel.initialize(cfg)
    return Trainer(cfg, world, train_loader=loader)


class PoisonedLoader:
    """The default synthetic data, with NaN images in the micro-batches of chosen steps."""

    def __init__(self, cfg, bad_steps, n_micro):
        from aim_megatron.data import build_loader
        self.inner = build_loader(cfg, 0, 1, cfg.train.micro_batch_size)
        self.bad_steps, self.n_micro = set(bad_steps), n_micro

    def __iter__(self):
        return self

    def __next__(self):
        step = self.inner.microbatch // self.n_micro + 1
        batch = next(self.inner)
        if step in self.bad_steps:
            batch["images"] = torch.full_like(batch["images"], float("nan"))
        return batch

    def state_dict(self):
        return self.inner.state_dict()


def flat_params(trainer):
    return torch.cat([p.detach().flatten().clone() for c in trainer.model for p in c.parameters()])


def test_nan_steps_are_skipped_and_counted(tmp_path):
    trainer = in_process_trainer(tmp_path, ["train.train_iters=6"])
    trainer.train_loader = PoisonedLoader(trainer.cfg, {3}, trainer.n_micro)
    records = [trainer.train_step() for _ in range(2)]
    before = flat_params(trainer)
    poisoned = trainer.train_step()
    assert not poisoned["stepped"] and trainer.skipped_steps == 1
    assert torch.equal(flat_params(trainer), before), "a NaN step changed the weights"
    records += [trainer.train_step() for _ in range(3)]
    assert all(r["stepped"] and torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert torch.isfinite(flat_params(trainer)).all()
    trainer.close()


def test_consecutive_nan_steps_stop_without_poisoned_checkpoint(tmp_path):
    from aim_megatron.checkpoint import checkpointer as checkpoint
    from aim_megatron.training.trainer import TrainingDiverged
    trainer = in_process_trainer(tmp_path, ["train.train_iters=10", "train.save_interval=2",
                                            "train.max_bad_steps=2"])
    trainer.train_loader = PoisonedLoader(trainer.cfg, {3, 4}, trainer.n_micro)
    with pytest.raises(TrainingDiverged, match="2 consecutive steps with non-finite"):
        trainer.run()
    trainer.close()
    latest = checkpoint.resolve(tmp_path / "checkpoints")
    assert latest.name == "step_00000002"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000002"]


def test_interrupted_save_leaves_last_good_checkpoint(tmp_path, monkeypatch):
    from aim_megatron.checkpoint import checkpointer as checkpoint
    trainer = in_process_trainer(tmp_path, ["train.train_iters=10"])
    trainer.train_step()
    trainer.save()
    trainer.train_step()

    # Crash 1: the process dies while dist_checkpointing is writing shards.
    real_save = checkpoint.dist_checkpointing.save

    def dying_save(state, path, *args, **kwargs):
        (Path(path) / "__0_0.distcp").write_bytes(b"half a shard")
        raise KeyboardInterrupt("simulated SIGKILL mid-save")

    monkeypatch.setattr(checkpoint.dist_checkpointing, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    assert checkpoint.resolve(tmp_path / "checkpoints").name == "step_00000001"
    assert (tmp_path / "checkpoints" / ".tmp_step_00000002").exists()

    # Crash 2: everything written, but the process dies before the rename.
    monkeypatch.setattr(checkpoint.dist_checkpointing, "save", real_save)
    real_replace = checkpoint.os.replace

    def dying_replace(src, dst):
        if Path(src).name.startswith(".tmp_step"):
            raise KeyboardInterrupt("simulated SIGKILL before rename")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    assert checkpoint.resolve(tmp_path / "checkpoints").name == "step_00000001"
    checkpoint.read_meta(tmp_path / "checkpoints" / "step_00000001")  # still complete

    # The next save succeeds and clears the debris.
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    trainer.save()
    assert checkpoint.resolve(tmp_path / "checkpoints").name == "step_00000002"
    assert not list((tmp_path / "checkpoints").glob(".tmp_*"))
    trainer.close()


def test_keep_last_n_checkpoints(tmp_path):
    pretrain(tmp_path, ["train.train_iters=5", "train.save_interval=1", "train.keep_last=2"])
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert kept == ["step_00000004", "step_00000005"]


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_resume_across_epoch_boundary_on_real_images(tmp_path, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI not installed")
    shards = tmp_path / "shards"
    subprocess.run([sys.executable, "tools/make_shards.py", "--fashion-mnist", "train", "--out",
                    str(shards), "--limit", "36", "--samples-per-shard", "16", "--quiet"],
                   cwd=ROOT, check=True, capture_output=True)
    # 36 Fashion-MNIST images over 2 data-parallel ranks at 8 per step: an epoch ends mid-run.
    run = ["train.train_iters=7", "model.image_size=28", f"data.train_sources=[{shards}]",
           f"data.loader={loader}", "data.num_workers=1", "train.eval_iters=1",
           f"data.val_sources=[{shards}]"]
    full, split = tmp_path / "full", tmp_path / "split"
    pretrain(full, run, nproc=2)
    pretrain(split, run + ["train.exit_after_steps=3"], nproc=2)
    pretrain(split, run, nproc=2)
    a, b = losses(full), losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 8))
    assert all(a[s] == b[s] for s in a), {s: (a[s], b[s]) for s in a if a[s] != b[s]}
    assert val_losses(full) == val_losses(split)[-1:]


def test_fp8_request_without_gpu_fails_at_start(tmp_path):
    import aim_megatron.models.aim as model_mod
    if model_mod.transformer_engine_available():
        pytest.skip("Transformer Engine with a GPU present: FP8 is available here")
    proc = pretrain(tmp_path, ["train.fp8=hybrid", "train.params_dtype=bf16"], expect=1)
    assert "needs Transformer Engine" in proc.stderr and "train.fp8=null" in proc.stderr
