"""benchmarks/mfu.py runs on CPU (the tiny preset proves the script; GPU figures are in the README)."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def mfu_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("mfu") / "rows.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/mfu.py", "--micro-batch", "8", "--steps", "2", "--warmup", "0",
         "--kernels", "masked,varlen,flex", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_mfu_table_has_every_row(mfu_rows):
    rows, stdout = mfu_rows
    measured = [r for r in rows if "skip" not in r]
    assert {(r["tp"], r["kernel"]) for r in measured} == {(1, "masked"), (1, "varlen"),
                                                          (2, "masked"), (2, "varlen")}
    assert not [r for r in measured if "error" in r], measured
    skipped = {r["kernel"] + "/" + str(r["fp8"]): r["skip"] for r in rows if "skip" in r}
    assert "no backward on CPU" in skipped["flex/None"]
    assert "Transformer Engine" in skipped["varlen/hybrid"]
    assert "| aim-tiny | 8 | 2 | fp32 | varlen |" in stdout


def test_mfu_rows_are_the_same_computation(mfu_rows):
    """Same data and initial weights in every row: kernels and TP sizes give the same loss, so the
    benchmark compares speed of one computation (and FP8 rows on a GPU show their loss drift)."""
    rows, _ = mfu_rows
    losses = [r["loss"] for r in rows if "loss" in r]
    assert max(losses) - min(losses) < 1e-4 * abs(losses[0])
    for r in rows:
        if "loss" in r:
            assert r["tflops_per_device"] > 0 and r["step_s"] > 0
            # images/s and TFLOP/s come from the same step time and the explicit FLOP count
            assert r["images_per_s_per_device"] == pytest.approx(8 / r["step_s"] / r["world"] * (r["world"] // r["tp"]))
