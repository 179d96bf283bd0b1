"""Small, version-guarded patches of megatron-core.

- ``cpu_compat``: lets megatron-core's CUDA-only code paths (DDP, optimizers, RNG tracker,
  pipeline schedules, dist_checkpointing) run on CPU with gloo. Applied only without CUDA.
- ``lr_groups``: learning-rate groups of any part of any layer inside megatron-core's and
DeepSpeed's
  optimizers (FP32, mixed-precision, distributed, ZeRO), exact on fused weights (Q/K/V, gate/up).
"""
