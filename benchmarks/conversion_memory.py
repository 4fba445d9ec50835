"""Peak memory and wall time of checkpoint conversion (tools/convert_checkpoint.py,
tools/reshard_checkpoint.py) at real model sizes, each step in a fresh subprocess.

    nice python benchmarks/conversion_memory.py --presets aim-600M aim-7B [--format safetensors]
        [--old aim-600M:4:4] [--workdir /tmp/convbench] [--json out.json]

Per preset: (1) write a random-weight official-format file (itself streamed), (2) import it
(weights-only dist checkpoint), (3) export that checkpoint to the official format, (4) reshard it
to TP=2 x PP=2. Big files are deleted as soon as the next step no longer needs them (a 7B fp32
file is ~26 GB). Memory is sampled from /proc/<pid>/status every 20 ms (VmRSS, RssAnon,
RssFile) and the peak RSS is also taken from the kernel (wait4 ru_maxrss). RSS counts the pages
of memory-mapped files, which the kernel can drop under pressure; anonymous RSS is what the
process really holds. The baseline is the fp32 tensor bytes of the model (trunk + pre-training
head) measured in the same run, and the floor of a process that only imports torch and
megatron-core; ``--old PRESET:LAYERS:HEAD_LAYERS`` also runs the in-memory paths (a model,
optimizer and gathered state dict) on that preset cut to fewer trunk and head blocks, next to
the streaming ones on the same model: the full-size old paths do not fit beside other users of a
24 GB machine (the issue measured 13.8 GB for the 600M import and ~22.5 GB for its export).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GB = 1e9

WRITE_RANDOM = """
import torch
from aim_megatron.checkpoint import streaming
from aim_megatron.config import load_config
from aim_megatron.models.reference import ReferenceAIM
m = load_config(None, {overrides!r}).model
with torch.device("meta"):
    shapes = {{k: (tuple(v.shape), torch.float32) for k, v in ReferenceAIM(m).state_dict().items()
              if not k.startswith("head.")}}
g = torch.Generator().manual_seed(0)
streaming.write_single_file({out!r}, shapes, lambda names: {{n: torch.rand(shapes[n][0], generator=g) - 0.5
                                                            for n in names}}, batch=1)
"""

OLD_IMPORT = """
from pathlib import Path
from aim_megatron.checkpoint.convert import import_official
from aim_megatron.checkpoint.official import RELEASED_LAYERNORM_EPS
from aim_megatron.config import load_config
cfg = load_config(None, [RELEASED_LAYERNORM_EPS, *{overrides!r}, "train.output_dir={dst}"])
import_official(Path({src!r}), Path({dst!r}), cfg)
"""

OLD_EXPORT = """
from pathlib import Path
from aim_megatron.checkpoint import checkpointer as checkpoint
from aim_megatron.checkpoint.convert import export_official
checkpoint.write_state_dict(export_official(Path({src!r})), Path({out!r}))
"""


def _status(pid: int) -> dict[str, int]:
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    fields[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return fields


def measure(cmd: list[str], label: str) -> dict:
    """Run cmd; peak RSS (kernel and sampled), peak anonymous RSS (sampled), wall time."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    while True:
        for key, value in _status(proc.pid).items():
            peak[key] = max(peak[key], value)
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.02)
    wall = time.perf_counter() - start
    reader.join(timeout=5)
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise RuntimeError(f"{label} failed ({rc}):\n{''.join(output)[-4000:]}")
    return {"step": label, "peak_rss_gb": max(usage.ru_maxrss * 1024, peak["VmRSS"]) / GB,
            "peak_anon_gb": peak["RssAnon"] / GB, "peak_file_gb": peak["RssFile"] / GB, "wall_s": wall}


def model_bytes(overrides: list[str]) -> tuple[float, float]:
    """fp32 bytes of (trunk, pre-training head)."""
    import torch
    from aim_megatron.config import load_config
    from aim_megatron.models.reference import ReferenceAIM
    m = load_config(None, overrides).model
    with torch.device("meta"):
        sd = ReferenceAIM(m).state_dict()
    trunk = sum(v.numel() for k, v in sd.items() if not k.startswith("head."))
    head = sum(v.numel() for k, v in sd.items() if k.startswith("head."))
    return 4 * trunk, 4 * head


def bench(name: str, overrides: list[str], work: Path, fmt: str, old: bool) -> list[dict]:
    py = sys.executable
    trunk_bytes, head_bytes = model_bytes(overrides)
    rows = []
    src, dst = work / f"official.{fmt}", work / "imported"
    step = dst / "checkpoints" / "step_00000000"
    out = work / f"exported.{fmt}"

    def add(row: dict) -> None:
        row.update(model=name, model_gb=(trunk_bytes + head_bytes) / GB)
        row["rss_ratio"] = row["peak_rss_gb"] / row["model_gb"]
        row["anon_ratio"] = row["peak_anon_gb"] / row["model_gb"]
        rows.append(row)
        print(f"  {name:>12} {row['step']:<22} peak RSS {row['peak_rss_gb']:6.2f} GB, anon {row['peak_anon_gb']:6.2f}"
              f" GB, wall {row['wall_s']:7.1f} s", flush=True)

    work.mkdir(parents=True, exist_ok=True)
    add(measure([py, "-c", WRITE_RANDOM.format(overrides=overrides, out=str(src))], "write random file"))
    if old:
        add(measure([py, "-c", OLD_IMPORT.format(overrides=overrides, src=str(src), dst=str(dst))],
                    "old import (in-memory)"))
        add(measure([py, "-c", OLD_EXPORT.format(src=str(step), out=str(out))],
                    "old export (in-memory)"))
        shutil.rmtree(dst)
        out.unlink()
    add(measure([py, "tools/convert_checkpoint.py", "import", "--src", str(src), "--dst", str(dst),
                 *overrides], "import (streamed)"))
    src.unlink()  # disk: the checkpoint and the export of a 7B model do not fit beside the source
    add(measure([py, "tools/convert_checkpoint.py", "export", "--src", str(step), "--out", str(out)],
                "export (streamed)"))
    out.unlink()
    add(measure([py, "tools/reshard_checkpoint.py", "reshard", "--src", str(step), "--dst", str(work / "tp2pp2"),
                 "parallel.tp=2", "parallel.pp=2"], "reshard (linked)"))
    shutil.rmtree(work / "tp2pp2")
    shutil.rmtree(dst)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model (fp32 GB) | step | peak RSS GB | peak anon RSS GB | RSS / model | anon / model | wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} ({r['model_gb']:.1f}) | {r['step']} | {r['peak_rss_gb']:.2f} | "
                     f"{r['peak_anon_gb']:.2f} | {r['rss_ratio']:.2f} | {r['anon_ratio']:.2f} | {r['wall_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["aim-600M"])
    ap.add_argument("--format", choices=["safetensors", "pth"], default="safetensors")
    ap.add_argument("--old", nargs="*", default=[],
                    help="PRESET:LAYERS:HEAD_LAYERS: also the in-memory paths on that cut model")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/conversion_bench"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.workdir.exists():
        raise SystemExit(f"--workdir {args.workdir} exists; pass a new one (it is deleted afterwards)")
    floor = measure([sys.executable, "-c", "import torch, megatron.core, aim_megatron.checkpoint.streaming"],
                    "python + torch + megatron-core imports")
    floor.update(model="-", model_gb=float("nan"), rss_ratio=float("nan"), anon_ratio=float("nan"))
    rows = [floor]
    try:
        for spec in args.old:
            preset, layers, head_layers = spec.split(":")
            name = f"{preset} {layers}+{head_layers} blocks"
            print(f"{name}: in-memory vs streamed", flush=True)
            rows += bench(name, [f"model.preset={preset}", f"model.num_layers={layers}",
                                 f"model.head_num_layers={head_layers}"],
                          args.workdir / name.replace(" ", "_"), args.format, old=True)
        for preset in args.presets:
            print(f"{preset}: streamed", flush=True)
            rows += bench(preset, [f"model.preset={preset}"], args.workdir / preset, args.format, old=False)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
    print()
    print(table(rows))
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"\n(format {args.format}; this driver's own peak RSS {own:.2f} GB)")
    if args.json:
        args.json.write_text(json.dumps({"format": args.format, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
