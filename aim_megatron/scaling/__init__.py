"""Model sizes, FLOPs and scaling-law sweeps.

- ``flops``: training FLOPs per image and device peak throughput (MFU).
- ``sizing``: parameter counts, memory estimates and the layout planner for a GPU count.
- ``sweep``: plan, launch, collect and fit scaling-law sweeps.
"""
