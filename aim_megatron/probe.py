"""``python -m aim_megatron.probe`` / ``torchrun -m aim_megatron.probe``: the ``aim-probe``
command, kept under its documented module name. The probe lives in ``aim_megatron.evaluation``."""
import sys

if __name__ == "__main__":
    from aim_megatron.evaluation.probe_cli import main
    sys.exit(main())
