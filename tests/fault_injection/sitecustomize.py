"""Test-only fault injection for tests/test_slurm_faults.py: put this directory on PYTHONPATH and
set AIM_FAULT_RAISE_FILE; the trainer of rank AIM_FAULT_RANK (default 1) then raises inside its
next torch.distributed.all_reduce once that file exists, while its peers wait in the same
all-reduce: a rank raising inside a collective. The file is renamed when the fault fires, so a
restarted trainer runs clean. Only the ranks named import torch here; every other Python process
of the job (torchrun, the restart decisions) starts as usual."""
import os

_trigger = os.environ.get("AIM_FAULT_RAISE_FILE")
if _trigger and os.environ.get("RANK") == os.environ.get("AIM_FAULT_RANK", "1"):
    import torch.distributed as _dist

    _all_reduce = _dist.all_reduce

    def _faulty_all_reduce(*args, **kwargs):
        try:
            os.rename(_trigger, _trigger + ".fired")   # fires once, across restarts
        except FileNotFoundError:
            return _all_reduce(*args, **kwargs)
        raise RuntimeError(f"injected fault: rank {os.environ['RANK']} raised inside all_reduce")

    _dist.all_reduce = _faulty_all_reduce
