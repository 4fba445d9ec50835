"""``python -m aim_megatron.train`` / ``torchrun -m aim_megatron.train``: the ``aim-pretrain``
command, kept under its documented module name. The loop lives in ``aim_megatron.training``."""
import sys

if __name__ == "__main__":
    from aim_megatron.training.trainer import main
    sys.exit(main())
