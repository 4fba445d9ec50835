"""Evaluation of frozen trunks.

- ``probe``: the attentive (and linear) probe on frozen features, ``aim-probe``.
- ``baselines``: raw-pixel classifiers (logistic regression, k-NN) a probe result must beat.
"""
