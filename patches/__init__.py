"""Small, version-guarded patches of megatron-core.

- ``cpu_compat``: lets megatron-core's CUDA-only code paths (DDP, optimizers, RNG tracker,
  pipeline schedules, dist_checkpointing) run on CPU with gloo. Applied only without CUDA.
- ``qk_lr_scaling``: per-layer Q/K learning-rate scaling groups inside megatron-core's
  optimizers (FP32, mixed-precision, distributed), exact for the fused ``linear_qkv`` weight.
"""
