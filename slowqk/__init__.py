"""SlowQK: megatron-core pretraining with per-layer Q/K learning-rate scaling."""

import warnings

from slowqk.patches import triton_stub

# Without Transformer Engine / Apex, megatron-core warns once per module that imports them (four
# UserWarnings before anything runs). The run logs its attention backend once instead.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine and Apex are not installed|Apex is not installed)",
                        category=UserWarning)
triton_stub.apply()  # before anything imports megatron-core (>= 0.19 imports triton at module level)

__version__ = "0.1.0"
