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


def test_seed_summary_gives_mean_and_spread_and_judges_every_seed(tmp_path):
    """make demo-seeds: the mean must clear +3 points and every seed +2.5 over the best pixel baseline."""
    script = tmp_path / "summary.py"
    script.write_text(_summary_script())

    def seeds(name, trained_top1s):
        paths = []
        for seed, trained in enumerate(trained_top1s):
            out = _fake_run(tmp_path / name / f"seed{seed}", trained, 0.78, 0.8355, 0.8168)
            subprocess.run([sys.executable, str(script), str(out)], capture_output=True, check=True)
            paths.append(str(out / "probe" / "summary.json"))
        table = tmp_path / name / "summary.json"
        proc = subprocess.run([sys.executable, "-m", "aim_megatron.evaluation.seed_summary", *paths,
                               "--out", str(table)], cwd=ROOT, capture_output=True, text=True, check=True)
        return proc.stdout, json.loads(table.read_text())

    text, table = seeds("met", [0.8694, 0.8671, 0.8686])
    margin = table["table"]["margin_over_best_pixel_baseline"]
    assert abs(margin["mean"] - 0.0986 / 3) < 1e-9 and abs(margin["sd"] - 0.0011675) < 1e-6
    assert table["goal_met"] and "+3.29 +- 0.12 points" in text and ": met" in text
    # A high mean does not hide one weak seed (+2.4 < +2.5).
    text, table = seeds("one_weak", [0.8595, 0.8755, 0.8755])
    assert table["table"]["margin_over_best_pixel_baseline"]["mean"] > 0.03 and not table["goal_met"]
    assert "NOT met" in text and "lowest +2.40" in text
    missing = subprocess.run([sys.executable, "-m", "aim_megatron.evaluation.seed_summary",
                              str(tmp_path / "nowhere" / "summary.json")], cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode == 1 and "run examples/demo.sh for that seed first" in missing.stderr
