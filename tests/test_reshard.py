"""A checkpoint resharded to another TP/PP/DP layout resumes with the same losses, and exports
from any layout give the same consolidated weights."""
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_distributed
from test_training import losses, pretrain

RUN = ["train.train_iters=8", "parallel.use_distributed_optimizer=true"]


def test_resume_under_new_layout_matches_old(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    pretrain(src, RUN + ["train.exit_after_steps=4"], nproc=2)          # DP=2
    step4 = src / "checkpoints" / "step_00000004"
    pretrain(src, RUN, nproc=2)                                          # continue as DP=2
    run_distributed("tools/reshard_checkpoint.py", 4,
                    ["reshard", "--src", str(step4), "--dst", str(dst), "parallel.tp=2", "parallel.pp=2"])
    assert (dst / "checkpoints" / "latest").read_text() == "step_00000004"
    pretrain(dst, RUN + ["parallel.tp=2", "parallel.pp=2"], nproc=4)  # continue as TP2 x PP2
    a, b = losses(src), losses(dst)
    assert sorted(b) == [5, 6, 7, 8]
    for step in b:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])

    # Consolidated exports of the same step from both layouts are identical.
    out_a, out_b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    run_distributed("tools/reshard_checkpoint.py", 1, ["export", "--src", str(step4), "--out", str(out_a)])
    run_distributed("tools/reshard_checkpoint.py", 1,
                    ["export", "--src", str(dst / "checkpoints" / "step_00000004"), "--out", str(out_b)])
    ta, tb = load_file(str(out_a)), load_file(str(out_b))
    assert set(ta) == set(tb) and "trunk.blocks.0.attn.qkv.weight" in ta
    assert not any(k.startswith("head.") for k in ta)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_reshard_refuses_model_changes(tmp_path):
    pretrain(tmp_path, ["train.train_iters=1"])
    with pytest.raises(AssertionError, match="only parallel"):
        run_distributed("tools/reshard_checkpoint.py", 1,
                        ["reshard", "--src", str(tmp_path / "checkpoints" / "step_00000001"),
                         "--dst", str(tmp_path / "x"), "model.num_layers=2"])
