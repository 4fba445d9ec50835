"""Mean and spread of the demo's figures over pre-training seeds (``make demo-seeds``).

Reads the ``probe/summary.json`` each demo run writes and prints one row per figure:
mean, sample standard deviation, min and max over the runs, then the verdict against the
demo's goal (the pre-trained probe beats the best pixel baseline by >= 3 points on average and
by >= 2.5 points for every seed).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

MEAN_GOAL, EACH_GOAL = 0.03, 0.025
MARGIN = "margin_over_best_pixel_baseline"


def summarize(runs: dict[str, dict]) -> dict:
    """{figure: {mean, sd, min, max, values}} over the runs (name -> summary.json content)."""
    if not runs:
        raise ValueError("no demo summaries given")
    keys = [k for k in next(iter(runs.values())) if all(isinstance(r.get(k), (int, float)) for r in runs.values())]
    table = {}
    for key in keys:
        values = [float(r[key]) for r in runs.values()]
        table[key] = {"mean": statistics.fmean(values),
                      "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                      "min": min(values), "max": max(values), "values": values}
    return table


def verdict(table: dict) -> tuple[bool, str]:
    margin = table[MARGIN]
    ok = margin["mean"] >= MEAN_GOAL and margin["min"] >= EACH_GOAL
    return ok, (f"margin over the best pixel baseline: {100 * margin['mean']:+.2f} +- {100 * margin['sd']:.2f} "
                f"points (mean +- sd over {len(margin['values'])} seeds; lowest {100 * margin['min']:+.2f}); "
                f"goal mean >= +{100 * MEAN_GOAL:.1f}, each >= +{100 * EACH_GOAL:.1f}: {'met' if ok else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summaries", nargs="+", type=Path, help="probe/summary.json of each demo run")
    parser.add_argument("--out", type=Path, help="write the table here as JSON")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.summaries if not p.is_file()]
    if missing:
        print(f"error: no demo summary at {', '.join(missing)}: run examples/demo.sh for that seed first",
              file=sys.stderr)
        return 1
    runs = {str(p.parent.parent): json.loads(p.read_text()) for p in args.summaries}
    table = summarize(runs)
    width = max(len(k) for k in table)
    print(f"\n{'figure':<{width}}   {'mean':>8} {'sd':>7} {'min':>8} {'max':>8}   ({len(runs)} seeds)")
    for key, row in table.items():
        print(f"{key:<{width}}   {row['mean']:8.4f} {row['sd']:7.4f} {row['min']:8.4f} {row['max']:8.4f}")
    ok, line = verdict(table)
    print(line)
    if args.out:
        args.out.write_text(json.dumps({"runs": list(runs), "table": table, "goal_met": ok}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
