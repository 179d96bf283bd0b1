"""Learning-rate groups on exact parts of fused weights, inside megatron-core's and DeepSpeed's
optimizers: :mod:`~slowqk.lr_groups.scaling` (the groups and the hooks around the optimizer step),
:mod:`~slowqk.lr_groups.params` (which rows of which model parameter a part covers),
:mod:`~slowqk.lr_groups.main_params` (which elements of each parameter an optimizer's main
parameters hold), :mod:`~slowqk.lr_groups.rows` (the row and element arithmetic)."""

from slowqk.lr_groups.main_params import iter_main_params
from slowqk.lr_groups.params import PartParam, QKVParam, find_part_params, find_qkv_params
from slowqk.lr_groups.scaling import GroupSpec, LRGroups, register

__all__ = [
    "GroupSpec",
    "LRGroups",
    "PartParam",
    "QKVParam",
    "find_part_params",
    "find_qkv_params",
    "iter_main_params",
    "register",
]
