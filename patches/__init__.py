"""Small, version-guarded patches of megatron-core (and of torch.distributed's gloo transport).

- ``cpu_compat``: lets megatron-core's CUDA-only code paths (DDP, optimizers, RNG tracker,
  pipeline schedules, dist_checkpointing) run on CPU with gloo. Applied only without CUDA.
- ``one_rank_collectives``: collectives over a one-rank group done in place, not on gloo's
  threads (whose OpenMP team slows every operator of the training thread). Applied only for gloo.
"""
