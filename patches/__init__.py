"""Small, version-guarded patches of megatron-core.

- ``cpu_compat``: lets megatron-core's CUDA-only code paths (DDP, optimizers, RNG tracker,
  pipeline schedules, dist_checkpointing) run on CPU with gloo. Applied only without CUDA.
- ``lr_groups``: learning-rate groups of any part of any layer inside megatron-core's and
  DeepSpeed's optimizers (FP32, mixed-precision, distributed, ZeRO), exact on fused weights
  (Q/K/V, gate/up).
- ``one_rank_collectives``: collectives over a one-rank group done in place, not on gloo's
  threads (whose OpenMP team slows every operator of the training thread). Applied only for gloo.
"""
