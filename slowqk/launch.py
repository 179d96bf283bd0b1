"""Local multi-process launch through torchrun, with the parallel layout checked first."""

from __future__ import annotations

import os
import shlex
import shutil
import sys

from slowqk.config import Recipe, load_recipe
from slowqk.distributed import LayoutError, check_layout
from slowqk.memory.report import layout_notes


def check_world(r: Recipe, nproc: int, what: str = "--nproc") -> int:
    """The data-parallel size of ``r`` on ``nproc`` ranks; LayoutError naming what does not fit.
    (Shapes against TP/PP are checked when the recipe loads:
    :func:`slowqk.config.recipe_problems`.)"""
    if nproc < 1:
        raise LayoutError(f"{what} must be >= 1, got {nproc}")
    data = check_layout(nproc, r.parallel.tensor, r.parallel.pipeline)
    per_step = r.train.micro_batch_size * data
    if r.train.global_batch_size % per_step:
        raise LayoutError(
            f"train.global_batch_size ({r.train.global_batch_size}) is not a multiple of "
            f"train.micro_batch_size ({r.train.micro_batch_size}) x DP ({data}) = {per_step}"
        )
    return data


def torchrun_command(
    recipe: str, overrides: list[str], nproc: int, extra: list[str] | None = None
) -> list[str]:
    """The torchrun command for ``nproc`` processes; raises LayoutError if the layout cannot fit."""
    check_world(load_recipe(recipe, overrides), nproc)
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    return [
        torchrun,
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "slowqk.cli",
        "train",
        recipe,
        *overrides,
        *(extra or []),
    ]


def describe(recipe: str, overrides: list[str], nproc: int) -> str:
    r = load_recipe(recipe, overrides)
    data = check_layout(nproc, r.parallel.tensor, r.parallel.pipeline)
    return f"world {nproc} = TP {r.parallel.tensor} x PP {r.parallel.pipeline} x DP {data}"


def run(
    recipe: str, overrides: list[str], nproc: int, dry_run: bool, extra: list[str] | None = None
) -> int:
    cmd = torchrun_command(recipe, overrides, nproc, extra)
    print(f"# {describe(recipe, overrides, nproc)}", file=sys.stderr)
    if dry_run:
        for note in layout_notes(load_recipe(recipe, overrides), recipe, nproc):
            print(f"# {note}", file=sys.stderr)
    print(shlex.join(cmd))
    if dry_run:
        return 0
    os.execv(cmd[0], cmd)  # replace this process: signals reach torchrun directly
    return 0  # pragma: no cover
