"""Checkpoints: training state on disk and the formats that cross team boundaries.

- ``checkpointer``: save/load/resume of the whole training state through megatron-core
  ``dist_checkpointing`` (any TP/PP/DP layout, the distributed optimizer, atomic ``latest``).
- ``streaming``: tensor-at-a-time reads and writes of checkpoints, for conversions that must not
  hold a 7B model in memory.
- ``official``: the released AIM v1 format: its key names, the maps to and from megatron-core's
  names (qkv row order included), reading such a file and checking it against a config.
- ``l3m``: checkpoints of Apple's ml-l3m training code (read without running pickled code).
- ``pickled_files``: the pickles of a DCP/megatron checkpoint directory (``.metadata``, object
  entries, ``common.pt``) read or checked without running code they carry.
- ``convert``: ``aim-convert``: import official AIM v1 or ml-l3m weights as a checkpoint, export a
  checkpoint to either format (streamed, plus the in-memory reference paths).
- ``reshard``: ``aim-reshard``: a checkpoint for another parallel layout (files linked, nothing
  read), or its weights exported as one file.
"""
