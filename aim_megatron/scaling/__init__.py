"""Model sizes, FLOPs and scaling-law sweeps.

- ``flops``: training FLOPs per image and device peak throughput (MFU).
- ``sizing``: parameter counts, memory estimates and the layout planner for a GPU count.
- ``estimate_memory``: the ``aim-estimate-memory`` command (per-GPU memory of a layout).
- ``checkpoint_interval``: the failure rate (per-GPU MTBF, Llama 3's by default) and the
  Young/Daly checkpoint interval that minimises lost time.
- ``slurm_layout``: the ``aim-layout`` command (dry-run of a Slurm allocation's layout).
- ``plan``: a sweep grid spec resolved into one trainer config per run, and the manifest.
- ``launch``: running a sweep's incomplete runs locally, or a Slurm job array for them.
- ``collect``: reading runs' metrics.jsonl, completeness, results.json / results.csv.
- ``fit``: fitting L(N, D) and L(C), bootstrap intervals, compute-optimal predictions.
- ``plot``: the fit's plots (fit.png, residuals.png).
- ``cli``: the ``aim-sweep`` command (plan / launch / collect / finish / fit / predict).
- ``simulate`` (the ``aim-simulate-scale`` command and the growth table), ``simulate_world``
  (acting as each rank of a fake world of thousands of GPUs), ``simulate_checks`` (sharding,
  distributed-optimizer, memory and reshard checks), ``simulate_data`` (the data path's shares).
"""
