"""Convert between the official AIM v1 torch format and aim-megatron checkpoints.

Import an official state dict (.pth/.pt or .safetensors; released key names, qkv rows all q,
then k, then v) into a dist checkpoint for any layout (one process; torchrun works too):

    python tools/convert_checkpoint.py import --src aim_600m.pth \\
        --dst runs/aim600m model.preset=aim-600M parallel.tp=2 parallel.pp=2 \\
        [--config base.yaml] [--probe-out runs/aim600m/probe/official.safetensors --probe-layers best]

writes runs/aim600m/checkpoints/step_00000000 (+ latest): `aim-pretrain` continues from it with
train.output_dir=runs/aim600m and `aim-probe` probes it. The import streams: one process
(rank 0 of a torchrun job; the others have nothing to do) reads the file tensor by tensor and
writes a weights-only checkpoint, stored by global key, so it loads into any layout; the
optimizer and LR schedule start fresh from it. The config must describe the file's
architecture (the shapes are checked; the head count is not visible in the shapes: official
models use 128-dim heads). Released files hold no pre-training head: the imported one is freshly
initialised from train.seed, identically for every layout. The file's attentive-probe head
(head.*) is written as a probe checkpoint with --probe-out.

Export to the official format (one process, any source layout):

    python tools/convert_checkpoint.py export --src runs/x/checkpoints/step_00001000 \\
        --out aim.pth [--probe runs/x/probe/attentive-last/probe.safetensors]

writes the trunk (fp32) and, with --probe, our probe head as head.*; .safetensors also works.
Export reads the checkpoint one tensor at a time (aim_megatron/checkpoint/streaming.py): memory stays at
about one layer's largest tensor whatever the model size. ``import_official``/``export_official``
are the in-memory paths (a model in the target layout), kept as the reference the tests and
benchmarks/conversion_memory.py compare the streaming ones against.

Checkpoints of Apple's pre-training code (apple/ml-l3m) with --format l3m, both ways, the
pre-training head included (aim_megatron/checkpoint/l3m.py describes the format):

    python tools/convert_checkpoint.py import --format l3m \
        --src l3m_out/checkpoint_99999.pth --dst runs/aim600m model.preset=aim-600M parallel.tp=2
    python tools/convert_checkpoint.py export --format l3m --src runs/aim600m/checkpoints/step_00001000 \
        --out aim600m_l3m.pth

--src may also be the checkpoint_N/ directory (torch.distributed.checkpoint) or a torch.save'd
model state dict; the import is weights only like any other. Unlike the aim-v1 paths, l3m
conversion is not streamed: the import reads the whole l3m model state dict into memory, and the
export gathers every tensor before torch.save({"model": ...}) (ml-l3m's key order), which
ml-l3m's model.checkpoint loads.
"""
from __future__ import annotations

import argparse
import functools
import logging
import math
import os
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from aim_megatron import cli
from aim_megatron.checkpoint import checkpointer as checkpoint
from aim_megatron.checkpoint import l3m as l3m_format, streaming
from aim_megatron.checkpoint.official import (HEAD_PREFIX, RELEASED_LAYERNORM_EPS, TRUNK_PREFIXES, ConvertError,
                                              OfficialFile, check_trunk, megatron_to_reference, name_map,
                                              read_state_dict, reference_to_megatron, split_official)
from aim_megatron.config import Config, ModelConfig, load_config, resolve_params_dtype, validate
from aim_megatron.distributed import parallel
from aim_megatron.evaluation.probe import AttentiveProbe, ProbeConfig, load_probe, resolve_layers, save_probe
from aim_megatron.models.reference import PredictionHead

log = logging.getLogger("convert")

# Export reads the checkpoint into one process: a layout that holds the whole model.
SINGLE_PROCESS = ["parallel.tp=1", "parallel.pp=1", "parallel.vp=null", "parallel.sequence_parallel=false",
                  "parallel.trunk_layers_in_last_stage=null", "parallel.use_distributed_optimizer=false",
                  "parallel.overlap_grad_reduce=false", "parallel.overlap_param_gather=false",
                  "train.micro_batch_size=1", "train.fp8=null"]


# --------------------------------------------------------------------------- the pre-training head

def fresh_pretraining_head(m: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Pre-training head weights in reference names, drawn on CPU from ``seed`` with the
    configured init (model.init_method: official = xavier-uniform weights; megatron =
    normal(init_std), fc2 scaled by 1/sqrt(2 * blocks); norms 1, biases 0 in both), so every
    target layout imports the same head."""
    g = torch.Generator().manual_seed(seed)
    return {HEAD_PREFIX + name: _draw_head_tensor(name, shape, m, g) for name, shape in _head_shapes(m).items()}


def _head_shapes(m: ModelConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in PredictionHead(m).state_dict().items()}


def _draw_head_tensor(name: str, shape: torch.Size, m: ModelConfig, g: torch.Generator) -> torch.Tensor:
    if name.endswith("bias"):
        return torch.zeros(shape)
    if "norm" in name:
        return torch.ones(shape)
    if m.init_method == "official":
        bound = math.sqrt(6.0 / (shape[0] + shape[1]))
        return (2 * torch.rand(shape, generator=g) - 1) * bound
    std = m.init_std / math.sqrt(2 * m.head_num_layers) if name.endswith("fc2.weight") else m.init_std
    return std * torch.randn(shape, generator=g)


def lazy_pretraining_head(m: ModelConfig, seed: int) -> dict[str, callable]:
    """``fresh_pretraining_head`` one tensor at a time, in any order: the generator state before
    each tensor is recorded (one pass of draws, each dropped at once) and replayed on demand."""
    def replay(name: str, shape: torch.Size, state: torch.Tensor) -> torch.Tensor:
        g = torch.Generator()
        g.set_state(state)
        return _draw_head_tensor(name, shape, m, g)

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in _head_shapes(m).items():
        out[HEAD_PREFIX + name] = functools.partial(replay, name, shape, g.get_state())
        _draw_head_tensor(name, shape, m, g)  # advance g exactly as the eager version does
    return out


# --------------------------------------------------------------------------- import / export

def import_official(src: Path, dst: Path, cfg: Config, probe_out: Optional[Path] = None,
                    probe_layers: Optional[str] = None) -> Path:
    """Collective (run under torchrun with the target world size). Returns the checkpoint dir."""
    from aim_megatron.training.optim import build_scheduler
    if (dst / "checkpoints" / checkpoint.LATEST_FILE).exists():
        raise ConvertError(f"{dst} already holds checkpoints; import into a new --dst")
    trunk_sd, head_sd = split_official(read_state_dict(src))
    check_trunk(trunk_sd, cfg.model)
    probe, layers = _file_probe(src, head_sd, cfg.model, probe_out, probe_layers)
    full = reference_to_megatron({**trunk_sd, **fresh_pretraining_head(cfg.model, cfg.train.seed)},
                                 cfg.model)

    parallel.initialize(cfg)
    model = parallel.build_model(cfg)
    parallel.load_full_state_dict(model, full)
    optimizer = parallel.build_optimizer(cfg, model)  # after loading: bf16 copies its main params
    scheduler = build_scheduler(cfg, optimizer)
    out = checkpoint.save(dst / "checkpoints", 0, cfg, model, optimizer, scheduler,
                          {"step": 0, "skipped_steps": 0})
    if dist.get_rank() == 0:
        log.info("imported %s (%d trunk tensors) into %s (tp=%d pp=%d, %d processes); the "
                 "pre-training head is freshly initialised", src, len(trunk_sd), out,
                 cfg.parallel.tp, cfg.parallel.pp, dist.get_world_size())
        _write_probe(probe, layers, probe_out, head_sd, cfg.model)
    dist.barrier()
    return out


def _file_probe(src: Path, head_sd: dict, m: ModelConfig, probe_out: Optional[Path],
                probe_layers: Optional[str]) -> tuple[Optional[AttentiveProbe], Optional[list[int]]]:
    """The file's attentive probe for --probe-out, checked before anything is written."""
    if probe_out is None:
        return None, None
    if not head_sd:
        raise ConvertError(f"--probe-out given but {src} holds no head.* probe weights")
    if probe_layers is None:
        raise ConvertError("--probe-out needs --probe-layers (last, best or indices such as 14,15,16): "
                           "the file does not record which blocks its probe was trained on")
    layers = resolve_layers(probe_layers, m)
    probe = AttentiveProbe(m.hidden_size, m.num_heads, head_sd["linear.weight"].shape[0])
    try:
        probe.load_state_dict(head_sd)
    except RuntimeError as exc:
        raise ConvertError(f"head.* of {src} is not an attentive probe for this trunk: {exc}") from exc
    return probe, layers


def _write_probe(probe: Optional[AttentiveProbe], layers, probe_out: Optional[Path], head_sd: dict,
                 m: ModelConfig) -> None:
    if probe is not None:
        probe_out.parent.mkdir(parents=True, exist_ok=True)
        save_probe(probe_out, probe, ProbeConfig(kind="attentive", layers=layers), layers, m, class_names=[])
        log.info("wrote the file's probe head (layers %s) to %s", layers, probe_out)
    elif head_sd:
        log.info("the file's head.* probe weights were not imported (pass --probe-out)")


def import_streamed(src: Path, dst: Path, cfg: Config, probe_out: Optional[Path] = None,
                    probe_layers: Optional[str] = None, fmt: str = "aim-v1") -> Path:
    """One process, any target layout: a weights-only checkpoint written tensor by tensor from
    the file, with the pre-training head drawn as ``import_official`` draws it. ``fmt="l3m"``:
    an ml-l3m checkpoint, read whole into memory, whose pre-training head is imported too."""
    if (dst / "checkpoints" / checkpoint.LATEST_FILE).exists():
        raise ConvertError(f"{dst} already holds checkpoints; import into a new --dst")
    if fmt == "l3m":
        return _import_l3m(src, dst, cfg)
    source = OfficialFile(src)
    trunk_meta, head_meta = split_official(source.meta)
    check_trunk(trunk_meta, cfg.model)
    head_sd = {k: source.get(HEAD_PREFIX + k) for k in head_meta}  # the probe: small
    probe, layers = _file_probe(src, head_sd, cfg.model, probe_out, probe_layers)
    fresh = lazy_pretraining_head(cfg.model, cfg.train.seed)
    official = name_map(cfg.model)

    def produce(name: str) -> torch.Tensor:
        ref = official[name]
        t = fresh[ref]() if ref in fresh else source.get(ref)
        return reference_to_megatron({ref: t}, cfg.model, strict=False)[name]  # qkv rows per head

    out = streaming.save_weights_only(dst / "checkpoints", 0, cfg, produce, {"step": 0, "skipped_steps": 0})
    log.info("imported %s (%d trunk tensors) into %s as weights only (loads at any layout; this "
             "config: tp=%d pp=%d); the pre-training head is freshly initialised", src, len(trunk_meta),
             out, cfg.parallel.tp, cfg.parallel.pp)
    _write_probe(probe, layers, probe_out, head_sd, cfg.model)
    return out


def _import_l3m(src: Path, dst: Path, cfg: Config) -> Path:
    """An ml-l3m checkpoint (trunk and pre-training head) as a weights-only checkpoint; the l3m
    model state dict is held in memory (not streamed), each megatron tensor made from it."""
    ref = l3m_format.to_reference(l3m_format.read(src), cfg.model)
    trunk = {k: v for k, v in ref.items() if k.startswith(TRUNK_PREFIXES)}
    check_trunk(trunk, cfg.model)
    official = name_map(cfg.model)

    def produce(name: str) -> torch.Tensor:
        r = official[name]
        return reference_to_megatron({r: ref[r]}, cfg.model, strict=False)[name]

    out = streaming.save_weights_only(dst / "checkpoints", 0, cfg, produce, {"step": 0, "skipped_steps": 0})
    log.info("imported %s (%d trunk tensors) into %s as weights only (loads at any layout; this "
             "config: tp=%d pp=%d); the pre-training head is the file's", src, len(trunk), out,
             cfg.parallel.tp, cfg.parallel.pp)
    return out


def export_l3m(src: Path, out: Path) -> tuple[int, int]:
    """An ml-l3m model state dict (trunk and pre-training head) of a checkpoint, in ml-l3m's key
    order, written as torch.save({"model": ...}); the tensors are gathered in memory first."""
    cfg = checkpoint.config_from_checkpoint(src)
    l3m_format.check_config(cfg.model)
    slots = streaming.checkpoint_slots(cfg)
    reader = streaming.DistCheckpointReader(src, slots)
    official = name_map(cfg.model)
    got = reader.read(list(official))
    ref = megatron_to_reference(got, cfg.model, strict=False)
    sd = l3m_format.from_reference({k: v.float() for k, v in ref.items()}, cfg.model)
    l3m_format.write(sd, out)
    return len(sd), sum(v.numel() for v in sd.values())


def export_streamed(src: Path, out: Path, probe_path: Optional[Path] = None) -> tuple[int, int]:
    """``export_official`` written tensor by tensor: one process, memory of about one tensor."""
    cfg = checkpoint.config_from_checkpoint(src)
    probe_sd = _probe_tensors(probe_path, cfg, src)
    return streaming.export_checkpoint(src, out, "official", lambda n: n.startswith(TRUNK_PREFIXES), probe_sd)


def _probe_tensors(probe_path: Optional[Path], cfg: Config, src: Path) -> dict[str, torch.Tensor]:
    if probe_path is None:
        return {}
    probe, record = load_probe(probe_path)
    theirs = (record["model"]["hidden_size"], record["model"]["num_heads"])
    if theirs != (cfg.model.hidden_size, cfg.model.num_heads):
        raise ConvertError(f"probe {probe_path} was trained on a width-{theirs[0]}, {theirs[1]}-head "
                           f"trunk; {src} has width {cfg.model.hidden_size}, {cfg.model.num_heads} heads")
    return {HEAD_PREFIX + k: v for k, v in probe.state_dict().items()}


def export_official(src: Path, probe_path: Optional[Path] = None, fmt: str = "aim-v1") -> dict[str, torch.Tensor]:
    """Official-format tensors of a checkpoint's trunk (+ a probe head), on every rank;
    ``fmt="l3m"``: an ml-l3m model state dict (trunk and pre-training head)."""
    cfg = checkpoint.config_from_checkpoint(src, SINGLE_PROCESS)
    if fmt == "l3m":
        l3m_format.check_config(cfg.model)
    probe_sd = _probe_tensors(probe_path, cfg, src)
    parallel.initialize(cfg)
    model = parallel.build_model(cfg, wrap_ddp=False)
    checkpoint.load(src, cfg, model)
    official = megatron_to_reference(parallel.gather_full_state_dict(model), cfg.model)
    if fmt == "l3m":
        return l3m_format.from_reference(official, cfg.model)
    official = {k: v.contiguous() for k, v in official.items() if k.startswith(TRUNK_PREFIXES)}
    return {**official, **probe_sd}


def _looks_like_weights(path: Path) -> bool:
    """A cheap look at the first bytes (a 7B file is not read twice): a torch.save zip or legacy
    pickle, or a safetensors JSON header."""
    with open(path, "rb") as f:
        head = f.read(8)
        if path.suffix == ".safetensors":
            if len(head) < 8:
                return False
            n = int.from_bytes(head, "little")
            return 2 <= n <= 100_000_000 and f.read(1) == b"{"
    return head[:2] == b"PK" or head[:1] == b"\x80"


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    ap = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    i = sub.add_parser("import", help="official AIM v1 state dict -> aim-megatron checkpoint")
    i.add_argument("--src", type=Path, required=True,
                   help="official .pth/.pt or .safetensors; with --format l3m: checkpoint_N.pth or checkpoint_N/")
    i.add_argument("--format", dest="fmt", choices=("aim-v1", "l3m"), default="aim-v1",
                   help="aim-v1: released AIM v1 weights (default); l3m: an apple/ml-l3m checkpoint")
    i.add_argument("--dst", type=Path, required=True, help="run directory (checkpoints/ inside)")
    i.add_argument("--config", help="YAML config of the model/run (see examples/configs/)")
    i.add_argument("--probe-out", type=Path, help="write the file's head.* probe here")
    i.add_argument("--probe-layers", help="blocks that probe reads: last, best or 14,15,16,...")
    i.add_argument("overrides", nargs="*", help="e.g. model.preset=aim-600M parallel.tp=2")
    e = sub.add_parser("export", help="aim-megatron checkpoint -> official AIM v1 state dict")
    e.add_argument("--src", type=Path, required=True, help="a step_* checkpoint directory")
    e.add_argument("--out", type=Path, required=True, help=".pth or .safetensors")
    e.add_argument("--probe", type=Path,
                   help="probe.safetensors (or an older probe.pt) written by aim-probe: exported as head.*")
    e.add_argument("--format", dest="fmt", choices=("aim-v1", "l3m"), default="aim-v1",
                   help="aim-v1: released AIM v1 trunk (default); l3m: apple/ml-l3m model state dict")
    args = ap.parse_args(argv)

    def check_args() -> None:
        """Paths checked before any process group or model exists."""
        if args.command == "import":
            if args.fmt == "l3m":
                if args.probe_out is not None or args.probe_layers is not None:
                    raise ConvertError("--probe-out/--probe-layers: ml-l3m pre-training checkpoints hold no "
                                       "probe head; drop them (aim-probe trains one)")
                if not args.src.exists():
                    raise ConvertError(f"--src {args.src}: no such file or directory; pass ml-l3m's "
                                       f"checkpoint_N.pth or checkpoint_N/ from its output_dir")
                return
            if args.src.is_dir():
                raise ConvertError(f"--src {args.src} is a directory; an ml-l3m checkpoint_N/ directory "
                                   f"imports with --format l3m, released weights are one .pth/.safetensors file")
            if not args.src.is_file():
                raise ConvertError(f"--src {args.src}: no such file; pass the official AIM v1 .pth/.pt "
                                   f"or .safetensors file")
            if not _looks_like_weights(args.src):
                raise ConvertError(f"--src {args.src}: neither a torch.save file nor .safetensors; pass "
                                   f"the official AIM v1 .pth/.pt or .safetensors file")
            if args.probe_layers is not None and args.probe_out is None:
                raise ConvertError("--probe-layers needs --probe-out (where to write the file's probe)")
            return
        if not args.src.is_dir():
            raise ConvertError(f"--src {args.src}: not a checkpoint directory; pass RUN/checkpoints/step_*")
        if args.out.suffix not in (".pth", ".pt", ".safetensors") or args.out.is_dir():
            raise ConvertError(f"--out {args.out}: name a .pth, .pt or .safetensors file")
        if args.fmt == "l3m" and args.out.suffix == ".safetensors":
            raise ConvertError(f"--out {args.out}: ml-l3m loads torch.save files; name a .pth or .pt file")
        if args.fmt == "l3m" and args.probe is not None:
            raise ConvertError("--probe: ml-l3m's AIM v1 model has no probe head; export without --probe")
        if args.probe is not None and not args.probe.is_file():
            raise ConvertError(f"--probe {args.probe}: no such file; pass the probe.safetensors aim-probe wrote")

    def body() -> None:
        if int(os.environ.get("RANK", 0)) != 0:  # one process does it all; under torchrun, rank 0
            return
        check_args()
        if args.command == "import":
            # Released AIM v1 models use LayerNorm eps 1e-6 (pre-training: 1e-5); an override wins.
            # ml-l3m pre-trains with eps 1e-5, the default.
            eps = [RELEASED_LAYERNORM_EPS] if args.fmt == "aim-v1" else []
            cfg = load_config(args.config, [*eps, *args.overrides, f"train.output_dir={args.dst}"])
            resolve_params_dtype(cfg)   # "auto": recorded in the checkpoint as this machine's dtype
            # The target layout must be one that can run (the import itself needs one process).
            validate(cfg, int(os.environ.get("WORLD_SIZE", cfg.parallel.tp * cfg.parallel.pp)))
            import_streamed(args.src, args.dst, cfg, args.probe_out, args.probe_layers, args.fmt)
        elif args.fmt == "l3m":
            tensors, params = export_l3m(args.src, args.out)
            log.info("exported %d ml-l3m tensors (%.1fM parameters) to %s", tensors, params / 1e6, args.out)
        else:
            tensors, params = export_streamed(args.src, args.out, args.probe)
            log.info("exported %d tensors (%.1fM parameters) to %s", tensors, params / 1e6, args.out)

    # ValueError covers ConvertError and ConfigError.
    return parallel.run_cli("convert_checkpoint", body,
                            (ValueError, checkpoint.CheckpointError, FileNotFoundError))
