import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

# A small AIM with every structural piece: 16 patches, 4 trunk layers, 2 head blocks.
TINY = [
    "model.image_size=16", "model.patch_size=4", "model.in_channels=3", "model.hidden_size=32",
    "model.num_layers=4", "model.num_heads=4", "model.head_hidden_size=32",
    "model.head_ffn_hidden_size=64", "model.head_num_layers=2",
]


def run_distributed(script: str, nproc: int, args: list[str], timeout: int = 300) -> None:
    """Run a script under torchrun with `nproc` gloo processes; fail with its output."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, script, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", script, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")


def one_line(rc, err: str, *needles: str) -> str:
    """The single error line of a failed command; checks exit code 1 and no traceback."""
    assert rc == 1, f"exit code {rc}, wanted 1:\n{err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"wanted one line, got:\n{err}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in: {lines[0]}"
    return lines[0]


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and spinning threads starve shared cores."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_overrides():
    return list(TINY)
