"""The official AIM v1 format: released state dicts and how they map onto megatron-core's.

Released AIM v1 files (apple/ml-aim) hold ``preprocessor.patchifier.*``, ``trunk.blocks.{i}.*``
and ``trunk.post_trunk_norm.*``, optionally an attentive probe as ``head.*``; qkv rows are all
queries, then all keys, then all values. This module owns the key names, the maps between them
and megatron-core's full parameter names (``name_map``, ``reference_to_megatron``,
``megatron_to_reference``: qkv rows regrouped per head), reading such a file (whole or tensor by
tensor) and checking it against a configured model. The plain-PyTorch reference model
(``aim_megatron/models/reference.py``) uses the same names, so its state dict is an official one.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from aim_megatron.checkpoint import streaming
from aim_megatron.config import PRESETS, ModelConfig
from aim_megatron.models.reference import ReferenceAIM

TRUNK_PREFIXES = ("preprocessor.", "trunk.")
HEAD_PREFIX = "head."
RELEASED_LAYERNORM_EPS = "model.layernorm_eps=1e-6"


class ConvertError(ValueError):
    """A file that does not fit the requested conversion; the message says what to change."""


# --------------------------------------------------------------------------- name mapping

def _qkv_megatron_to_official(w: torch.Tensor, heads: int) -> torch.Tensor:
    # megatron packs rows per head: [h0: q k v][h1: q k v]...; official: [q all][k all][v all].
    three_d, d = w.shape
    return w.view(heads, 3, three_d // (3 * heads), d).transpose(0, 1).reshape(three_d, d)


def _qkv_official_to_megatron(w: torch.Tensor, heads: int) -> torch.Tensor:
    three_d, d = w.shape
    return w.view(3, heads, three_d // (3 * heads), d).transpose(0, 1).reshape(three_d, d)


def _block_pairs(a: str, b: str, attention: tuple[tuple[str, str], ...] = ()
                 ) -> list[tuple[str, str]]:
    """(megatron, reference) names of one pre-norm block with prefixes a and b; the attention's
    weight pairs sit between the two norms, in the order the released state dict lists them."""
    return [(a + "input_layernorm.weight", b + "norm_1.weight"),
            (a + "input_layernorm.bias", b + "norm_1.bias"),
            *attention,
            (a + "pre_mlp_layernorm.weight", b + "norm_2.weight"),
            (a + "pre_mlp_layernorm.bias", b + "norm_2.bias"),
            (a + "mlp.linear_fc1.weight", b + "mlp.fc1.weight"),
            (a + "mlp.linear_fc2.weight", b + "mlp.fc2.weight")]


def _name_pairs(m: ModelConfig) -> list[tuple[str, str]]:
    """(megatron full name, reference name) for every parameter."""
    pairs = [
        ("patch_embed.proj.weight", "preprocessor.patchifier.proj.weight"),
        ("patch_embed.proj.bias", "preprocessor.patchifier.proj.bias"),
        ("patch_embed.norm.weight", "preprocessor.patchifier.norm.weight"),
        ("patch_embed.norm.bias", "preprocessor.patchifier.norm.bias"),
        ("post_trunk_norm.weight", "trunk.post_trunk_norm.weight"),
        ("post_trunk_norm.bias", "trunk.post_trunk_norm.bias"),
    ]
    for i in range(m.num_layers):
        a, b = f"trunk.layers.{i}.", f"trunk.blocks.{i}."
        pairs += _block_pairs(a, b, ((a + "self_attention.linear_qkv.weight", b + "attn.qkv.weight"),
                                     (a + "self_attention.linear_proj.weight", b + "attn.proj.weight")))
    for name in ("in_proj.weight", "in_proj.bias", "norm.weight", "norm.bias",
                 "out_proj.weight", "out_proj.bias"):
        pairs.append(("head." + name, "head." + name))
    for i in range(m.head_num_layers):
        a, b = f"head.blocks.{i}.", f"head.blocks.{i}."
        pairs += _block_pairs(a, b)   # the head's identity attention has no weights
    return pairs


def name_map(m: ModelConfig) -> dict[str, str]:
    """Megatron full name -> reference (released) name, in the released state dict's order."""
    return dict(_name_pairs(m))


def state_dict_mismatch(sd: dict, expected: dict[str, tuple]) -> tuple[str, str]:
    """How a file's state dict differs from the expected ``{key: shape}``, for the converters'
    one-line errors: (the first key present with another shape, else ""; the missing and
    unexpected keys, else ""). Both "" when it fits."""
    for key, shape in expected.items():
        if key in sd and tuple(sd[key].shape) != shape:
            return (f"shape mismatch at {key}: the file has {list(sd[key].shape)}, the configured model "
                    f"expects {list(shape)}"), ""
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    parts = [f"{len(missing)} missing keys, e.g. {missing[:3]}" if missing else "",
             f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}" if unexpected else ""]
    return "", "; ".join(p for p in parts if p)


def _rename(sd: dict[str, torch.Tensor], pairs, qkv_fn, side: str, strict: bool, heads: int):
    out = {}
    for src, dst in pairs:
        if src not in sd:
            if strict:
                raise KeyError(f"{src} missing from the {side} state dict")
            continue
        out[dst] = qkv_fn(sd[src], heads) if src.endswith("qkv.weight") else sd[src]
    return out


def megatron_to_reference(full: dict[str, torch.Tensor], m: ModelConfig, strict: bool = True
                          ) -> dict[str, torch.Tensor]:
    """Full megatron-layout dict (see ``parallel.gather_full_state_dict``) -> reference names."""
    return _rename(full, _name_pairs(m), _qkv_megatron_to_official, "megatron", strict, m.num_heads)


def reference_to_megatron(ref: dict[str, torch.Tensor], m: ModelConfig, strict: bool = True
                          ) -> dict[str, torch.Tensor]:
    """Reference/official names -> full megatron-layout dict."""
    pairs = [(dst, src) for src, dst in _name_pairs(m)]
    return _rename(ref, pairs, _qkv_official_to_megatron, "reference", strict, m.num_heads)


# --------------------------------------------------------------------------- official files

def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A whole official state dict (torch.save or .safetensors), unwrapped from "state_dict"/"model"."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        try:  # mmap: a 7B file is not read into memory by every rank
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError) as exc:  # e.g. ml-l3m's pickled OmegaConf cfg
        raise ConvertError(f"{path} holds more than tensors ({str(exc).splitlines()[0][:80]}); an "
                           f"ml-l3m checkpoint_N.pth imports with --format l3m") from exc
    for wrapper in ("state_dict", "model"):  # some releases nest the weights
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ConvertError(f"{path} does not hold a state dict of tensors")
    return sd


class OfficialFile:
    """An official state dict read lazily: ``meta`` holds its tensors' shapes (meta device),
    ``get`` reads one (streaming.TensorFile: plain reads at the tensor's offset). A legacy
    (non-zip) torch.save file has no offsets: it is read whole, as before."""

    def __init__(self, path: Path):
        try:
            self._file = streaming.TensorFile(path)
            self.meta, self.get = self._file.meta, self._file.get
        except (RuntimeError, AttributeError, ValueError, KeyError, OSError, pickle.UnpicklingError):
            sd = read_state_dict(path)
            self.meta, self.get = {k: v.to("meta") for k, v in sd.items()}, sd.__getitem__
        if not isinstance(self.meta, dict) or not all(torch.is_tensor(v) for v in self.meta.values()):
            raise ConvertError(f"{path} does not hold a state dict of tensors")


def split_official(sd: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(trunk tensors, probe-head tensors with the head. prefix removed)."""
    if any(".attn.q_proj." in k or k.startswith("preprocessor.blocks.") for k in sd):
        raise ConvertError("the file holds ml-l3m names (preprocessor.blocks.0.*, separate attn.q_proj/"
                           "k_proj/v_proj), not the released AIM v1 ones; import it with --format l3m")
    trunk = {k: v for k, v in sd.items() if k.startswith(TRUNK_PREFIXES)}
    head = {k[len(HEAD_PREFIX):]: v for k, v in sd.items() if k.startswith(HEAD_PREFIX)}
    other = sorted(set(sd) - set(trunk) - {HEAD_PREFIX + k for k in head})
    if other:
        raise ConvertError(f"{len(other)} keys are not AIM v1 (preprocessor.*, trunk.*, head.*): "
                           f"{other[:5]}{' ...' if len(other) > 5 else ''}")
    return trunk, head


def describe_trunk(sd: dict[str, torch.Tensor]) -> str:
    """What architecture the file's shapes describe, and the preset or overrides that build it."""
    proj = sd.get("preprocessor.patchifier.proj.weight")
    if proj is None or proj.dim() != 4:
        return "an unknown architecture (no preprocessor.patchifier.proj.weight)"
    width, channels, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    depth = len({k.split(".")[2] for k in sd if k.startswith("trunk.blocks.")})
    for name, p in PRESETS.items():
        if (p["hidden_size"], p["num_layers"], p.get("patch_size", 14), p.get("in_channels", 3)) == \
                (width, depth, patch, channels):
            return f"preset {name} (width {width}, depth {depth}, patch {patch}); use model.preset={name}"
    return (f"no preset (width {width}, depth {depth}, patch {patch}, {channels} channels); use "
            f"model.hidden_size={width} model.num_layers={depth} model.patch_size={patch} "
            f"model.in_channels={channels} and the matching model.num_heads")


def check_trunk(sd: dict[str, torch.Tensor], m: ModelConfig) -> None:
    """Every trunk key of the configured model present with its shape, and nothing else."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ReferenceAIM(m).state_dict().items()
                    if k.startswith(TRUNK_PREFIXES)}
    shape, keys = state_dict_mismatch(sd, expected)
    if shape:
        raise ConvertError(f"{shape}. The file looks like {describe_trunk(sd)}")
    if keys:
        raise ConvertError(f"the file does not match the configured {m.num_layers}-block trunk: "
                           f"{keys}. The file looks like {describe_trunk(sd)}")
