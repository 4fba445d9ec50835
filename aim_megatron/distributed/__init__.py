"""Parallelism: the one place that sets up processes and parallel layouts.

- ``parallel``: process groups, megatron-core model-parallel state, model chunks wrapped in DDP,
  the (distributed) optimizer and the forward/backward schedule.
- ``cpu_shims``: what megatron-core needs to run on CPU/gloo, kept apart from model code.
"""
