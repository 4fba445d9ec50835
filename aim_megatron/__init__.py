"""aim-megatron: Megatron-style 3D-parallel training of AIM (Autoregressive Image Models)."""
import warnings

# megatron-core warns at import that TE/apex are absent; we log our own backend choice instead.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")

__version__ = "0.1.0"

from aim_megatron import _deferred_fusions  # noqa: E402

_deferred_fusions.install()
