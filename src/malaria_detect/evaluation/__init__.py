"""Honest figures: metrics, evaluation on held-out patients, cross-validation, site calibration
(adapt), whole-field scoring against annotations, and speed. Torch-free unless a torch checkpoint is
scored."""

