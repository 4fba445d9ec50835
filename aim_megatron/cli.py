"""Command-line conventions shared by aim-pretrain, aim-probe and the tools: bad input is one
line on stderr and exit code 1 (docs/errors.md)."""
from __future__ import annotations

import argparse
import os

EXIT_BAD_INPUT = 1


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error and exit code 1 instead of a usage block and exit code 2,
    so that every kind of bad input ends the same way."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (some libraries' messages span several)."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text or type(exc).__name__


def is_rank0() -> bool:
    """Rank 0 of a torchrun/SLURM launch, also before torch.distributed is initialised: errors
    every rank detects alike are printed once, not once per process."""
    return int(os.environ.get("RANK", "0")) == 0
