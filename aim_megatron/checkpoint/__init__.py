"""Checkpoints: training state on disk and the formats that cross team boundaries.

- ``checkpointer``: save/load/resume of the whole training state through megatron-core
  ``dist_checkpointing`` (any TP/PP/DP layout, the distributed optimizer, atomic ``latest``).
- ``streaming``: tensor-at-a-time reads and writes of checkpoints, for conversions that must not
  hold a 7B model in memory.
- ``l3m``: checkpoints of Apple's ml-l3m training code (read without running pickled code).
"""
