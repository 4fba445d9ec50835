"""examples/demo.sh: its summary puts the probes beside the pixel baselines and says which wins."""
import json
import re
import subprocess
import sys

from conftest import ROOT


def _summary_script() -> str:
    text = (ROOT / "examples/demo.sh").read_text()
    return re.search(r"<<'PY'\n(.*?)\nPY\n", text, re.S).group(1)


def _fake_run(tmp_path, trained, random_, logreg, knn):
    out = tmp_path / "run"
    (out / "probe").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"step": 100, "val_loss": 0.5}, {"step": 200, "loss": 0.4}, {"step": 200, "val_loss": 0.4})))
    for name, top1 in (("trained", trained), ("random", random_)):
        (out / "probe" / name).mkdir()
        (out / "probe" / name / "metrics.json").write_text(json.dumps({"top1": top1, "num_test": 10000, "num_train": 10000}))
    (out / "probe" / "pixels").mkdir()
    (out / "probe" / "pixels" / "metrics.json").write_text(json.dumps(
        {"logreg": {"top1": logreg, "l2": 0.01}, "knn": {"top1": knn, "k": 5}}))
    return out


def test_demo_summary_compares_with_the_best_pixel_baseline(tmp_path):
    script = tmp_path / "summary.py"
    script.write_text(_summary_script())
    for trained, verdict, margin in ((0.80, "do NOT beat", "-3.0"), (0.88, "beat", "+5.0")):
        out = _fake_run(tmp_path / verdict.replace(" ", "_"), trained, 0.7, 0.83, 0.81)
        proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, check=True)
        assert f"pre-trained features {verdict} the best pixel baseline: {margin} points" in proc.stdout
        assert "k-NN on pixels (k=5)" in proc.stdout and "0.8300" in proc.stdout
        summary = json.loads((out / "probe" / "summary.json").read_text())
        assert abs(summary["margin_over_best_pixel_baseline"] - (trained - 0.83)) < 1e-9
        assert summary["val_loss_first"] == 0.5 and summary["val_loss_last"] == 0.4
