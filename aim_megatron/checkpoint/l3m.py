"""Checkpoints of Apple's pre-training code (apple/ml-l3m, AIM v1) <-> the released AIM v1 names.

``aim-convert --format l3m`` (``aim_megatron/checkpoint/convert.py``) uses this module;
``aim_megatron/checkpoint/official.py`` maps the released names to megatron-core's. What ml-l3m
writes, as read from its code (configs/aimv1/001_aim_v1_600M.yaml and the modules it names under
src/l3m/):

* The model is ``MetaModel(preprocessor=MultiBlock([ViTPreprocessor, FlexAttnPrefixAttentionMaskBuilder]),
  trunk=Transformer, postprocessor=Identity, head=SimpleDecoder)``; its state dict holds (D trunk
  width, H head width (2048), N patches, p patch size, C channels)::

    preprocessor.blocks.0.patchifier.proj.{weight [D, C, p, p], bias [D]}   PatchEmbed's Conv2d
    preprocessor.blocks.0.patchifier.norm.{weight, bias} [D]                LayerNormFP32 (eps 1e-5)
    preprocessor.blocks.0.pos_embed [1, N, D]          fixed 2D sin-cos, a Parameter without grad
    trunk.blocks.{i}.norm_1.{weight, bias}, trunk.blocks.{i}.norm_2.{weight, bias} [D]
    trunk.blocks.{i}.attn.{q_proj, k_proj, v_proj, proj}.weight [D, D]      GenericAttention, no biases
    trunk.blocks.{i}.mlp.fc1.weight [4D, D], trunk.blocks.{i}.mlp.fc2.weight [D, 4D]   MLP, no biases
    trunk.post_trunk_norm.{weight, bias} [D]
    head.decoder_projection.{weight [H, D], bias [H]}
    head.decoder_pos_embed [1, N, H]                   fixed 2D sin-cos, a Parameter without grad
    head.decoder_blocks.{j}.norm_1.*, .norm_2.* [H], .mlp.fc1.weight [4H, H], .mlp.fc2.weight [H, 4H]
                                                       (attention = GenericIdentity: no weights)
    head.decoder_norm.{weight, bias} [H]
    head.decoder_pred.{weight [p*p*C, H], bias [p*p*C]}

  The positions are computed in float32 (omega = 1 / 10000^(i / (d/2)), sin then cos of
  position * omega; first half the column, second half the row).
* Checkpoints (src/l3m/evaluator.py ``maybe_eval_and_save_ckpt``, src/l3m/helpers/checkpoint.py
  ``DistributedCheckpointUtils``): every ``ckpt_save_freq`` iterations and at the end,
  ``OUTPUT/checkpoint_{iteration}/`` (a torch.distributed.checkpoint directory of
  ``{"model", "optimizer"}`` from ``get_state_dict``, plus ``other.pth`` with cfg, iteration, lr
  scheduler, loss scaler) and, by default (``save_full_checkpoint_on_main``),
  ``OUTPUT/checkpoint_{iteration}.pth``: one ``torch.save`` of ``{"model": full state dict,
  "optimizer", "cfg" (an OmegaConf object), "iteration", "lr_scheduler", "loss_scaler",
  "data_loader_train"}``. FSDP2 keeps fp32 master weights (bf16 is the compute dtype only), so the
  weights are fp32. ``model.checkpoint`` in an l3m config loads a ``torch.save`` file and takes
  its ``"model"`` entry when there is one (``prepare_and_load_checkpoints``, strict=False).

Reading any of these files runs none of the pickled code: everything but tensors and plain
containers (the OmegaConf config, the optimizer's DTensor meshes) is read as an inert stand-in
and dropped. The optimizer state, lr schedule and iteration are not converted.
"""
from __future__ import annotations

import os
import pickle
import types
import warnings
from pathlib import Path

import numpy as np
import torch

from aim_megatron.checkpoint import pickled_files
from aim_megatron.config import ModelConfig
from aim_megatron.checkpoint.official import state_dict_mismatch

PRE = "preprocessor.blocks.0."
POS_KEYS = (PRE + "pos_embed", "head.decoder_pos_embed")
# Wrapper segments that torch.compile / activation checkpointing put into module names.
_WRAPPER_SEGMENTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")
# How far the file's fixed positions may be from ml-l3m's formula (they are recomputed).
POS_TOLERANCE = 1e-5


class L3MFormatError(ValueError):
    """A file or configuration that does not fit the ml-l3m format; the message names the fix."""


# --------------------------------------------------------------------------- names and shapes

def _block_names(prefix: str) -> list[str]:
    return [prefix + n for n in ("norm_1.weight", "norm_1.bias", "norm_2.weight", "norm_2.bias",
                                 "mlp.fc1.weight", "mlp.fc2.weight")]


def name_pairs(m: ModelConfig) -> list[tuple[str, str]]:
    """(ml-l3m name, released/reference name) of every weight but q/k/v and the positions."""
    pairs = [(PRE + "patchifier." + n, "preprocessor.patchifier." + n)
             for n in ("proj.weight", "proj.bias", "norm.weight", "norm.bias")]
    for i in range(m.num_layers):
        a = f"trunk.blocks.{i}."
        pairs += [(n, n) for n in _block_names(a)] + [(a + "attn.proj.weight", a + "attn.proj.weight")]
    pairs += [("trunk.post_trunk_norm." + n, "trunk.post_trunk_norm." + n) for n in ("weight", "bias")]
    for theirs, ours in (("decoder_projection", "in_proj"), ("decoder_norm", "norm"),
                         ("decoder_pred", "out_proj")):
        pairs += [(f"head.{theirs}.{n}", f"head.{ours}.{n}") for n in ("weight", "bias")]
    for j in range(m.head_num_layers):
        pairs += list(zip(_block_names(f"head.decoder_blocks.{j}."), _block_names(f"head.blocks.{j}.")))
    return pairs


def l3m_sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """[1, grid*grid, dim] fixed positions computed as ml-l3m computes them (float32 numpy)."""
    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(d // 2, dtype=np.float32)
        omega /= d / 2.0
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    coords = np.arange(grid, dtype=np.float32)
    cols, rows = np.meshgrid(coords, coords)  # cols varies along a row: raster order
    emb = np.concatenate([one_d(dim // 2, cols), one_d(dim // 2, rows)], axis=1)
    return torch.from_numpy(emb).float().unsqueeze(0)


def expected_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key of an ml-l3m AIM v1 model state dict for this configuration, with its shape, in
    the order ml-l3m's ``state_dict()`` lists them (a module's own parameters first, then its
    children in the order they were assigned)."""
    d, f, h, hf, n = m.hidden_size, m.ffn_hidden_size, m.head_hidden_size, m.head_ffn_hidden_size, m.num_patches

    def block(prefix: str, width: int, ffn: int, attention: dict) -> dict:
        # Block.__init__ assigns attn, norm_1, mlp, norm_2 in that order.
        return {**attention, prefix + "norm_1.weight": (width,), prefix + "norm_1.bias": (width,),
                prefix + "mlp.fc1.weight": (ffn, width), prefix + "mlp.fc2.weight": (width, ffn),
                prefix + "norm_2.weight": (width,), prefix + "norm_2.bias": (width,)}

    shapes = {PRE + "pos_embed": (1, n, d),
              PRE + "patchifier.proj.weight": (d, m.in_channels, m.patch_size, m.patch_size),
              PRE + "patchifier.proj.bias": (d,), PRE + "patchifier.norm.weight": (d,),
              PRE + "patchifier.norm.bias": (d,)}
    for i in range(m.num_layers):
        a = f"trunk.blocks.{i}."
        shapes.update(block(a, d, f, {a + f"attn.{p}.weight": (d, d)
                                      for p in ("q_proj", "k_proj", "v_proj", "proj")}))
    shapes.update({"trunk.post_trunk_norm.weight": (d,), "trunk.post_trunk_norm.bias": (d,),
                   "head.decoder_pos_embed": (1, n, h),
                   "head.decoder_projection.weight": (h, d), "head.decoder_projection.bias": (h,)})
    for j in range(m.head_num_layers):
        shapes.update(block(f"head.decoder_blocks.{j}.", h, hf, {}))
    shapes.update({"head.decoder_norm.weight": (h,), "head.decoder_norm.bias": (h,),
                   "head.decoder_pred.weight": (m.patch_dim, h), "head.decoder_pred.bias": (m.patch_dim,)})
    return shapes


def describe(sd: dict[str, torch.Tensor]) -> str:
    """The architecture an ml-l3m state dict's shapes describe, as config overrides."""
    try:
        proj = sd[PRE + "patchifier.proj.weight"]
        width, channels, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
        patches = sd[PRE + "pos_embed"].shape[1]
        depth = len({k.split(".")[2] for k in sd if k.startswith("trunk.blocks.")})
        head_w = sd["head.decoder_projection.weight"].shape[0]
        head_depth = len({k.split(".")[2] for k in sd if k.startswith("head.decoder_blocks.")})
        head_ffn = sd["head.decoder_blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, IndexError, AttributeError):
        return "an architecture this tool cannot read (AIM v1 keys missing)"
    image = round(patches ** 0.5) * patch
    return (f"model.image_size={image} model.patch_size={patch} model.in_channels={channels} "
            f"model.hidden_size={width} model.num_layers={depth} model.head_hidden_size={head_w} "
            f"model.head_ffn_hidden_size={head_ffn} model.head_num_layers={head_depth} "
            f"(and the matching model.num_heads: the shapes do not show it)")


def check_config(m: ModelConfig) -> None:
    if m.head_type != "mlp":
        raise L3MFormatError(f"model.head_type={m.head_type}: ml-l3m's AIM v1 has the MLP head "
                             f"(SimpleDecoder); use model.head_type=mlp")


def check(sd: dict[str, torch.Tensor], m: ModelConfig) -> None:
    """Every key of the configured model present with its shape, and nothing else."""
    check_config(m)
    expected = expected_shapes(m)
    if "trunk.blocks.0.attn.qkv.weight" in sd or "preprocessor.patchifier.proj.weight" in sd:
        raise L3MFormatError("the file holds released AIM v1 names (fused attn.qkv, "
                             "preprocessor.patchifier.*), not ml-l3m's; import it with --format aim-v1")
    shape, keys = state_dict_mismatch(sd, expected)
    if shape:
        raise L3MFormatError(f"{shape}; the file fits {describe(sd)}")
    if keys:
        raise L3MFormatError(f"the file is not the configured ml-l3m AIM v1 ({m.num_layers} trunk blocks, "
                             f"{m.head_num_layers} head blocks, no biases in attention or MLP): "
                             f"{keys}; the file fits {describe(sd)}")


# --------------------------------------------------------------------------- conversion

def to_reference(sd: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """ml-l3m state dict -> released/reference names (trunk and pre-training head); q, k and v
    become one qkv weight with rows q, k, v. The fixed positions are checked, not carried (the
    model computes them)."""
    check(sd, m)
    for key, dim in zip(POS_KEYS, (m.hidden_size, m.head_hidden_size)):
        diff = (sd[key].float() - l3m_sincos_2d(dim, m.grid_size)).abs().max().item()
        if not diff <= POS_TOLERANCE:
            raise L3MFormatError(f"{key} differs from AIM v1's fixed 2D sin-cos positions by {diff:.3g} "
                                 f"(tolerance {POS_TOLERANCE}): the model was not trained with "
                                 f"pos_embed_type: sincos and cannot be imported")
    out = {ref: sd[theirs] for theirs, ref in name_pairs(m)}
    for i in range(m.num_layers):
        a = f"trunk.blocks.{i}.attn."
        out[a + "qkv.weight"] = torch.cat([sd[a + "q_proj.weight"], sd[a + "k_proj.weight"],
                                           sd[a + "v_proj.weight"]], dim=0)
    return out


def from_reference(ref: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """Released/reference names (trunk and pre-training head) -> an ml-l3m model state dict, in
    ml-l3m's module order, with the fixed positions as ml-l3m computes them."""
    check_config(m)
    pairs = dict((ours, theirs) for theirs, ours in name_pairs(m))
    pos = {POS_KEYS[0]: l3m_sincos_2d(m.hidden_size, m.grid_size),
           POS_KEYS[1]: l3m_sincos_2d(m.head_hidden_size, m.grid_size)}
    values: dict[str, torch.Tensor] = {}
    for ours, theirs in pairs.items():
        if ours not in ref:
            raise KeyError(f"{ours} missing from the reference state dict")
        values[theirs] = ref[ours]
    for i in range(m.num_layers):
        a = f"trunk.blocks.{i}.attn."
        q, k, v = ref[a + "qkv.weight"].chunk(3, dim=0)
        values.update({a + "q_proj.weight": q, a + "k_proj.weight": k, a + "v_proj.weight": v})
    values.update(pos)
    return {k: values[k].contiguous() for k in expected_shapes(m)}


# --------------------------------------------------------------------------- files

class _Inert:
    """Stands in for any pickled class or function outside the tensor allow-list (OmegaConf
    nodes, DTensor meshes, schedulers): built from its arguments, running none of their code."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __call__(self, *args, **kwargs):  # e.g. the result of a stand-in getattr(cls, name)
        return _Inert(*args)


class _TensorsOnlyUnpickler(pickle.Unpickler):
    _ALLOWED = {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
                ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
                ("torch", "Size")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _Inert


_tensors_only = types.ModuleType("aim_megatron_l3m_tensors_only")
_tensors_only.Unpickler = _TensorsOnlyUnpickler
_tensors_only.load = lambda f, **kw: _TensorsOnlyUnpickler(f, **kw).load()
_tensors_only.__name__ = "aim_megatron_l3m_tensors_only"


def _clean(name: str) -> str:
    for seg in _WRAPPER_SEGMENTS:
        name = name.replace(seg, "")
    return name


def _read_dcp(path: Path) -> dict[str, torch.Tensor]:
    """The "model" entries of a torch.distributed.checkpoint directory, as full tensors; the
    optimizer entries are not read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    reader = pickled_files.CheckedFileSystemReader(path, L3MFormatError)  # .metadata is a pickle
    meta = reader.read_metadata().state_dict_metadata
    model = {k[len("model."):]: v for k, v in meta.items() if k.startswith("model.")}
    if not model:
        raise L3MFormatError(f"{path} is a torch.distributed.checkpoint directory without \"model\" "
                             f"entries; pass an ml-l3m checkpoint_N directory or checkpoint_N.pth")
    sd = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in model.items()
          if isinstance(v, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process")
        dcp.load({"model": sd}, storage_reader=reader, no_dist=True)
    return sd


def read(path: Path) -> dict[str, torch.Tensor]:
    """The model state dict (ml-l3m names) of an ml-l3m checkpoint: a checkpoint_N/ DCP directory,
    a checkpoint_N.pth, or a torch.save'd state dict (optionally under "model")."""
    path = Path(path)
    if path.is_dir():
        if not (path / ".metadata").is_file():
            raise L3MFormatError(f"{path} is a directory without .metadata, not an ml-l3m checkpoint_N "
                                 f"directory; pass checkpoint_N/ or checkpoint_N.pth from the run's output_dir")
        sd = _read_dcp(path)
    else:
        if not path.is_file():
            raise L3MFormatError(f"{path} does not exist; pass an ml-l3m checkpoint_N.pth or checkpoint_N/")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_tensors_only,
                             mmap=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise L3MFormatError(f"{path} is not a torch.save file ({str(exc).splitlines()[0][:120]}); "
                                 f"pass an ml-l3m checkpoint_N.pth or checkpoint_N/ directory") from exc
        sd = obj.get("model", obj) if isinstance(obj, dict) else obj
        if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
            raise L3MFormatError(f"{path} holds no model state dict (a dict of tensors, or one under "
                                 f"\"model\"); pass an ml-l3m checkpoint_N.pth or checkpoint_N/ directory")
    return {_clean(k): v for k, v in sd.items()}


def write(sd: dict[str, torch.Tensor], out: Path) -> None:
    """``torch.save({"model": sd})``: what ml-l3m's ``model.checkpoint`` loads (and the layout of
    its checkpoint_N.pth without the optimizer). Written to a temporary name, then renamed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({"model": {k: v.detach().cpu().contiguous() for k, v in sd.items()}}, tmp)
    os.replace(tmp, out)
