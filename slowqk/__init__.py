"""SlowQK: megatron-core pretraining with per-layer Q/K learning-rate scaling."""

import warnings

# Without Transformer Engine / Apex, megatron-core warns once per module that imports them (four
# UserWarnings before anything runs). The run logs its attention backend once instead.
warnings.filterwarnings(
    "ignore",
    message=r".*(Transformer Engine and Apex are not installed|Apex is not installed)",
    category=UserWarning,
)

__version__ = "0.1.0"
