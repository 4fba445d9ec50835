"""Test worker for tests/test_checkpoint_faults.py: aim-pretrain with a checkpoint write made slow
or a disk that reports more space than it has, injected here so that the product code carries no
test hook.

    python tests/checkpoint_fault_worker.py [--write-delay S] [--hide-disk-usage] <aim-pretrain arguments>

--write-delay S: each rank's file writer sleeps S seconds before writing (the background writer
    is a fork of the trainer, so it inherits this), leaving time to kill or signal mid-write.
--hide-disk-usage: the free-space check before a save asks for no space, so a full disk is met
    by the writes themselves.
"""
import sys
import time

from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

from aim_megatron.checkpoint import checkpointer
from aim_megatron.training import main as pretrain


def slow_writer(delay_s: float) -> None:
    write = FileSystemWriterAsync.write_preloaded_data_multiproc

    def write_later(*args, **kwargs):
        print(f"checkpoint_fault_worker: writer waits {delay_s} s", file=sys.stderr, flush=True)
        time.sleep(delay_s)
        return write(*args, **kwargs)

    FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(write_later)


def hide_disk_usage() -> None:
    prepare = checkpointer._prepare_directories
    checkpointer._prepare_directories = lambda root, tmp, needed: prepare(root, tmp, 0)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--write-delay"]:
        slow_writer(float(args[1]))
        args = args[2:]
    if args[:1] == ["--hide-disk-usage"]:
        hide_disk_usage()
        args = args[1:]
    sys.exit(pretrain.main(args))
