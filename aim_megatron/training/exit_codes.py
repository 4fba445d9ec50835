"""The exit codes of aim-pretrain, in a module of their own so that the light start-up code
(preemption, imported before torch) and the loop share them."""

EXIT_OK = 0          # finished, or stopped at train.exit_after_steps after its checkpoint
EXIT_ERROR = 1       # bad input: config, data, checkpoint; one line on stderr
EXIT_DIVERGED = 2    # too many NaN/inf steps in a row; nothing poisoned is saved
EXIT_REQUEUE = 3     # stopped by SIGTERM/SIGUSR1 (or a hang) after saving: requeue the job
