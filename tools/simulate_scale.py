"""Simulate a run on thousands of GPUs in one CPU process: every rank's checkpoint shards,
distributed-optimizer ranges, memory and data share (aim_megatron.scaling.simulate)."""
import sys

from aim_megatron.scaling.simulate import main

if __name__ == "__main__":
    sys.exit(main())
