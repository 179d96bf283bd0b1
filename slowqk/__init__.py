"""SlowQK: megatron-core pretraining with per-layer Q/K learning-rate scaling."""

__version__ = "0.1.0"
