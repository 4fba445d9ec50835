"""The AIM model.

- ``aim``: the trunk and pre-training head from megatron-core layer specs (``layer_spec`` picks
  Transformer Engine or local layers), fixed 2D sin-cos positions, the normalized-pixel loss.
- ``attention``: the prefix-causal mask and the kernels that apply it (dense mask, varlen, flex).
- ``reference``: a plain-PyTorch AIM with the official key names, the single-process reference
  that parallel layouts and conversions are checked against.
"""
