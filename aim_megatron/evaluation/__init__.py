"""Evaluation of frozen trunks.

- ``probe``: the probe itself: ProbeConfig, the layers it reads, the attentive and linear probe
  heads, probe checkpoints (save_probe / load_probe).
- ``labelled_data``: labelled images (Fashion-MNIST, .npz, shards, image folders) as the
  trainer's validation split preprocesses them; which source each split comes from.
- ``features``: features of those images from the frozen trunk, cached per data-parallel shard.
- ``probe_train``: training the probe on cached features and measuring top-1/top-5/confusion.
- ``report``: what a probe run writes (metrics.json, confusion.png, probe.safetensors).
- ``probe_cli``: the ``aim-probe`` command end to end (``python -m aim_megatron.probe``).
- ``baselines``: raw-pixel classifiers (logistic regression, k-NN) a probe result must beat.
- ``findings``: the paper's findings at CPU scale: variants pre-trained, probed and reported
  (``tools/findings.py``).
"""
