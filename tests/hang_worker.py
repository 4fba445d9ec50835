"""Test worker for tests/test_slurm_watchdog.py: aim-pretrain in which global rank R sleeps forever
before it starts step S+1, while its peers go on into that step's first collective and wait there:
a rank blocked outside a collective, which the hang watchdog must name. The hang is injected here,
around Trainer.train_step, so the product code carries no test hook.

    torchrun --nproc_per_node 2 tests/hang_worker.py R:S <aim-pretrain arguments>
"""
import logging
import sys
import time

import torch.distributed as dist

from aim_megatron.training import main as pretrain
from aim_megatron.training.trainer import Trainer


def block_forever(rank: int, at_step: int) -> None:
    """Where the blocked rank sleeps: its stack dump must show this function."""
    logging.getLogger("aim_megatron.train").warning(
        "hang_worker: rank %d blocks before step %d", rank, at_step + 1)
    while True:
        time.sleep(1)


def block_rank_before_step(train_step, rank: int, at_step: int):
    def train_step_or_block(trainer: Trainer) -> dict:
        if trainer.step == at_step and dist.get_rank() == rank:
            block_forever(rank, at_step)
        return train_step(trainer)
    return train_step_or_block


if __name__ == "__main__":
    rank, at_step = (int(x) for x in sys.argv[1].split(":"))
    Trainer.train_step = block_rank_before_step(Trainer.train_step, rank, at_step)
    sys.exit(pretrain.main(sys.argv[2:]))
