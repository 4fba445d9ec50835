"""AIM v1 (El-Nouby et al. 2024) on megatron-core.

    images [b, C, H, W] --patch embed + LN + 2D sin-cos--> [s, b, D]      (pre_process stage)
        --> TransformerBlock (prefix-causal self-attention, GELU MLP)       (every stage)
        --> post-trunk LN --> prediction head (identity-attention blocks)   (post_process stage)
        --> per-patch normalized-pixel MSE against the *next* patch

Hidden states use megatron's [sequence, batch, hidden] layout. The trunk and the head are built
from layer specs: ``layer_spec(backend)`` picks Transformer Engine modules or megatron-core's
local ones, and ``select_backend`` is the single place that decides which.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.fp8_utils import get_fp8_context
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.transformer.utils import sharded_state_dict_default

from aim_megatron.models.attention import PrefixCausalAttention
from aim_megatron.config import Config, ModelConfig, torch_params_dtype

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- backend selection

def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions import transformer_engine as _  # noqa: F401
    except Exception:  # TE missing or built against another CUDA/torch
        return False
    return True


# FP8 tensor cores: Ada (sm89) and Hopper (sm90) onwards; TE fails inside the first FP8 GEMM below.
FP8_MIN_CAPABILITY = (8, 9)


def gpu_compute_capability() -> Optional[tuple[int, int]]:
    """This process's GPU's compute capability, None without CUDA."""
    return tuple(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None


def select_backend(requested: str = "auto", fp8: Optional[str] = None) -> str:
    """'te' when Transformer Engine imports and a GPU is present, else 'local'. FP8 without
    Transformer Engine, or on a GPU without FP8 tensor cores, is an error, never a silent bf16
    run (checked where the run starts, before any model is built)."""
    available = transformer_engine_available()
    if fp8 is not None and (requested == "local" or not available):
        raise RuntimeError(
            f"train.fp8={fp8} needs Transformer Engine layers on a GPU with FP8 (H100/H200); "
            f"{'model.backend=local was requested' if requested == 'local' else 'none is available here'}"
            f". Set train.fp8=null to train in bf16")
    capability = gpu_compute_capability() if fp8 is not None else None
    if capability is not None and capability < FP8_MIN_CAPABILITY:
        raise RuntimeError(
            f"train.fp8={fp8} needs a GPU with FP8 tensor cores (compute capability >= "
            f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}: H100/H200, L40S/L4); this GPU is "
            f"sm{capability[0]}{capability[1]}. Set train.fp8=null to train in bf16")
    if requested == "local":
        return "local"
    if requested == "te" and not available:
        raise RuntimeError(
            "model.backend='te' needs Transformer Engine and a CUDA GPU; install "
            "transformer-engine[pytorch] on a GPU machine or set model.backend=auto/local")
    backend = "te" if available else "local"
    if requested == "auto":
        log.info("layer backend: %s (%s)", backend,
                 "Transformer Engine" if backend == "te" else "megatron-core local layers")
    return backend


class AimLayerNorm(torch.nn.LayerNorm):
    """torch LayerNorm that tells megatron-core to all-reduce its grads under sequence parallel."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps, device=_init_device(config), dtype=config.params_dtype)
        for p in self.parameters():
            setattr(p, "sequence_parallel", config.sequence_parallel)


def _init_device(config: TransformerConfig):
    # None follows the ambient default device, so `with torch.device("meta")` builds shapes only.
    return None if config.use_cpu_initialization else torch.cuda.current_device()


# Checkpoints store layer norms under Transformer Engine's names (as Megatron-LM's local GPT spec
# does), so one checkpoint loads into either backend.
TE_NORM_KEYS = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                 "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


class IdentityAttention(torch.nn.Module):
    """The head's "attention": returns its (normalized) input as megatron's (output, bias) pair,
    so the layer's attention residual computes x + LN_1(x), as ml-l3m's head blocks do
    (a standard block built with attn_target=GenericIdentity)."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, x, *args, **kwargs):
        return x, None


def layer_spec(backend: str, with_attention: bool = True, attention_kernel: str = "auto") -> ModuleSpec:
    """A pre-norm transformer layer. Without attention it is the head's block:
    x = x + LN_1(x); x = x + MLP(LN_2(x)) (ml-l3m SimpleDecoder with identity attention).

    Both backends share the core attention: per-sample prefix-causal attention has no fused
    Transformer Engine mask type, and aim_megatron.attention runs it through flash/flex kernels."""
    if backend == "te":
        from megatron.core.extensions.transformer_engine import (
            TELayerNormColumnParallelLinear, TERowParallelLinear)
        norm, qkv, proj = IdentityOp, TELayerNormColumnParallelLinear, TERowParallelLinear
        fc1, fc2 = TELayerNormColumnParallelLinear, TERowParallelLinear  # LN fused into fc1/qkv
        keys_map = {}
    else:
        norm, qkv, proj = AimLayerNorm, ColumnParallelLinear, RowParallelLinear
        fc1, fc2 = ColumnParallelLinear, RowParallelLinear
        keys_map = dict(TE_NORM_KEYS) if with_attention else {
            "pre_mlp_layernorm.": TE_NORM_KEYS["pre_mlp_layernorm."]}
    # The head has no qkv linear to fuse LN_1 into: its LN_1 is a plain norm under either backend
    # and keeps the name input_layernorm.* in checkpoints.
    attention, input_norm = IdentityAttention, AimLayerNorm
    if with_attention:
        attention = ModuleSpec(
            module=SelfAttention,
            params={"attn_mask_type": AttnMaskType.arbitrary},  # prefix-causal, per sample
            submodules=SelfAttentionSubmodules(
                linear_qkv=qkv, linear_proj=proj,
                core_attention=ModuleSpec(module=PrefixCausalAttention,
                                          params={"kernel": attention_kernel}),
                q_layernorm=IdentityOp, k_layernorm=IdentityOp))
        input_norm = norm
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=input_norm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2)),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map))


# --------------------------------------------------------------------------- initialisation

def xavier_bound(fan_in: int, fan_out: int) -> float:
    return (6.0 / (fan_in + fan_out)) ** 0.5


def official_init_methods(m: ModelConfig) -> dict:
    """TransformerConfig init callables for ``model.init_method``. With CPU initialisation
    megatron draws the full [out, in] master weight and splits it over TP, so xavier sees the
    full fans (and every layout gets the same values); GPU initialisation draws each shard
    separately, which ``reinit_official_tp_shards`` corrects."""
    if m.init_method != "official":
        return {}
    return dict(init_method=torch.nn.init.xavier_uniform_,
                output_layer_init_method=torch.nn.init.xavier_uniform_)


def _tp_partition(module: torch.nn.Module) -> Optional[str]:
    if isinstance(module, ColumnParallelLinear) or getattr(module, "parallel_mode", None) == "column":
        return "column"
    if isinstance(module, RowParallelLinear) or getattr(module, "parallel_mode", None) == "row":
        return "row"
    return None


@torch.no_grad()
def reinit_official_tp_shards(module: torch.nn.Module, tp: int) -> None:
    """xavier-uniform on every TP-sharded linear from the *full* matrix's fans (GPU init draws
    per shard, and xavier on a [out/tp, in] shard would use the wrong bound)."""
    for sub in module.modules():
        part = _tp_partition(sub)
        w = getattr(sub, "weight", None)
        if part is None or w is None:
            continue
        out_f, in_f = w.shape
        out_f, in_f = (out_f * tp, in_f) if part == "column" else (out_f, in_f * tp)
        b = xavier_bound(in_f, out_f)
        with tensor_parallel.get_cuda_rng_tracker().fork():  # shards draw different values
            w.uniform_(-b, b)


# --------------------------------------------------------------------------- configs

def transformer_configs(cfg: Config) -> tuple[TransformerConfig, TransformerConfig]:
    """megatron-core configs for the trunk and for the prediction head."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    on_gpu = torch.cuda.is_available()
    dtype = torch_params_dtype(t.params_dtype)
    common = dict(
        tensor_model_parallel_size=p.tp,
        sequence_parallel=p.sequence_parallel,
        add_bias_linear=False,            # AIM: no biases in qkv/proj/fc1/fc2
        gated_linear_unit=False,
        activation_func=F.gelu,           # exact GELU
        normalization="LayerNorm",
        layernorm_epsilon=m.layernorm_eps,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_std,
        **official_init_methods(m),
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        attention_softmax_in_fp32=True,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        use_cpu_initialization=not on_gpu,
        calculate_per_token_loss=True,    # loss = mean over all non-prefix patches of the global batch
        batch_p2p_comm=p.batch_p2p_comm,
        recompute_granularity=p.recompute_granularity,
        recompute_method=p.recompute_method if p.recompute_granularity == "full" else None,
        recompute_num_layers=p.recompute_num_layers if p.recompute_granularity == "full" else None,
    )
    if p.recompute_granularity == "selective":
        common["recompute_modules"] = ["core_attn"]
    if t.fp8 is not None:  # TE layers only; select_backend refuses FP8 without them
        common.update(fp8=t.fp8, fp8_recipe=t.fp8_recipe, fp8_amax_history_len=t.fp8_amax_history_len,
                      fp8_amax_compute_algo="max", tp_only_amax_red=t.fp8_amax_reduction == "tp")
    trunk = TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_heads,
        ffn_hidden_size=m.ffn_hidden_size,
        kv_channels=m.hidden_size // m.num_heads,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vp,
        num_layers_in_last_pipeline_stage=p.trunk_layers_in_last_stage,
        num_layers_in_first_pipeline_stage=(
            None if p.trunk_layers_in_last_stage is None or p.pp > 2
            else m.num_layers - p.trunk_layers_in_last_stage),
        **common,
    )
    # The head lives wholly on the last pipeline stage; its "attention" is the identity.
    head_common = dict(common)
    if p.recompute_granularity == "selective":  # nothing to recompute selectively in the head
        head_common.update(recompute_granularity=None, recompute_modules=None)
    head = TransformerConfig(
        num_layers=m.head_num_layers,
        hidden_size=m.head_hidden_size,
        num_attention_heads=p.tp,
        ffn_hidden_size=m.head_ffn_hidden_size,
        pipeline_model_parallel_size=1,
        **head_common,
    )
    return trunk, head


# --------------------------------------------------------------------------- fixed positions

def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[len(positions), dim]: first half sin, second half cos, omega_i = 10000^(-i/(dim/2))."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = positions.double()[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """[grid*grid, dim] MAE-style 2D sin-cos in raster order: first dim/2 column, then row."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1)
    return emb.float()


# --------------------------------------------------------------------------- masks and loss

def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[b, C, H, W] -> [b, N, patch*patch*C] in raster order, values ordered (ph, pw, c)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def normalized_targets(images: torch.Tensor, patch: int, eps: float = 1e-6) -> torch.Tensor:
    """Each patch normalized by its own mean and unbiased variance."""
    t = patchify(images.float(), patch)
    mean = t.mean(dim=-1, keepdim=True)
    var = t.var(dim=-1, keepdim=True, unbiased=True)
    return (t - mean) / (var + eps) ** 0.5


def pixel_targets(images: torch.Tensor, patch: int, normalize: bool = True) -> torch.Tensor:
    """Regression targets [b, N, patch_dim]: per-patch normalized pixels (AIM), or the input
    pixels as they are (already normalized by the dataset mean/std) with ``normalize=False``."""
    return normalized_targets(images, patch) if normalize else patchify(images.float(), patch)


def next_patch_errors(pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[b, N-1]: MSE (over patch values) of the prediction at i against target patch i+1."""
    return ((pred[:, :-1].float() - targets[:, 1:]) ** 2).mean(dim=-1)


def loss_mask(prefix_len: torch.Tensor, num_patches: int) -> torch.Tensor:
    """[b, N-1] float: 1 where the target patch i+1 is not in the prefix."""
    target_idx = torch.arange(1, num_patches, device=prefix_len.device)
    return (target_idx[None, :] >= prefix_len[:, None]).float()


# --------------------------------------------------------------------------- modules

class PatchEmbed(torch.nn.Module):
    """Conv2d(C, D, p, stride p) then LayerNorm (official AIM v1 layout)."""

    def __init__(self, m: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.proj = torch.nn.Conv2d(m.in_channels, m.hidden_size, m.patch_size, m.patch_size,
                                    device=device, dtype=dtype)
        self.norm = torch.nn.LayerNorm(m.hidden_size, eps=m.layernorm_eps, device=device, dtype=dtype)
        with torch.no_grad():  # init as a linear layer over flattened patches (MAE)
            torch.nn.init.xavier_uniform_(self.proj.weight.view(m.hidden_size, -1))
            if m.init_method != "official":  # ml-l3m keeps Conv2d's default bias init
                torch.nn.init.zeros_(self.proj.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images).flatten(2).transpose(1, 2)  # [b, N, D]
        return self.norm(x)


class PredictionHead(MegatronModule):
    """Linear(D -> Dh) + fixed positions, blocks, LN, Linear(Dh -> patch_dim).

    The blocks are megatron TransformerLayers whose attention is the identity (each computes
    x = x + LN_1(x), then x = x + MLP(LN_2(x)), as ml-l3m), so tensor and sequence parallelism
    apply to them as to the trunk.
    """

    def __init__(self, m: ModelConfig, config: TransformerConfig, backend: str):
        super().__init__(config=config)
        dev, dtype = _init_device(config), config.params_dtype
        self.in_proj = torch.nn.Linear(m.hidden_size, m.head_hidden_size, device=dev, dtype=dtype)
        self.blocks = torch.nn.ModuleList(
            build_module(layer_spec(backend, with_attention=False), config=config, layer_number=i + 1)
            for i in range(m.head_num_layers))
        self.norm = torch.nn.LayerNorm(m.head_hidden_size, eps=m.layernorm_eps, device=dev, dtype=dtype)
        self.out_proj = torch.nn.Linear(m.head_hidden_size, m.patch_dim, device=dev, dtype=dtype)
        self.register_buffer("pos", sincos_2d(m.head_hidden_size, m.grid_size).to(device=dev),
                             persistent=False)
        for lin in (self.in_proj, self.out_proj):
            if m.init_method == "official":
                torch.nn.init.xavier_uniform_(lin.weight)
            else:
                torch.nn.init.normal_(lin.weight, std=m.init_std)
            torch.nn.init.zeros_(lin.bias)
        # Replicated over TP but fed only this rank's sequence chunk under SP: sum grads over TP.
        for module in (self.in_proj, self.norm, self.out_proj):
            for p in module.parameters():
                setattr(p, "sequence_parallel", config.sequence_parallel)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        # A plain ModuleList would be checkpointed as replicated; its layers are TP-sharded.
        state = {}
        for name, module in self.named_children():
            if name == "blocks":
                for i, block in enumerate(module):
                    state.update(block.sharded_state_dict(f"{prefix}blocks.{i}.", sharded_offsets, metadata))
            else:
                state.update(sharded_state_dict_default(
                    module, f"{prefix}{name}.", sharded_offsets, metadata,
                    tp_group=parallel_state.get_tensor_model_parallel_group()))
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = self.pos
        if self.config.sequence_parallel:
            chunk = pos.shape[0] // parallel_state.get_tensor_model_parallel_world_size()
            rank = parallel_state.get_tensor_model_parallel_rank()
            pos = pos[rank * chunk:(rank + 1) * chunk]
        x = self.in_proj(x) + pos[:, None, :].to(x.dtype)
        # megatron enters FP8 autocast only inside its TransformerBlock; the head's blocks are ours.
        with get_fp8_context(self.config):
            for block in self.blocks:
                x, _ = block(x, attention_mask=None)
        return self.out_proj(self.norm(x))


class AIMModel(MegatronModule):
    """One pipeline chunk of AIM. ``pre_process``/``post_process`` say whether this chunk holds
    the patch embedding (first stage) and the post-trunk norm + head + loss (last stage)."""

    def __init__(self, cfg: Config, trunk_config: TransformerConfig, head_config: TransformerConfig,
                 backend: str, pre_process: bool = True, post_process: bool = True,
                 vp_stage: Optional[int] = None):
        super().__init__(config=trunk_config)
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = False  # nothing tied across stages in AIM
        self.model_cfg = m = cfg.model
        self.pre_process, self.post_process, self.vp_stage = pre_process, post_process, vp_stage
        dev, dtype = _init_device(trunk_config), trunk_config.params_dtype
        if pre_process:
            self.patch_embed = PatchEmbed(m, device=dev, dtype=dtype)
            self.register_buffer("pos", sincos_2d(m.hidden_size, m.grid_size).to(device=dev),
                                 persistent=False)
        self.trunk = TransformerBlock(trunk_config, spec=layer_spec(backend, True, m.attention_kernel),
                                      post_layer_norm=False,
                                      pre_process=pre_process, post_process=post_process,
                                      vp_stage=vp_stage)
        if post_process:
            self.post_trunk_norm = torch.nn.LayerNorm(m.hidden_size, eps=m.layernorm_eps,
                                                      device=dev, dtype=dtype)
            for p in self.post_trunk_norm.parameters():
                setattr(p, "sequence_parallel", trunk_config.sequence_parallel)
            if m.head_type == "linear":  # ablation: one Linear(D -> patch_dim), no MLP blocks
                self.head = torch.nn.Linear(m.hidden_size, m.patch_dim, device=dev, dtype=dtype)
                torch.nn.init.xavier_uniform_(self.head.weight)
                torch.nn.init.zeros_(self.head.bias)
                for p in self.head.parameters():
                    setattr(p, "sequence_parallel", trunk_config.sequence_parallel)
            else:
                self.head = PredictionHead(m, head_config, backend)
        if m.init_method == "official" and not trunk_config.use_cpu_initialization and trunk_config.tensor_model_parallel_size > 1:
            reinit_official_tp_shards(self, trunk_config.tensor_model_parallel_size)

    def set_input_tensor(self, input_tensor) -> None:
        """Called by the pipeline schedule with the activations received from the previous stage."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.trunk.set_input_tensor(input_tensor)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images.to(self.patch_embed.proj.weight.dtype))
        x = (x + self.pos.to(x.dtype)).transpose(0, 1).contiguous()  # [s, b, D]
        if self.config.sequence_parallel:
            x = tensor_parallel.scatter_to_sequence_parallel_region(x)
        return x

    def forward(self, images: Optional[torch.Tensor], prefix_len: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """Returns, on the last stage, per-target-patch errors [b, N-1] (``loss_mask`` selects the
        ones that count); elsewhere the trunk activations for the next stage.
        ``prefix_len=None`` runs full bidirectional attention (evaluation)."""
        hidden = self.embed(images) if self.pre_process else None
        # The core attention takes the prefix lengths themselves (aim_megatron/models/attention.py).
        hidden = self.trunk(hidden, attention_mask=prefix_len)
        if not self.post_process:
            return hidden
        pred = self.head(self.post_trunk_norm(hidden))  # [s(/tp), b, patch_dim]
        if self.config.sequence_parallel:
            pred = tensor_parallel.gather_from_sequence_parallel_region(
                pred, tensor_parallel_output_grad=False)
        pred = pred.transpose(0, 1)  # [b, N, patch_dim]
        m = self.model_cfg
        return next_patch_errors(pred, pixel_targets(images, m.patch_size, m.target_norm))


    @torch.no_grad()
    def block_features(self, images: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """Frozen-trunk features for probing: the mean of the raw outputs (before the post-trunk
        norm) of the 0-based trunk ``layers``, with full bidirectional attention. [b, N, D].
        Needs the whole trunk on this rank (pipeline size 1); TP/SP work as in training."""
        if not (self.pre_process and self.post_process):
            raise RuntimeError("block_features needs pipeline size 1; load the checkpoint with "
                               "parallel.pp=1 (any saved layout can be loaded)")
        bad = [i for i in layers if not 0 <= i < len(self.trunk.layers)]
        if bad:
            raise ValueError(f"probe layers {bad} do not exist: the trunk has blocks "
                             f"0..{len(self.trunk.layers) - 1}")
        hidden, total = self.embed(images), None
        for i, layer in enumerate(self.trunk.layers):
            hidden, _ = layer(hidden, attention_mask=None)
            if i in layers:
                total = hidden if total is None else total + hidden
            if i >= max(layers):
                break
        total = total / len(set(layers))
        if self.config.sequence_parallel:
            total = tensor_parallel.gather_from_sequence_parallel_region(
                total, tensor_parallel_output_grad=False)
        return total.transpose(0, 1).float()


def build_model_chunk(cfg: Config, backend: str, vp_stage: Optional[int] = None) -> AIMModel:
    """The chunk of AIM this rank holds for virtual stage ``vp_stage`` (None without VP)."""
    trunk_config, head_config = transformer_configs(cfg)
    pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return AIMModel(cfg, trunk_config, head_config, backend, pre, post, vp_stage)
