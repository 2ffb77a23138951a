"""Training, calibration, the not-a-cell fit, checkpoints and export: the only rooms that import torch
(the [train] extra). `training.config` alone is torch-free, so the command line can build its options."""

