"""Analytic model size, training FLOPs and per-GPU memory of AIM under a Megatron layout.

Everything here is arithmetic on config fields (no torch; the "aim" FLOP count comes from
aim_megatron.flops, which needs none either), so tools can size a 7B run on a laptop.

Parameters (AIM v1, no biases in blocks):
    trunk block   4h^2 (qkv + proj) + 2hf (fc1, fc2) + 4h (two LayerNorms)   = 12h^2 + 4h at f = 4h
    patch embed   P*h + h (conv as a linear over the P = p*p*C patch values) + 2h (LN)
    trunk         L * block + patch embed + 2h (post-trunk LN)
    head          h*H + H (in_proj) + n * (4H + 2HF) + 2H (LN) + H*P + P (out_proj)

Memory per GPU follows Megatron's accounting:
  * model states, bytes per parameter (Megatron-LM docs/distrib_optimizer.md):
        bf16 params, fp32 grads + fp32 master + Adam m, v:   18   distributed: 6 + 12/d
        fp32 params and grads, Adam m, v:                    16   distributed: 8 + 8/d
  * activations of one transformer layer per micro-batch (Korthikanti et al. 2022, "Reducing
    Activation Recomputation in Large Transformer Models", section 4), for 16-bit activations:
        no parallelism         sbh (34 + 5as/h)
        tensor parallel t      sbh (10 + 24/t + 5as/(ht))
        t + sequence parallel  sbh/t (34 + 5as/h)
        + selective recompute  34 sbh/t                (attention scores recomputed)
        full recompute         2 sbh (/t with SP)      (layer input only, per layer)
    The 34 and 5 count dropout masks (2 sbh and as^2 b bytes) and the dropout output; AIM trains
    without dropout and torch does not keep masks at p=0, so here they are 32 and 2 unless
    ``dropout=True``. The 24 is 8 (q, k, v, proj input) + 16 (fc1 output and GELU output at
    f = 4h); a general MLP ratio gives 8 + 4f/h. Flash attention keeps no s^2 terms, only
    fp32 softmax statistics (4asb).
  * 1F1B pipeline: rank r holds min(pp - r, M) micro-batches in flight, so rank 0 holds all L
    trunk layers' worth; interleaving (vp) multiplies that by 1 + (pp - 1)/(pp * vp)
    (same paper, section 4.2.3). The last rank also holds the prediction head (never
    recomputed) for one micro-batch.
Not counted: CUDA context, NCCL and TE workspaces, allocator fragmentation (keep a reserve).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from aim_megatron.config import (Config, ConfigError, ModelConfig, load_config, num_microbatches,
                     resolve_params_dtype, trunk_layers_per_stage, validate)
from aim_megatron.scaling.flops import train_flops_per_image as aim_train_flops_per_image

GIB = 1024 ** 3


# --------------------------------------------------------------------------- parameters

def block_params(h: int, f: int) -> int:
    """One trunk block: qkv + proj (4h^2), fc1 + fc2 (2hf), two LayerNorms (4h)."""
    return 4 * h * h + 2 * h * f + 4 * h


def patch_embed_params(m: ModelConfig) -> int:
    return m.patch_dim * m.hidden_size + m.hidden_size + 2 * m.hidden_size


def trunk_params(m: ModelConfig) -> int:
    """Trunk parameters, the N of the scaling laws (as in the AIM paper's model sizes)."""
    return (m.num_layers * block_params(m.hidden_size, m.ffn_hidden_size)
            + patch_embed_params(m) + 2 * m.hidden_size)


def head_block_params(m: ModelConfig) -> int:
    # two LayerNorms (LN_1 of the identity attention, LN_2 before the MLP) and the MLP
    return 4 * m.head_hidden_size + 2 * m.head_hidden_size * m.head_ffn_hidden_size


def head_params(m: ModelConfig) -> int:
    hh = m.head_hidden_size
    return (m.hidden_size * hh + hh + m.head_num_layers * head_block_params(m) + 2 * hh
            + hh * m.patch_dim + m.patch_dim)


# --------------------------------------------------------------------------- FLOPs

def train_flops_per_image(m: ModelConfig, method: str = "6ND") -> float:
    """Training FLOPs per image.

    "6ND": 6 x trunk params x tokens (the Kaplan/Chinchilla convention; no head, no attention).
    "aim": the explicit matmul count of ``aim_megatron.flops`` (the one behind the trainer's
        TFLOP/s and MFU): patch embedding, trunk, prediction head and the attention pairs the
        prefix-causal mask allows, averaged over the prefix-length distribution, x3 for
        forward + backward."""
    if method == "6ND":
        return 6.0 * trunk_params(m) * m.num_patches
    if method == "aim":
        return aim_train_flops_per_image(m)
    raise ValueError(f"unknown FLOPs method {method!r}; use '6ND' or 'aim'")


def head_train_flops_per_image(m: ModelConfig) -> float:
    """The prediction head's share of the "aim" count: the count less that of the same model
    without a head (head_hidden_size 0 zeroes every head matmul). The same for every trunk of a
    given width and geometry."""
    return train_flops_per_image(m, "aim") - train_flops_per_image(
        replace(m, head_hidden_size=0), "aim")


# --------------------------------------------------------------------------- memory

def model_state_bytes_per_param(params_dtype: str, distributed_optimizer: bool, dp: int
                                ) -> tuple[float, float, float]:
    """(weights, grads, optimizer) bytes per parameter on one GPU."""
    if params_dtype == "bf16":   # bf16 weights, fp32 main grads, fp32 master + Adam m, v
        weights, grads, opt = 2.0, 4.0, 12.0
    elif params_dtype == "fp32":
        weights, grads, opt = 4.0, 4.0, 8.0
    else:
        raise ConfigError(f"train.params_dtype={params_dtype!r}: use fp32 or bf16")
    if distributed_optimizer:
        opt /= dp
    return weights, grads, opt


def layer_activation_bytes(s: int, b: int, h: int, a: int, f: int, tp: int = 1,
                           sequence_parallel: bool = False, recompute: str | None = None,
                           act_bytes: int = 2, dropout: bool = False,
                           flash_attention: bool = False) -> float:
    """Bytes one transformer layer keeps for backward, for one micro-batch of b images."""
    sbh = s * b * h
    sp_div = tp if sequence_parallel else 1
    if recompute == "full":
        return act_bytes * sbh / sp_div   # only the layer input
    # Replicated over TP (sharded under SP): both LayerNorm inputs and outputs.
    replicated = 4 * act_bytes * sbh + (2 * sbh if dropout else 0)
    # Sharded over TP: q, k, v, proj input (4 sbh) and fc1 output, GELU output (2 sbf).
    sharded = act_bytes * (4 * sbh + 2 * s * b * f)
    if recompute == "selective" or flash_attention:
        core = 0.0 if recompute == "selective" else 4.0 * a * s * b   # fp32 softmax stats
    else:
        per_score = act_bytes + ((1 + act_bytes) if dropout else 0)  # softmax (+ mask, dropout out)
        core = per_score * a * s * s * b
    return replicated / sp_div + (sharded + core) / tp


def head_activation_bytes(m: ModelConfig, b: int, tp: int = 1, sequence_parallel: bool = False,
                          act_bytes: int = 2) -> float:
    """Post-trunk LN, in_proj, residual MLP blocks, final LN and prediction for b images."""
    s, h, hh, ff = m.num_patches, m.hidden_size, m.head_hidden_size, m.head_ffn_hidden_size
    sp_div = tp if sequence_parallel else 1
    replicated = act_bytes * s * b * (2 * h + 2 * hh * m.head_num_layers + 2 * hh + m.patch_dim)
    sharded = act_bytes * s * b * 2 * ff * m.head_num_layers
    return replicated / sp_div + sharded / tp


def embed_activation_bytes(m: ModelConfig, b: int, act_bytes: int = 2) -> float:
    """Image patches (conv input), conv output (LN input) and LN output."""
    s = m.num_patches
    return act_bytes * s * b * (m.patch_dim + 2 * m.hidden_size)


@dataclass
class StageMemory:
    stage: int
    layers: int
    params: int             # parameters held by one GPU of this stage (TP-sharded)
    in_flight: float        # micro-batches of activations held (1F1B), in units of this stage's layers
    weights: float          # bytes
    grads: float
    optimizer: float
    activations: float

    @property
    def model_states(self) -> float:
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.activations


@dataclass
class MemoryEstimate:
    world_size: int
    dp: int
    num_microbatches: int
    stages: list[StageMemory] = field(default_factory=list)

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda st: st.total)


def stage_params(m: ModelConfig, tp: int, layers: int, first: bool, last: bool) -> int:
    """Parameters on one GPU of a pipeline stage; LayerNorms, patch embed, in/out projections are
    replicated over TP, the block matmuls are sharded."""
    h, f = m.hidden_size, m.ffn_hidden_size
    n = layers * ((4 * h * h + 2 * h * f) // tp + 4 * h)
    if first:
        n += patch_embed_params(m)
    if last:
        hh, ff = m.head_hidden_size, m.head_ffn_hidden_size
        n += 2 * h  # post-trunk LN
        n += m.hidden_size * hh + hh + hh * m.patch_dim + m.patch_dim + 2 * hh
        n += m.head_num_layers * (4 * hh + 2 * hh * ff // tp)
    return n


def in_flight_microbatches(stage: int, pp: int, vp: int, num_microbatches: int) -> float:
    """Micro-batches of a stage's activations held at the 1F1B peak, counted in whole-stage units.
    Interleaved: rank r warms up 2(pp-r-1) + (vp-1)pp chunks of L/(pp vp) layers, plus one."""
    if vp <= 1:
        return float(min(pp - stage, num_microbatches))
    chunks = min(2 * (pp - stage - 1) + (vp - 1) * pp + 1, num_microbatches * vp)
    return chunks / vp


def estimate_memory(cfg: Config, world_size: int, flash_attention: bool = False,
                    dropout: bool = False) -> MemoryEstimate:
    """Per-GPU memory of every pipeline stage for a validated config and world size."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    dp = p.data_parallel_size(world_size)
    mbs = t.micro_batch_size
    num_mb = t.global_batch_size // (mbs * dp)
    act_bytes = 2 if t.params_dtype == "bf16" else 4
    w_b, g_b, o_b = model_state_bytes_per_param(t.params_dtype, p.use_distributed_optimizer, dp)
    per_layer = layer_activation_bytes(
        m.num_patches, mbs, m.hidden_size, m.num_heads, m.ffn_hidden_size, p.tp,
        p.sequence_parallel, p.recompute_granularity, act_bytes, dropout, flash_attention)
    full_layer = layer_activation_bytes(
        m.num_patches, mbs, m.hidden_size, m.num_heads, m.ffn_hidden_size, p.tp,
        p.sequence_parallel, None, act_bytes, dropout, flash_attention)
    mask = mbs * m.num_patches ** 2   # boolean prefix-causal mask, one per micro-batch in flight
    est = MemoryEstimate(world_size, dp, num_mb)
    vp = p.vp or 1
    for stage, layers in enumerate(trunk_layers_per_stage(m, p)):
        first, last = stage == 0, stage == p.pp - 1
        n = stage_params(m, p.tp, layers, first, last)
        flight = in_flight_microbatches(stage, p.pp, vp, num_mb)
        stored = layers * per_layer + mask
        if p.recompute_granularity == "full":
            if p.recompute_method == "uniform":   # inputs of each group of n layers are kept
                groups = math.ceil(layers / p.recompute_num_layers)
                stored = groups * per_layer + mask
            else:                                 # "block": first n layers checkpointed
                k = min(p.recompute_num_layers, layers)
                stored = k * per_layer + (layers - k) * full_layer + mask
        act = flight * stored
        if first:
            act += flight * embed_activation_bytes(m, mbs, act_bytes)
        if p.recompute_granularity == "full":
            act += min(p.recompute_num_layers, layers) * full_layer   # recomputed group in backward
        if last:
            act += head_activation_bytes(m, mbs, p.tp, p.sequence_parallel, act_bytes)
        est.stages.append(StageMemory(stage, layers, n, flight, n * w_b, n * g_b, n * o_b, act))
    return est


# --------------------------------------------------------------------------- layout advice

H100_USABLE_GIB = 79.6   # 81,559 MiB reported by nvidia-smi for an H100 SXM 80GB


def head_layer_equivalents(m: ModelConfig) -> float:
    """The prediction head's compute in trunk layers (FLOPs per token scale with matmul params)."""
    return head_params(m) / block_params(m.hidden_size, m.ffn_hidden_size)


def balanced_last_stage(m: ModelConfig, pp: int) -> int | None:
    """Trunk layers for the last pipeline stage (which also runs the head) that minimise the
    slowest stage, among splits where the other stages get equal whole layers."""
    if pp <= 1:
        return None
    head = head_layer_equivalents(m)
    best, best_cost = None, math.inf
    for last in range(0, m.num_layers):
        rest = m.num_layers - last
        if rest % (pp - 1) or rest // (pp - 1) < 1:
            continue
        cost = max(rest / (pp - 1), last + head)
        if cost < best_cost - 1e-9:
            best, best_cost = last, cost
    return best


def pipeline_bubble(pp: int, vp: int, num_microbatches: int) -> float:
    """Idle fraction of a 1F1B step: (pp - 1) / (vp * M) relative to the ideal time."""
    return (pp - 1) / (vp * num_microbatches) if pp > 1 else 0.0


@dataclass
class LayoutChoice:
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    num_microbatches: int
    recompute: str | None
    trunk_layers_in_last_stage: int | None
    peak_gib: float
    note: str = ""


def recommend_layout(cfg: Config, world_size: int, gpus_per_node: int = 8, min_mbs: int = 4,
                     max_mbs: int = 16, budget_gib: float = H100_USABLE_GIB - 6.0) -> LayoutChoice:
    """Smallest model-parallel size (TP before PP, TP within a node) whose largest micro-batch
    that fits in ``budget_gib`` is at least ``min_mbs`` images, trying no recompute, then
    selective; full recompute only when nothing else fits. Uses the config's global batch,
    precision and optimizer settings; SP is on whenever TP > 1.

    Why: a micro-batch of b images is a GEMM with 256 b rows; below ~300 rows an H100 GEMM is
    bound by weight reads (989 TFLOP/s / 3.35 TB/s), so b >= 4 keeps the matmuls compute-bound.
    TP and PP leave the rows per GEMM unchanged but divide the GPUs that share the global
    batch, so they are what keeps b up when the GPU count grows at a fixed global batch."""
    import copy

    m, gbs = cfg.model, cfg.train.global_batch_size
    layouts = []
    for tp in (1, 2, 4, 8):
        for pp in (1, 2, 4, 8, 16):
            if tp <= gpus_per_node and world_size % (tp * pp) == 0:
                layouts.append((tp * pp, pp, tp))
    layouts.sort()
    fallback: LayoutChoice | None = None
    unsharded_fits = False   # tp = pp = 1 fits memory, only at a micro-batch below min_mbs
    for recompute_options in ((None, "selective"), ("full",)):
        for _, pp, tp in layouts:
            dp = world_size // (tp * pp)
            for recompute in recompute_options:
                for mbs in (16, 8, 4, 2, 1):
                    if mbs > max_mbs or gbs % (mbs * dp):
                        continue
                    c = copy.deepcopy(cfg)
                    p = c.parallel
                    p.tp, p.pp, p.vp, p.sequence_parallel = tp, pp, None, tp > 1
                    p.trunk_layers_in_last_stage = balanced_last_stage(m, pp)
                    p.recompute_granularity = recompute
                    c.train.micro_batch_size = mbs
                    try:
                        validate(c, world_size)
                    except ConfigError:
                        continue
                    est = estimate_memory(c, world_size)
                    peak = est.peak.total / GIB
                    if peak > budget_gib:
                        continue
                    choice = LayoutChoice(tp, pp, dp, mbs, est.num_microbatches, recompute,
                                          p.trunk_layers_in_last_stage, peak)
                    if mbs >= min_mbs:
                        if unsharded_fits and tp * pp > 1:
                            choice.note = (f"tp*pp={tp * pp} keeps the micro-batch at {mbs} for "
                                           f"batch {gbs}; with a larger global batch tp=pp=1 fits")
                        return choice
                    unsharded_fits |= tp * pp == 1
                    if fallback is None or mbs > fallback.micro_batch_size:
                        fallback = choice
                    break   # smaller micro-batches of this layout only get worse
    if fallback is None:
        raise ConfigError(f"no layout of {world_size} GPUs fits {m.preset or 'this model'} in "
                          f"{budget_gib:.0f} GiB with global batch {gbs}; add GPUs or change the batch")
    fallback.note = (f"micro-batch {fallback.micro_batch_size} < {min_mbs}: the global batch "
                     f"{gbs} is spread too thin; raise train.global_batch_size or use fewer GPUs")
    return fallback


# --------------------------------------------------------------------------- tool helpers

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPES = REPO_ROOT / "examples" / "slurm" / "configs"


def resolve_config(config: str | Path | None = None, preset: str | None = None,
                   overrides: Sequence[str] = ()) -> Config:
    """A config file, else a preset's H100 recipe (examples/slurm/configs/<preset>.yaml) when
    there is one, else the preset on default settings; then ``section.key=value`` overrides."""
    extra = list(overrides)
    if config is None and preset is not None and (RECIPES / f"{preset}.yaml").is_file():
        config = RECIPES / f"{preset}.yaml"
    elif preset is not None:
        extra.insert(0, f"model.preset={preset}")
    if config is None and preset is None:
        raise ConfigError("give --config CFG.yaml or --preset NAME")
    cfg = load_config(config, extra)
    resolve_params_dtype(cfg)   # "auto": estimate for this machine's dtype
    return cfg


def check_layout(cfg: Config, world_size: int, gpus_per_node: int) -> list[str]:
    """validate() plus placement rules of a Slurm allocation; raises ConfigError naming the fix,
    returns warnings (legal but slow layouts)."""
    p = cfg.parallel
    if world_size < 1 or gpus_per_node < 1:
        raise ConfigError("--nodes and --gpus-per-node must be >= 1")
    validate(cfg, world_size)
    # Megatron orders ranks TP-first, so a TP group is tp consecutive ranks: it stays on the
    # NVLink of one node only if tp divides the GPUs per node.
    if gpus_per_node % p.tp:
        raise ConfigError(f"parallel.tp={p.tp} does not divide {gpus_per_node} GPUs per node, so TP "
                          f"groups would span nodes; use a tp that divides {gpus_per_node}")
    m = num_microbatches(cfg, world_size)
    warnings = []
    if p.vp is not None and m % p.pp:
        # megatron-core 0.16 interleaved schedule: micro-batches go in groups of pp per chunk.
        raise ConfigError(f"interleaved pipeline (parallel.vp={p.vp}) needs the micro-batches per "
                          f"step ({m}) to be a multiple of parallel.pp={p.pp}; change "
                          f"train.micro_batch_size or train.global_batch_size, or unset parallel.vp")
    if p.pp > 1 and m < p.pp:
        warnings.append(f"only {m} micro-batch(es) for {p.pp} pipeline stages: most stages idle; "
                        f"lower train.micro_batch_size or parallel.pp")
    if p.tp > 1 and not p.sequence_parallel:
        warnings.append("tp > 1 without parallel.sequence_parallel: activations are replicated "
                        "over TP; set parallel.sequence_parallel=true")
    return warnings


def micro_batch_fix(cfg: Config, world_size: int) -> str | None:
    """The largest micro-batch (<= the configured one) that divides the per-rank batch."""
    dp = cfg.parallel.data_parallel_size(world_size)
    if dp < 1 or cfg.train.global_batch_size % dp:
        return None
    per_rank = cfg.train.global_batch_size // dp
    for mbs in range(min(cfg.train.micro_batch_size, per_rank), 0, -1):
        if per_rank % mbs == 0:
            return f"train.micro_batch_size={mbs}"
    return None
