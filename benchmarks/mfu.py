"""Model FLOPs utilisation of AIM pre-training: whole training steps (forward, backward, optimizer)
of the real trainer code, timed per configuration, against an explicit FLOP count.

    python benchmarks/mfu.py                          # GPU: aim-600M; CPU: aim-tiny (proves the script)
    python benchmarks/mfu.py --presets aim-600M,aim-1B,aim-3B --micro-batch 16
    python benchmarks/mfu.py --sweep-micro-batch 4,8,16,32 --recompute none,selective,full

FLOPs per step are counted from the architecture (aim_megatron/scaling/flops.py): trunk and head matmuls,
and attention over the (query, key) pairs the prefix-causal mask of each sampled prefix length
allows; backward counts twice the forward. Recomputation is not counted (MFU, not HFU).
Each configuration runs in its own process group (torchrun for TP=2), so rows do not share
memory or compiled state. Columns:

    TFLOP/s   model FLOPs per second per device
    MFU       against the device's dense bf16 peak (H100/H200 SXM 989 TFLOP/s); n/a on CPU
    vs mm     against a large matmul measured in the same process, in the row's dtype: an
              achievable ceiling, and the only yardstick on CPU
    x base    images/s relative to the first row (bf16, dense-mask attention, TP=1)
    peak GiB  GPU: the allocator's peak; CPU: the process's peak resident memory
    loss      mean loss of the timed steps: same data and initial weights in every row, so FP8
              and the fused kernels must track bf16 here
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RESULT_TAG = "MFU_RESULT "


@dataclass
class Row:
    preset: str
    micro_batch: int
    tp: int = 1
    dtype: str = "bf16"            # bf16 | fp32
    fp8: str | None = None         # None | "hybrid"
    fp8_recipe: str = "delayed"    # delayed | tensorwise
    kernel: str = "masked"         # masked | varlen | flex
    recompute: str = "none"        # none | selective | full

    @property
    def precision(self) -> str:
        return self.dtype if self.fp8 is None else f"fp8-{self.fp8_recipe}"


# --------------------------------------------------------------------------- worker (one row)

def _matmul_tflops(torch, device, dtype) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(2):
        a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    reps, best = (20 if device.type == "cuda" else 4), float("inf")
    for _ in range(5):  # best of 5: a ceiling, so the least disturbed timing
        sync()
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 * reps / best / 1e12


def worker(row: Row, steps: int, warmup: int) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from aim_megatron.distributed import cpu_shims
    from aim_megatron.distributed import parallel
    from aim_megatron.config import load_config, num_microbatches
    from aim_megatron.scaling.flops import device_peak_tflops, forward_flops_per_image
    from aim_megatron.models.attention import kernel_self_checks

    overrides = [f"model.preset={row.preset}", f"model.attention_kernel={row.kernel}",
                 f"parallel.tp={row.tp}", f"train.micro_batch_size={row.micro_batch}",
                 f"train.global_batch_size={row.micro_batch}", f"train.params_dtype={row.dtype}",
                 f"train.train_iters={10 * (steps + warmup)}", "train.seed=1"]
    if row.fp8:
        overrides += [f"train.fp8={row.fp8}", f"train.fp8_recipe={row.fp8_recipe}"]
    if row.recompute != "none":
        overrides += [f"parallel.recompute_granularity={row.recompute}"]
    cfg = load_config(None, overrides)
    world = parallel.initialize(cfg)
    # One micro-batch per DP replica per step: the global batch grows with DP, per-GPU work does not.
    cfg.train.global_batch_size = row.micro_batch * parallel_state.get_data_parallel_world_size()
    assert num_microbatches(cfg, world) == 1
    model = parallel.build_model(cfg)
    optimizer = parallel.build_optimizer(cfg, model)
    device, m = cpu_shims.device(), cfg.model

    g = torch.Generator().manual_seed(0)  # identical data in every row
    n = cfg.train.global_batch_size
    lo, hi = m.prefix_range
    batches, flops = [], []  # two alternating batches; FLOPs of each whole (all-DP) batch
    for _ in range(2):
        batch = {"images": torch.randn(n, m.in_channels, m.image_size, m.image_size, generator=g),
                 "prefix_len": torch.randint(lo, hi + 1, (n,), generator=g)}
        flops.append(3 * sum(forward_flops_per_image(m, float(k)) for k in batch["prefix_len"].tolist()))
        batch = {k: v.to(device) for k, v in batch.items()}
        batches.append(parallel.split_microbatches(cfg, batch, world))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    times, losses = [], []
    for step in range(warmup + steps):
        sync()
        start = time.perf_counter()
        loss, _, _ = parallel.train_step(cfg, model, optimizer, batches[step % 2])
        sync()
        if step >= warmup:
            times.append(time.perf_counter() - start)
            losses.append(loss)
    step_time = statistics.median(times)
    dp = parallel_state.get_data_parallel_world_size()
    step_flops = statistics.mean(flops)
    result = {
        **asdict(row), "world": world, "step_s": step_time,
        "images_per_s_per_device": row.micro_batch * dp / step_time / world,
        "tflops_per_device": step_flops / step_time / world / 1e12,
        "peak_tflops": device_peak_tflops(),
        "matmul_tflops": _matmul_tflops(torch, device, torch.bfloat16 if row.dtype == "bf16" and
                                        device.type == "cuda" else torch.float32),
        # GPU: the allocator's peak; CPU: the process's peak resident set (everything, not just tensors)
        "max_memory_gib": (torch.cuda.max_memory_allocated() if device.type == "cuda" else
                           resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30,
        "loss": statistics.mean(losses),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
        # The fused kernel's run-time check: a row whose kernel fell back to masked says so.
        "attention_self_checks": kernel_self_checks(),
    }
    if dist.get_rank() == 0:
        print(RESULT_TAG + json.dumps(result), flush=True)
    parallel.shutdown()


# --------------------------------------------------------------------------- driver

def fused_kernel_problems() -> dict[str, str]:
    """GPU only: why the varlen or flex kernel cannot run with this torch, per kernel."""
    import torch
    from aim_megatron.models.attention import varlen_api_problem
    problems = {}
    varlen = varlen_api_problem()
    if varlen is None and torch.cuda.get_device_capability() < (8, 0):
        varlen = "flash varlen attention needs an sm80+ GPU"
    if varlen:
        problems["varlen"] = varlen
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except Exception as exc:  # torch < 2.5, or a broken build
        problems["flex"] = f"torch {torch.__version__} has no FlexAttention ({type(exc).__name__})"
    return problems


def gpu_info() -> tuple[int, bool, bool]:
    """(GPU count, FP8 capable (sm89+), Transformer Engine usable)."""
    import torch
    if not torch.cuda.is_available():
        return 0, False, False
    from aim_megatron.models.aim import transformer_engine_available
    return (torch.cuda.device_count(), torch.cuda.get_device_capability() >= (8, 9),
            transformer_engine_available())


def skip_reason(row: Row, gpus: int, fp8_ok: bool, te_ok: bool,
                kernel_problems: dict[str, str] | None = None) -> str | None:
    if row.fp8 and not (fp8_ok and te_ok):
        return "FP8 needs Transformer Engine on an sm89+ GPU"
    if gpus and row.tp > gpus:
        return f"TP={row.tp} needs {row.tp} GPUs"
    if not gpus and row.kernel == "flex":
        return "FlexAttention has no backward on CPU"
    if gpus and row.kernel in (kernel_problems or {}):
        return kernel_problems[row.kernel]
    return None


def default_rows(presets: list[str], mbs: int, on_gpu: bool, tps: list[int]) -> list[Row]:
    dtype = "bf16" if on_gpu else "fp32"  # CPU bf16 matmuls are emulated and slow
    rows = []
    for preset in presets:
        for tp in tps:
            rows += [Row(preset, mbs, tp, dtype, kernel="masked"),
                     Row(preset, mbs, tp, dtype, kernel="varlen"),
                     Row(preset, mbs, tp, dtype, kernel="flex"),
                     Row(preset, mbs, tp, dtype, fp8="hybrid", fp8_recipe="delayed", kernel="varlen"),
                     Row(preset, mbs, tp, dtype, fp8="hybrid", fp8_recipe="tensorwise", kernel="varlen")]
    return rows


def run_row(row: Row, steps: int, warmup: int, timeout: int, on_gpu: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(asdict(row)),
           "--steps", str(steps), "--warmup", str(warmup)]
    if row.tp > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={row.tp}", *cmd[1:]]
    env = dict(os.environ, PYTHONWARNINGS="ignore", CUDA_DEVICE_MAX_CONNECTIONS="1")
    if not on_gpu:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // row.tp))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**asdict(row), "error": f"timed out after {timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    text = proc.stdout + proc.stderr
    reason = "out of memory" if "out of memory" in text.lower() else f"exit {proc.returncode}"
    tail = [ln for ln in text.strip().splitlines() if ln.strip()][-3:]
    return {**asdict(row), "error": reason, "detail": " | ".join(tail)[-400:]}


def fmt_table(results: list[dict]) -> str:
    head = ["preset", "mbs", "TP", "precision", "attention", "recompute", "step ms", "img/s/dev",
            "TFLOP/s", "MFU", "vs mm", "x base", "peak GiB", "loss"]
    base = next((r for r in results if "error" not in r and "skip" not in r), None)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        fell_back = [c for c in r.get("attention_self_checks", []) if not c["passed"]]
        kernel = f"{r['kernel']} (self-check failed: ran masked)" if fell_back else r["kernel"]
        cells = [r["preset"], str(r["micro_batch"]), str(r["tp"]),
                 Row(**{k: r[k] for k in Row.__dataclass_fields__}).precision,
                 kernel, r["recompute"]]
        if "skip" in r or "error" in r:
            note = f"skipped: {r['skip']}" if "skip" in r else f"failed: {r['error']}"
            cells += [note] + [""] * (len(head) - len(cells) - 1)
        else:
            mfu = f"{100 * r['tflops_per_device'] / r['peak_tflops']:.1f}%" if r["peak_tflops"] else "n/a"
            mem = f"{r['max_memory_gib']:.2f}"
            cells += [f"{1e3 * r['step_s']:.1f}", f"{r['images_per_s_per_device']:.1f}",
                      f"{r['tflops_per_device']:.3g}", mfu,
                      f"{100 * r['tflops_per_device'] / r['matmul_tflops']:.1f}%",
                      f"{r['images_per_s_per_device'] / base['images_per_s_per_device']:.2f}x",
                      mem, f"{r['loss']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--presets", default=None, help="comma list (default: aim-600M on GPU, aim-tiny on CPU)")
    ap.add_argument("--micro-batch", type=int, default=None, help="per GPU (default 16 GPU, 32 CPU)")
    ap.add_argument("--tp", default=None, help="comma list of TP sizes (default 1,2)")
    ap.add_argument("--kernels", default=None, help="only these attention kernels (comma list)")
    ap.add_argument("--precisions", default=None, help="only these precisions, e.g. bf16,fp8-delayed")
    ap.add_argument("--sweep-micro-batch", default=None,
                    help="comma list: instead of the kernel/precision table, measure these micro-batch "
                         "sizes x --recompute choices (fused kernel, bf16) for memory and speed")
    ap.add_argument("--recompute", default="none", help="with --sweep-micro-batch: none,selective,full")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10 GPU, 3 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5 GPU, 1 CPU)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per row")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()

    if args.worker:
        steps, warmup = args.steps or 3, args.warmup if args.warmup is not None else 1
        worker(Row(**json.loads(args.worker)), steps, warmup)
        return

    gpus, fp8_ok, te_ok = gpu_info()
    on_gpu = gpus > 0
    presets = (args.presets or ("aim-600M" if on_gpu else "aim-tiny")).split(",")
    mbs = args.micro_batch or (16 if on_gpu else 32)
    tps = [int(t) for t in (args.tp or "1,2").split(",")]
    steps = args.steps or (10 if on_gpu else 3)
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)

    kernel_problems = fused_kernel_problems() if on_gpu else {}
    if args.sweep_micro_batch:
        dtype = "bf16" if on_gpu else "fp32"
        sweep_kernel = "varlen" if on_gpu and "varlen" not in kernel_problems else "masked"
        rows = [Row(p, int(b), tps[0], dtype, kernel=sweep_kernel, recompute=rc)
                for p in presets for rc in args.recompute.split(",")
                for b in args.sweep_micro_batch.split(",")]
    else:
        rows = default_rows(presets, mbs, on_gpu, tps)
        if args.kernels:
            rows = [r for r in rows if r.kernel in args.kernels.split(",")]
        if args.precisions:
            rows = [r for r in rows if r.precision in args.precisions.split(",")]

    device = "CPU" if not on_gpu else None
    print(f"{len(rows)} configurations, {warmup} warm-up + {steps} timed steps each", flush=True)
    results = []
    for row in rows:
        reason = skip_reason(row, gpus, fp8_ok, te_ok, kernel_problems)
        result = {**asdict(row), "skip": reason} if reason else run_row(row, steps, warmup, args.timeout, on_gpu)
        device = result.get("device", device)
        status = result.get("skip") or result.get("error") or f"{result['images_per_s_per_device']:.1f} img/s/device"
        print(f"  {row.preset} TP={row.tp} {row.precision} {row.kernel} mbs={row.micro_batch} "
              f"recompute={row.recompute}: {status}", flush=True)
        results.append(result)

    print(f"\nAIM pre-training MFU on {device}, {time.strftime('%Y-%m-%d')}\n")
    print(fmt_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    # Out of memory is a finding (the micro-batch sweep looks for it), not a failure of the script.
    failed = [r for r in results if "error" in r and r["error"] != "out of memory"]
    for r in failed:
        print(f"failed: {r['preset']} TP={r['tp']} {r['kernel']}: {r['error']}: {r.get('detail', '')}",
              file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
