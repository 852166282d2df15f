"""ncssl-tune: hyperparameter sweeps that measure collapse in non-contrastive SSL."""

__version__ = "0.1.0"
