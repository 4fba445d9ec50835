"""`make gpu-check`: every GPU check of this repository in one run that fits 8 minutes on one
H100/H200, with everything it learns in one file, results/gpu_check.json.

    python scripts/gpu_check.py                  # GPU: the checks below; CPU: a dry run (~2 min)
    python scripts/gpu_check.py --budget-s 420   # stop starting new steps after 7 minutes

Steps, in order (each skipped with its reason where this machine cannot run it, and each given
only the time left in the budget, so the whole run ends inside it):

    environment   torch/CUDA/TE/megatron versions, GPU and compute capability, kernel availability
    self_check    varlen and flex prefix-causal kernels against the dense mask in bf16 at
                  AIM-600M's attention shape (the same check every run does at its first step)
    tests         pytest: test_gpu.py, test_attention.py, test_optimizer_resume.py (the
                  installed optimizer: TE's FusedAdam in the NGC image), test_fp8_validation.py
    mfu           benchmarks/mfu.py, aim-600M, TP=1: masked / varlen / flex / FP8 rows
    fp8_vs_bf16   the mean loss of the FP8 rows against the bf16 varlen row (same data, weights)
    sweep         benchmarks/mfu.py micro-batch x recompute sweep (memory and speed)

Packages the image lacks travel as wheels in .whl/ (docs/gpu.md lists them); when .whl/ holds
wheels they are installed into a private directory first and put on PYTHONPATH.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_gpu.py", "tests/test_attention.py", "tests/test_optimizer_resume.py",
         "tests/test_fp8_validation.py"]
# AIM-600M's attention: micro-batch 8, 256 patches, 12 heads of 128.
SELF_CHECK_SHAPE = (8, 256, 12, 128)


class Budget:
    """Seconds left of the run; a step that would start with too little left is skipped."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def install_wheels(env: dict) -> dict:
    """Wheels in .whl/ (the device machine's recipe) into a private target dir on PYTHONPATH."""
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if not wheels:
        return {"installed": [], "note": "no .whl/ directory: every package comes from the image"}
    target = Path(tempfile.gettempdir()) / "aim-gpu-check-site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                           "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target),
                           *map(str, wheels)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"installed": [], "error": proc.stderr.strip()[-800:]}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), env.get("PYTHONPATH")]))
    sys.path.insert(0, str(target))
    return {"installed": [w.name for w in wheels], "target": str(target)}


def environment() -> dict:
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "gpu": None, "compute_capability": None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        info["cudnn"] = torch.backends.cudnn.version()
    for name in ("megatron.core", "transformer_engine", "apex", "nvidia.dali"):
        try:
            module = __import__(name, fromlist=["__version__"])
            info[name] = getattr(module, "__version__", "present")
        except Exception as exc:  # absent, or built against another torch/CUDA
            info[name] = f"unavailable ({type(exc).__name__})"
    from aim_megatron.models.aim import transformer_engine_available
    from aim_megatron.models.attention import flash_varlen_available, varlen_api_problem
    info["transformer_engine_usable"] = transformer_engine_available()
    info["flash_varlen_available"] = flash_varlen_available()
    info["varlen_api_problem"] = varlen_api_problem()
    import megatron.core.optimizer as mcore_optimizer
    info["megatron_adam"] = f"{mcore_optimizer.Adam.__module__}.{mcore_optimizer.Adam.__name__}"
    return info


def self_check() -> dict:
    import torch
    from aim_megatron.models import attention
    if not torch.cuda.is_available():
        return {"skip": "no CUDA GPU: the fused kernels are GPU kernels (their CPU references are "
                        "checked in tests/test_attention.py)"}
    out = {}
    for kernel in ("varlen", "flex"):
        if kernel == "varlen" and not attention.flash_varlen_available():
            out[kernel] = {"skip": attention.varlen_api_problem() or "flash varlen needs an sm80+ GPU"}
            continue
        start = time.perf_counter()
        ok, reason = attention.kernel_matches_dense_mask(kernel, SELF_CHECK_SHAPE, torch.device("cuda"),
                                                         torch.bfloat16)
        out[kernel] = {"passed": ok, "reason": reason, "seconds": round(time.perf_counter() - start, 1)}
    return out


def run_tests(env: dict, timeout: float, files: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-rs", f"--junitxml={xml}", *files]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s (budget)"}
        cases = []
        if xml.exists():
            for case in ET.parse(xml).getroot().iter("testcase"):
                outcome, detail = "passed", ""
                for kind in ("failure", "error", "skipped"):
                    node = case.find(kind)
                    if node is not None:
                        outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                        detail = (node.get("message") or "")[:300]
                cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                              "seconds": round(float(case.get("time") or 0), 1), "detail": detail})
        counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
        return {"exit": proc.returncode, "counts": counts, "cases": cases,
                "tail": proc.stdout.strip().splitlines()[-3:]}


def run_mfu(env: dict, args: list[str], timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "benchmarks/mfu.py", *args, "--timeout", str(max(60, int(timeout))),
               "--json", str(out)]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s (budget)"}
        rows = json.loads(out.read_text()) if out.exists() else []
        table = proc.stdout.split("\n\n", 1)[-1].strip() if rows else ""
        return {"exit": proc.returncode, "rows": rows, "table": table,
                "stderr_tail": proc.stderr.strip().splitlines()[-3:]}


def fp8_vs_bf16(mfu: dict) -> dict:
    """The FP8 rows' mean loss against the bf16 row with the same kernel (varlen) and data."""
    rows = [r for r in mfu.get("rows", []) if "loss" in r]
    base = next((r for r in rows if r["fp8"] is None and r["kernel"] == "varlen"), None)
    fp8 = [r for r in rows if r["fp8"] is not None]
    if base is None or not fp8:
        skipped = [r.get("skip") or r.get("error") for r in mfu.get("rows", []) if r.get("fp8")]
        return {"skip": skipped[0] if skipped else "no bf16 varlen row and FP8 row both ran"}
    return {f"{r['fp8']}-{r['fp8_recipe']}": {"loss": r["loss"], "bf16_loss": base["loss"],
                                              "relative_difference": abs(r["loss"] - base["loss"]) / abs(base["loss"])}
            for r in fp8}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=450, help="stop starting steps after this (default 7.5 min)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "gpu_check.json")
    args = ap.parse_args(argv)
    started = time.monotonic()
    budget = Budget(args.budget_s)
    env = dict(os.environ, PYTHONWARNINGS="ignore", CUDA_DEVICE_MAX_CONNECTIONS="1")
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": args.budget_s,
               "wheels": install_wheels(env)}
    import torch
    on_gpu = torch.cuda.is_available()
    steps = {}

    def step(name, fn, min_s):
        t0 = time.monotonic()
        if budget.left() < min_s:
            steps[name] = {"skip": f"time budget: {budget.left():.0f} s left, needs ~{min_s} s"}
        else:
            try:
                steps[name] = fn()
            except Exception as exc:  # a broken step is a finding, not the end of the check
                steps[name] = {"error": f"{type(exc).__name__}: {exc}"}
        steps[name]["step_seconds"] = round(time.monotonic() - t0, 1)
        print(f"[gpu-check] {name}: {time.monotonic() - t0:.0f} s, "
              f"{budget.left():.0f} s of the budget left", flush=True)
        results["steps"] = steps
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))  # partial results survive a kill

    step("environment", environment, 5)
    step("self_check", self_check, 30)
    # On CPU only the GPU file runs (every test skips, with its reason): the others belong to
    # the CPU suite, and the dry run stays short.
    step("tests", lambda: run_tests(env, budget.left() - 150, TESTS) if on_gpu else
         run_tests(env, budget.left(), TESTS[:1]), 60)
    if on_gpu:
        step("mfu", lambda: run_mfu(env, ["--tp", "1", "--steps", "6", "--warmup", "3"],
                                    budget.left() - 60), 90)
        step("fp8_vs_bf16", lambda: fp8_vs_bf16(steps.get("mfu", {})), 0)
        step("sweep", lambda: run_mfu(env, ["--tp", "1", "--sweep-micro-batch", "32,64", "--recompute",
                                            "none,full", "--steps", "3", "--warmup", "1"],
                                      budget.left()), 60)
    else:
        reason = "no CUDA GPU: the MFU table and sweep measure GPUs (tests/test_benchmarks.py proves the script on CPU)"
        for name in ("mfu", "fp8_vs_bf16", "sweep"):
            step(name, lambda: {"skip": reason}, 0)
    results["total_seconds"] = round(time.monotonic() - started, 1)
    failed_tests = steps.get("tests", {}).get("counts", {})
    problems = [name for name, s in steps.items() if "error" in s]
    if failed_tests.get("failed") or failed_tests.get("error"):
        problems.append("tests")
    for kernel, check in steps.get("self_check", {}).items():
        if isinstance(check, dict) and check.get("passed") is False:
            problems.append(f"self_check.{kernel}")
    results["problems"] = problems
    args.out.write_text(json.dumps(results, indent=1, default=str))
    print(f"[gpu-check] {results['total_seconds']:.0f} s; results in {args.out}; "
          f"problems: {', '.join(problems) or 'none'}")
    if steps.get("mfu", {}).get("table"):
        print(steps["mfu"]["table"])
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
