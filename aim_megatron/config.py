"""Typed configuration: dataclasses loaded from YAML, overridable from the command line.

    cfg = load_config("examples/configs/aim_tiny.yaml", ["model.num_layers=4", "parallel.tp=2"])
    cfg.validate(world_size=4)

A YAML file has one mapping per section (``model``, ``parallel``, ``train``, ``data``); ``model.preset``
fills in the architecture of a named preset and any field given beside it overrides the preset.
Every invalid combination fails in ``validate`` with a message that names the fix.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what to change."""


# Official AIM v1 architectures (apple/ml-aim): patch 14, image 224, head_dim 128.
# The small presets keep AIM's structure at sizes a CPU can train.
PRESETS: dict[str, dict[str, Any]] = {
    "aim-600M": dict(hidden_size=1536, num_layers=24, num_heads=12),
    "aim-1B": dict(hidden_size=2048, num_layers=24, num_heads=16),
    "aim-3B": dict(hidden_size=3072, num_layers=24, num_heads=24),
    "aim-7B": dict(hidden_size=4096, num_layers=32, num_heads=32),
    # CPU presets: 28x28 Fashion-MNIST-sized inputs and a proportionally small head.
    "aim-tiny": dict(
        image_size=28, patch_size=4, in_channels=1, hidden_size=64, num_layers=4, num_heads=4,
        head_hidden_size=64, head_ffn_hidden_size=256, head_num_layers=2,
    ),
    "aim-small": dict(
        image_size=28, patch_size=4, in_channels=1, hidden_size=192, num_layers=6, num_heads=6,
        head_hidden_size=192, head_ffn_hidden_size=768, head_num_layers=3,
    ),
    "aim-base-cpu": dict(
        image_size=112, patch_size=14, in_channels=3, hidden_size=256, num_layers=8, num_heads=4,
        head_hidden_size=256, head_ffn_hidden_size=1024, head_num_layers=2,
    ),
}
# Prefix-causal attention kernels (aim_megatron/models/attention.py).
ATTENTION_KERNELS = ("auto", "varlen", "flex", "masked")
# Best probe layers per the paper/official code (1-based block indices 15..20 or 13..18).
BEST_PROBE_LAYERS = {"aim-600M": range(14, 20), "aim-7B": range(14, 20),
                     "aim-1B": range(12, 18), "aim-3B": range(12, 18)}


@dataclass
class ModelConfig:
    preset: Optional[str] = None
    image_size: int = 224
    patch_size: int = 14
    in_channels: int = 3
    hidden_size: int = 1536
    num_layers: int = 24
    num_heads: int = 12
    mlp_ratio: float = 4.0
    # ml-l3m pre-trains with eps 1e-5; the released ml-aim models use 1e-6, which
    # tools/convert_checkpoint.py import sets (docs/fidelity.md).
    layernorm_eps: float = 1e-5
    # Prediction head: residual MLP blocks on a fixed-width stream (same for every trunk size).
    head_hidden_size: int = 2048
    head_ffn_hidden_size: int = 8192
    head_num_layers: int = 12
    # Prefix length k is drawn uniformly per sample from [prefix_min, prefix_max];
    # prefix_max None means num_patches - 1 (FACTS: [1, 255] for 256 patches).
    prefix_min: int = 1
    prefix_max: Optional[int] = None
    # Ablations of the paper (Tables 3-4, docs/findings.md): prefix_min = prefix_max = 0 trains
    # plain causal attention; target_norm false regresses raw (dataset-normalized) pixels instead
    # of per-patch normalized ones; head_type "linear" replaces the MLP head with one Linear.
    target_norm: bool = True
    head_type: str = "mlp"
    # "official" (ml-l3m): xavier-uniform for every Linear (trunk and head; biases 0), the patch
    # conv xavier-uniform over its flattened weight with PyTorch's default bias init.
    # "megatron": normal(init_std), output projections scaled by 1/sqrt(2 * layers), biases 0.
    init_method: str = "official"
    init_std: float = 0.02
    # Layer implementation: "auto" picks Transformer Engine when it imports and a GPU is present.
    backend: str = "auto"
    # Prefix-causal attention kernel (aim_megatron/models/attention.py): "auto" (flash varlen on a GPU in
    # bf16, dense-mask SDPA otherwise), "varlen", "flex" or "masked" (the arbitrary-mask path).
    attention_kernel: str = "auto"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_channels

    @property
    def ffn_hidden_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def prefix_range(self) -> tuple[int, int]:
        hi = self.num_patches - 1 if self.prefix_max is None else self.prefix_max
        return self.prefix_min, hi


@dataclass
class ParallelConfig:
    tp: int = 1                      # tensor parallel size
    pp: int = 1                      # pipeline parallel size
    vp: Optional[int] = None         # virtual pipeline stages per pipeline rank (interleaved 1F1B)
    sequence_parallel: bool = False  # shard activations along the sequence inside TP regions
    # Trunk layers placed on the last pipeline stage, which also runs the prediction head
    # (~0.41B params, as much compute as a 0.6B trunk): fewer layers there balances the pipeline.
    trunk_layers_in_last_stage: Optional[int] = None
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # Activation recomputation: None, "full" (whole layers) or "selective" (core attention only).
    recompute_granularity: Optional[str] = None
    recompute_method: str = "uniform"   # for "full": "uniform" or "block"
    recompute_num_layers: int = 1
    # gloo pairs batched p2p messages wrongly for interleaved PP (FACTS, bug 1): keep False there.
    batch_p2p_comm: bool = False

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp)


@dataclass
class TrainConfig:
    micro_batch_size: int = 8
    global_batch_size: int = 64
    train_iters: int = 100
    seed: int = 1234
    # AdamW per the official recipe; lr is the value at batch 4096 and is scaled by batch/4096
    # when scale_lr is true.
    lr: float = 1e-3
    scale_lr: bool = True
    min_lr: float = 0.0
    weight_decay: float = 0.05
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_fraction: float = 0.025
    # "fp32", "bf16" (bf16 mixed precision, fp32 master weights) or "auto": bf16 where this machine
    # has fast bf16 matmuls (a bf16-capable GPU, or a CPU with AVX512-BF16/AMX), else fp32.
    # "auto" is settled where the run starts (resolve_params_dtype), on the machine that trains, so
    # checkpoints record the dtype used and a sweep planned on a login node keeps "auto".
    params_dtype: str = "fp32"
    # FP8 matmuls through Transformer Engine (H100/H200 only): null, "hybrid" (E4M3 forward,
    # E5M2 gradients) or "e4m3"; recipe "delayed" (amax history) or "tensorwise" (current scaling).
    fp8: Optional[str] = None
    fp8_recipe: str = "delayed"
    fp8_amax_history_len: int = 1024
    # FP8 amax reduction group: "tp_dp" = every rank holding the same layers (identical scales on
    # all data replicas), "tp" = tensor parallel only (less communication).
    fp8_amax_reduction: str = "tp_dp"
    # Run bookkeeping.
    output_dir: str = "runs/aim"
    log_interval: int = 10
    eval_interval: int = 0        # steps between validations; 0 = only at the end
    eval_iters: int = 4           # global batches per validation
    # Steps between checkpoints; 0 = only at the end; "auto" = the Young/Daly interval from the
    # failure rate and the save stall (scaling/checkpoint_interval.py), printed at start-up.
    save_interval: typing.Union[int, str] = 0
    keep_last: int = 3            # checkpoints kept (0 = all)
    # Checkpoints written in the background (megatron-core async save): training goes on while
    # the files are written, and `latest` moves once every rank's write is complete.
    async_save: bool = True
    # Spread the writes of data-parallel replicas over the data-parallel ranks.
    fully_parallel_save: bool = True
    # Spread the reads of data-parallel replicas over the data-parallel ranks on resume; each
    # rank reads its part and the parts are exchanged (megatron-core's fully parallel load).
    fully_parallel_load: bool = True
    # How the distributed optimizer's state is stored (megatron-core's formats). "fully_reshardable"
    # loads in any TP/PP/DP layout, but every save first gathers the state over the data-parallel
    # group (a stall an async save cannot hide). "dp_reshardable" writes each rank's own buffers:
    # no gather, no extra memory, but it resumes only with the same TP/PP (Megatron-LM's default).
    optimizer_checkpoint_format: str = "fully_reshardable"
    # Mean time between unexpected interruptions of one GPU, hours, for save_interval=auto and
    # the start-up summary; the default is Llama 3's (419 in 54 days on 16,384 GPUs).
    gpu_mtbf_hours: float = 54 * 24 * 16384 / 419
    max_bad_steps: int = 5        # consecutive NaN/inf steps before the run stops
    exit_after_steps: int = 0     # checkpoint and exit (code 0) after this many steps in this run
    # Seconds without progress on some rank before every rank dumps its stacks, names the stuck
    # rank(s) and exits 3 (requeue); 0 = off. Must exceed the slowest step, evaluation and save.
    hang_timeout_s: float = 0.0
    # Restarts after failures (a crashed or killed rank, a lost node, a hang) per Slurm job before
    # the sbatch scripts give up (training/restarts.py); 0 = never restart after a failure.
    max_restarts: int = 10
    # Seconds without a heartbeat after which another run's writer lock on output_dir is taken
    # over (docs/slurm.md); the heartbeat is refreshed every min(10, this / 5) s.
    lock_timeout_s: float = 300.0
    tensorboard: bool = True

    @property
    def effective_lr(self) -> float:
        return self.lr * self.global_batch_size / 4096 if self.scale_lr else self.lr


@dataclass
class DataConfig:
    # Training sources: WebDataset tar shards (a .tar file, a directory of them or a glob) or an
    # image folder; "synthetic" gives seeded random images (tests, benchmarks).
    train_sources: list[str] = field(default_factory=lambda: ["synthetic"])
    train_weights: Optional[list[float]] = None   # mixing weights, e.g. [0.8, 0.2] (DFN + IN-1k)
    val_sources: list[str] = field(default_factory=list)
    loader: str = "auto"          # "auto" (DALI when installed), "dali" or "torch"
    num_workers: int = 2
    crop_scale_min: float = 0.4   # RandomResizedCrop scale range (official recipe)
    crop_scale_max: float = 1.0
    hflip: bool = True
    color_jitter: bool = False    # ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8 when true
    # Per-channel normalization; None means ImageNet's for RGB and 0.5/0.5 for grayscale.
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    # Where a DALI pipeline runs: "auto" (GPU decode via "mixed" + GPU ops when CUDA is available,
    # else CPU with device_id=None), "cpu" or "gpu".
    dali_device: str = "auto"
    shuffle: bool = True          # reshuffle each rank's shard every epoch
    shuffle_buffer: int = 1024    # DALI shuffles through a buffer of this many samples per source

    def normalization(self, in_channels: int) -> tuple[list[float], list[float]]:
        if self.mean is not None and self.std is not None:
            return self.mean, self.std
        if in_channels == 3:
            return [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
        return [0.5] * in_channels, [0.5] * in_channels


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self, world_size: int = 1) -> "Config":
        validate(self, world_size)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading

def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is typing.Union:  # Optional[X], or a number that may also be a keyword ("auto")
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        if isinstance(value, str) and str in args:
            return value
        return _coerce(value, args[0], where)
    if origin is list:
        (item_type,) = typing.get_args(typ)
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if typ is int:
        # float('inf')/nan would raise OverflowError/ValueError in int(): check finiteness first.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


_SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "train": TrainConfig,
             "data": DataConfig}


def _section_values(name: str, values: Any) -> dict:
    """A section's mapping; ``None`` (``train:`` with nothing under it) is an empty one."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{name}' must be a mapping of field: value pairs, got "
                          f"{values!r}; write e.g. '{name}:' followed by indented 'field: value' lines")
    return dict(values)


def _build_section(name: str, values: dict) -> Any:
    cls = _SECTIONS[name]
    types_ = _field_types(cls)
    values = _section_values(name, values)
    if name == "model" and values.get("preset") is not None:
        preset = _coerce(values["preset"], str, "model.preset")
        if preset not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        values = {**PRESETS[preset], **values}
    kwargs = {}
    for key, value in values.items():
        if key not in types_:
            raise ConfigError(
                f"{name}.{key}: unknown field; valid fields are {', '.join(sorted(types_))}")
        kwargs[key] = _coerce(value, types_[key], f"{name}.{key}")
    return cls(**kwargs)


def _check_sections(data: Any, where: str) -> dict:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping of sections ({', '.join(_SECTIONS)}), "
                          f"got {type(data).__name__} {data!r:.60}")
    unknown = [k for k in data if k not in _SECTIONS]
    if unknown:
        # repr: keys may be numbers or null (`1: x`), which do not sort with strings.
        raise ConfigError(f"unknown config section(s) {', '.join(repr(k) for k in unknown)}; "
                          f"valid: {sorted(_SECTIONS)}")
    return data


def config_from_dict(data: dict) -> Config:
    data = _check_sections(data, "a config")
    return Config(**{name: _build_section(name, data.get(name)) for name in _SECTIONS})


def resolve_params_dtype(cfg: Config) -> None:
    """Settle train.params_dtype=auto for the machine this process runs on (at the start of a run)."""
    if cfg.train.params_dtype == "auto":
        cfg.train.params_dtype = fastest_params_dtype()


def torch_params_dtype(params_dtype: str):
    """The torch dtype of the weights; "auto" must have been settled by resolve_params_dtype."""
    import torch
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if params_dtype not in dtypes:
        raise ConfigError(f"train.params_dtype={params_dtype!r} is not settled to fp32 or bf16; "
                          f"call resolve_params_dtype(cfg) where the run starts")
    return dtypes[params_dtype]


def fastest_params_dtype() -> str:
    """What train.params_dtype=auto means here: "bf16" where bf16 matmuls are fast, else "fp32".

    A CUDA machine decides by its GPU (Ampere or newer); a CPU by oneDNN's bf16 support (AVX512-BF16
    or AMX), where bf16 trains ~2x faster than fp32. Without it CPU bf16 is emulated and slower."""
    import torch  # here, not at the top: reading a config should not need torch
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    cpu_check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        fast = bool(cpu_check()) if cpu_check is not None else False
    except RuntimeError:   # a torch built without oneDNN
        fast = False
    return "bf16" if fast else "fp32"


def yaml_problem(exc: yaml.YAMLError) -> str:
    """One line out of a YAML parser error: where, and what."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def parse_value(item: str, raw: str) -> Any:
    """A command-line override's value, parsed as YAML (so 2 is an int, [a, b] a list)."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({yaml_problem(exc)}); "
                          f"quote it or close its brackets") from None


def read_yaml_file(path: str | Path, what: str = "config file") -> Any:
    """Parsed YAML of a file, or a ConfigError that says what is wrong with the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory; pass a YAML file (see examples/configs/)")
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist; see examples/configs/ for examples")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not a text (UTF-8) file; pass a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read ({exc.strerror}); check its permissions") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML ({yaml_problem(exc)}); fix that line") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (value parsed as YAML) to a raw config dict."""
    data = {k: _section_values(k, v) for k, v in _check_sections(data, "a config").items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. parallel.tp=2")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or parts[0] not in _SECTIONS or not parts[1]:
            raise ConfigError(
                f"override {item!r}: key must be section.field with section in {sorted(_SECTIONS)}")
        data.setdefault(parts[0], {})[parts[1]] = parse_value(item, raw)
    return data


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    data: dict = {}
    if path is not None:
        data = read_yaml_file(path)
        if data is None:
            # Not an error (all defaults is a valid config), but never a silent one: the defaults
            # are the official aim-600M recipe, far too big for a laptop.
            logging.getLogger(__name__).warning(
                "config file %s is empty: every field takes its default (a %d-wide, %d-layer model "
                "at %dx%d); the start-up summary below says what that costs", path,
                ModelConfig.hidden_size, ModelConfig.num_layers, ModelConfig.image_size,
                ModelConfig.image_size)
        data = _check_sections(data, f"config file {path}")
    return config_from_dict(apply_overrides(data, overrides or []))


# --------------------------------------------------------------------------- validation

def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def trunk_layers_per_stage(model: ModelConfig, par: ParallelConfig) -> list[int]:
    """Trunk layers on each pipeline rank (summed over its virtual stages)."""
    if par.trunk_layers_in_last_stage is None:
        return [model.num_layers // par.pp] * par.pp
    rest = model.num_layers - par.trunk_layers_in_last_stage
    return [rest // (par.pp - 1)] * (par.pp - 1) + [par.trunk_layers_in_last_stage]


# Lower bounds per field ((bound, inclusive)); a field whose range depends on others is checked
# in validate() below, bools and choices by their type and choice lists.
_AT_LEAST: dict[str, tuple[float, bool]] = {
    "model.image_size": (1, True), "model.patch_size": (1, True), "model.in_channels": (1, True),
    "model.hidden_size": (1, True), "model.num_layers": (1, True), "model.num_heads": (1, True),
    "model.mlp_ratio": (0, False), "model.layernorm_eps": (0, False),
    "model.head_hidden_size": (1, True), "model.head_ffn_hidden_size": (1, True),
    "model.head_num_layers": (1, True), "model.init_std": (0, False),
    "parallel.tp": (1, True), "parallel.pp": (1, True), "parallel.vp": (1, True),
    "parallel.trunk_layers_in_last_stage": (0, True), "parallel.recompute_num_layers": (1, True),
    "train.micro_batch_size": (1, True), "train.global_batch_size": (1, True),
    "train.train_iters": (1, True), "train.seed": (0, True), "train.lr": (0, False),
    "train.min_lr": (0, True), "train.weight_decay": (0, True), "train.adam_beta1": (0, True),
    "train.adam_beta2": (0, True), "train.adam_eps": (0, False), "train.clip_grad": (0, True),
    "train.warmup_fraction": (0, True), "train.fp8_amax_history_len": (1, True),
    "train.log_interval": (1, True), "train.eval_interval": (0, True), "train.eval_iters": (1, True),
    "train.save_interval": (0, True), "train.keep_last": (0, True), "train.max_bad_steps": (1, True),
    "train.exit_after_steps": (0, True), "train.hang_timeout_s": (0, True),
    "train.max_restarts": (0, True),
    "train.lock_timeout_s": (0, False),
    "train.gpu_mtbf_hours": (0, False),
    "data.num_workers": (0, True), "data.crop_scale_min": (0, False), "data.shuffle_buffer": (1, True),
}
_HINTS = {  # what 0 or a negative value would have meant, where it is a likely mistake
    "train.global_batch_size": "images per optimizer step, a multiple of micro_batch_size * dp",
    "train.micro_batch_size": "images per forward/backward pass on one data-parallel rank",
    "model.num_heads": "a divisor of model.hidden_size, e.g. hidden_size / 64",
    "train.eval_interval": "0 means validate only at the end",
    "train.save_interval": "0 means checkpoint only at the end",
    "train.keep_last": "0 keeps every checkpoint",
    "train.clip_grad": "0 turns clipping off",
    "train.hang_timeout_s": "0 turns hang detection off",
    "train.max_restarts": "0 means a failure ends the job",
}
_BELOW = {"train.adam_beta1": 1.0, "train.adam_beta2": 1.0, "train.seed": 2 ** 32}


def _field_values(cfg: Config):
    """(section.field, value) for every field of every section."""
    for name in _SECTIONS:
        section = getattr(cfg, name)
        for f in dataclasses.fields(section):
            yield f"{name}.{f.name}", getattr(section, f.name)


def _check_ranges(cfg: Config) -> None:
    for key, value in _field_values(cfg):
        items = value if isinstance(value, list) else [value]
        for v in items:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{key}={value!r}: must be a finite number")
            if isinstance(v, str) and key.endswith(("_sources", "output_dir")) and not v.strip():
                raise ConfigError(f"{key}={value!r}: an empty path; name a directory, file or glob")
        if value is None or key not in _AT_LEAST or isinstance(value, str):  # keywords: validate()
            continue
        lo, inclusive = _AT_LEAST[key]
        hint = f" ({_HINTS[key]})" if key in _HINTS else ""
        if value < lo or (not inclusive and value == lo):
            raise ConfigError(f"{key}={value!r}: must be {'>=' if inclusive else '>'} {lo}{hint}; "
                              f"set {key} accordingly")
        if key in _BELOW and value >= _BELOW[key]:
            raise ConfigError(f"{key}={value!r}: must be below {_BELOW[key]}; set {key} accordingly")


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        shown = [("null" if c is None else repr(c)) for c in choices]
        raise ConfigError(f"{key}={value!r}: use {', '.join(shown[:-1])} or {shown[-1]}")


def validate(cfg: Config, world_size: int = 1) -> None:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    # Every field on its own first, so the checks of combinations below never divide by zero.
    _check_ranges(cfg)
    _check(m.preset is None or m.preset in PRESETS,
           f"model.preset {m.preset!r} is unknown; choose one of {sorted(PRESETS)}")
    _check_choice("model.backend", m.backend, ("auto", "te", "local"))
    _check_choice("model.attention_kernel", m.attention_kernel, ATTENTION_KERNELS)
    _check_choice("model.head_type", m.head_type, ("mlp", "linear"))
    _check_choice("model.init_method", m.init_method, ("official", "megatron"))
    _check_choice("parallel.recompute_granularity", p.recompute_granularity, (None, "full", "selective"))
    _check_choice("parallel.recompute_method", p.recompute_method, ("uniform", "block"))
    _check_choice("train.params_dtype", t.params_dtype, ("fp32", "bf16", "auto"))
    _check_choice("train.fp8", t.fp8, (None, "hybrid", "e4m3"))
    _check_choice("train.fp8_recipe", t.fp8_recipe, ("delayed", "tensorwise"))
    _check_choice("train.optimizer_checkpoint_format", t.optimizer_checkpoint_format,
                  ("fully_reshardable", "dp_reshardable"))
    _check_choice("train.fp8_amax_reduction", t.fp8_amax_reduction, ("tp_dp", "tp"))
    _check_choice("data.loader", cfg.data.loader, ("auto", "dali", "torch"))
    if isinstance(t.save_interval, str):
        _check(t.save_interval == "auto", f"train.save_interval={t.save_interval!r}: expected an integer "
                                          f"number of steps (0 = only at the end) or 'auto' (from the "
                                          f"failure rate)")
    _check_choice("data.dali_device", cfg.data.dali_device, ("auto", "cpu", "gpu"))

    # Model shape.
    _check(m.image_size % m.patch_size == 0,
           f"model.image_size={m.image_size} is not a multiple of model.patch_size={m.patch_size}; "
           f"use an image size such as {max(1, m.image_size // m.patch_size) * m.patch_size}")
    _check(m.num_patches >= 2, f"model.image_size={m.image_size} with model.patch_size={m.patch_size} "
                               f"gives {m.num_patches} patch(es); need at least 2 (image_size / "
                               f"patch_size >= 2)")
    _check(m.hidden_size % m.num_heads == 0,
           f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}")
    _check(m.hidden_size % 4 == 0 and m.head_hidden_size % 4 == 0,
           "model.hidden_size and model.head_hidden_size must be multiples of 4 (2D sin-cos positions)")
    _check(m.ffn_hidden_size >= 1, f"model.mlp_ratio={m.mlp_ratio} gives an MLP width of "
                                   f"{m.ffn_hidden_size}; raise model.mlp_ratio")
    lo, hi = m.prefix_range
    _check(0 <= lo <= hi <= m.num_patches - 1 and (lo >= 1 or hi == 0),
           f"model prefix range [{lo}, {hi}] must lie within [1, {m.num_patches - 1}] "
           f"(num_patches - 1), or be [0, 0] for plain causal attention; set model.prefix_min / "
           f"model.prefix_max accordingly")

    # Parallel layout.
    _check(world_size % (p.tp * p.pp) == 0,
           f"world size {world_size} is not divisible by tp*pp = {p.tp}*{p.pp} = {p.tp * p.pp}; "
           f"launch a multiple of {p.tp * p.pp} processes or change parallel.tp / parallel.pp")
    _check(m.num_heads % p.tp == 0,
           f"model.num_heads={m.num_heads} is not divisible by parallel.tp={p.tp}; "
           f"use a tp that divides {m.num_heads}")
    _check(m.ffn_hidden_size % p.tp == 0 and m.head_ffn_hidden_size % p.tp == 0,
           f"MLP widths ({m.ffn_hidden_size}, head {m.head_ffn_hidden_size}) must be divisible by "
           f"parallel.tp={p.tp}")
    if p.sequence_parallel:
        _check(p.tp > 1, "parallel.sequence_parallel needs parallel.tp > 1; set it false for tp=1")
        _check(m.num_patches % p.tp == 0,
               f"sequence parallel splits the {m.num_patches} patches over tp={p.tp} ranks, which "
               f"does not divide; pick tp dividing {m.num_patches} or disable sequence_parallel")
    if p.vp is not None:
        _check(p.pp > 1, "parallel.vp (virtual pipeline) needs parallel.pp > 1; unset vp for pp=1")
    vp = p.vp or 1
    if p.trunk_layers_in_last_stage is not None:
        _check(p.pp > 1 and p.vp is None,
               "parallel.trunk_layers_in_last_stage needs pp > 1 and no virtual pipeline")
        _check(0 <= p.trunk_layers_in_last_stage <= m.num_layers,
               f"parallel.trunk_layers_in_last_stage must be within [0, {m.num_layers}]")
        rest = m.num_layers - p.trunk_layers_in_last_stage
        _check(rest % (p.pp - 1) == 0 and rest // (p.pp - 1) >= 1,
               f"{rest} trunk layers left for the first {p.pp - 1} stage(s) do not divide evenly; "
               f"change parallel.trunk_layers_in_last_stage")
    else:
        _check(m.num_layers % (p.pp * vp) == 0,
               f"model.num_layers={m.num_layers} is not divisible by pp*vp = {p.pp}*{vp}; "
               f"choose pp and vp whose product divides {m.num_layers}, or set "
               f"parallel.trunk_layers_in_last_stage")
    if p.overlap_param_gather:
        _check(p.use_distributed_optimizer, "parallel.overlap_param_gather needs use_distributed_optimizer")

    # Batch and schedule.
    dp = p.data_parallel_size(world_size)
    _check(t.global_batch_size % (t.micro_batch_size * dp) == 0,
           f"train.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size*dp = "
           f"{t.micro_batch_size}*{dp}; use a multiple of {t.micro_batch_size * dp}")
    if t.fp8 is not None:
        _check(t.params_dtype == "bf16", "train.fp8 needs train.params_dtype=bf16 (FP8 GEMMs, bf16 "
                                         "activations, fp32 master weights)")
        _check_fp8_gemm_shapes(m, p, t)
    _check(t.warmup_fraction <= 1.0, f"train.warmup_fraction={t.warmup_fraction}: must be within [0, 1]")
    _check(t.min_lr <= t.effective_lr,
           f"train.min_lr={t.min_lr} exceeds the peak learning rate {t.effective_lr:.3g} (train.lr"
           f"{' scaled by global_batch_size/4096' if t.scale_lr else ''}); lower train.min_lr")

    d = cfg.data
    _check(len(d.train_sources) >= 1, "data.train_sources is empty; name shards, a folder or 'synthetic'")
    if d.train_weights is not None:
        _check(len(d.train_weights) == len(d.train_sources) and all(w > 0 for w in d.train_weights),
               f"data.train_weights needs one positive weight per source ({len(d.train_sources)})")
    _check((d.mean is None) == (d.std is None),
           "data.mean and data.std go together: set both (one value per channel) or neither")
    mean, std = d.normalization(m.in_channels)
    _check(len(mean) == m.in_channels,
           f"data.mean needs {m.in_channels} values (model.in_channels), got {len(mean)}")
    _check(len(std) == m.in_channels and min(std) > 0,
           f"data.std needs {m.in_channels} values (model.in_channels), each > 0, got {std}")
    _check(d.crop_scale_min <= d.crop_scale_max <= 1.0,
           f"data.crop_scale_max={d.crop_scale_max}: need data.crop_scale_min <= data.crop_scale_max <= 1")


# Transformer Engine v2.8 runs a GEMM in FP8 only when its input, viewed as [rows, in_features],
# has rows divisible by 8 and in_features divisible by 16, and its weight [out, in] likewise
# (assert_dim_for_fp8_exec, transformer_engine/pytorch/utils.py 433-441, called on every FP8
# forward by Linear, linear.py 168, and LayerNormLinear, layernorm_linear.py 150). Otherwise the
# first FP8 forward fails; these rules are checked at start instead.
FP8_ROWS, FP8_COLUMNS = 8, 16


def _check_fp8_gemm_shapes(m: ModelConfig, p: ParallelConfig, t: TrainConfig) -> None:
    """Every FP8 GEMM of one rank: the trunk's qkv and fc1 (column parallel: input [tokens, D],
    weights [3D/tp, D] and [F/tp, D]), proj and fc2 (row parallel: input [tokens*, D/tp] and
    [tokens*, F/tp], weights [D, D/tp] and [D, F/tp]), and the head blocks' fc1/fc2 alike with
    Dh and Fh. tokens = micro-batch x patches on this rank (patches / tp under sequence
    parallel, whose row-parallel inputs carry all patches: tokens* = tp x tokens)."""
    patches = m.num_patches // p.tp if p.sequence_parallel else m.num_patches
    rows = t.micro_batch_size * patches
    if rows % FP8_ROWS:
        multiple = FP8_ROWS // math.gcd(FP8_ROWS, patches)
        where = f"{m.num_patches} patches / tp={p.tp} (sequence parallel)" if p.sequence_parallel \
            else f"{m.num_patches} patches"
        raise ConfigError(
            f"train.fp8 needs the tokens per GEMM, train.micro_batch_size x {where} = "
            f"{t.micro_batch_size} x {patches} = {rows}, divisible by {FP8_ROWS} (Transformer Engine FP8 "
            f"GEMMs); use a train.micro_batch_size that is a multiple of {multiple}, or train.fp8=null")
    widths = [("model.hidden_size", m.hidden_size, 1), ("model.hidden_size", m.hidden_size, p.tp),
              ("the MLP width (model.hidden_size x model.mlp_ratio)", m.ffn_hidden_size, p.tp)]
    if m.head_type == "mlp":
        widths += [("model.head_hidden_size", m.head_hidden_size, 1),
                   ("model.head_ffn_hidden_size", m.head_ffn_hidden_size, p.tp)]
    for name, width, shards in widths:
        if width % shards or (width // shards) % FP8_COLUMNS:
            per_rank = f" / parallel.tp={shards} = {width / shards:g} per rank" if shards > 1 else ""
            raise ConfigError(
                f"train.fp8 needs {name} = {width}{per_rank} divisible by {FP8_COLUMNS} (Transformer "
                f"Engine FP8 GEMMs); use a multiple of {FP8_COLUMNS * shards}, or train.fp8=null")


def num_microbatches(cfg: Config, world_size: int) -> int:
    dp = cfg.parallel.data_parallel_size(world_size)
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)
