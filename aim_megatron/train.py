"""``python -m aim_megatron.train`` / ``torchrun -m aim_megatron.train``: the ``aim-pretrain``
command, kept under its documented module name. The loop lives in ``aim_megatron.training``."""
import sys

if __name__ == "__main__":
    # Before the seconds of torch imports: a SIGTERM/SIGUSR1 during start-up is recorded and
    # acted on before the first step instead of killing the process (preemption imports no torch).
    from aim_megatron.training.preemption import install_signal_handlers
    install_signal_handlers()
    from aim_megatron.training.main import main
    sys.exit(main())
