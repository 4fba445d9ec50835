"""Pre-training.

- ``trainer``: the training loop and the ``aim-pretrain`` command.
- ``watchdog``: the hang watchdog (heartbeats, stacks, the stuck rank named, exit 3).
"""
