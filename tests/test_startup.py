"""Process start-up: importing the trainer does not import TorchDynamo/Inductor (megatron-core's
torch.compile decorations wait for their first call: aim_megatron/_deferred_fusions.py), and a
decorated megatron kernel still computes what its source says when it is called."""
import subprocess
import sys

from conftest import ROOT

CHECK = r"""
import sys
import aim_megatron.training.trainer
import aim_megatron.evaluation.probe
loaded = sorted(m for m in ("torch._dynamo", "torch._inductor.compile_fx") if m in sys.modules)
assert not loaded, f"imported at start-up: {loaded}"
import torch
import megatron.core.jit
from megatron.core.transformer.utils import erf_gelu
assert hasattr(megatron.core.jit.jit_fuser, "wrapped_decorator"), megatron.core.jit.jit_fuser
x = torch.linspace(-4, 4, 101)
expected = x * 0.5 * (torch.erf(x / 1.41421) + 1.0)
assert torch.allclose(erf_gelu(x), expected, atol=1e-6), (erf_gelu(x) - expected).abs().max()
print("ok")
"""


def test_trainer_import_skips_the_compiler_and_megatron_kernels_still_run():
    r = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
