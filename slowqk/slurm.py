"""``slowqk submit``: fill the SLURM batch script from a recipe's layout and submit it.

One Slurm task per GPU (or per CPU rank), ``launch/slurm/slowqk.sbatch`` maps Slurm's task ids to
``RANK``/``WORLD_SIZE``; the layout ``ranks = nodes x tasks_per_node = TP x PP x DP`` is checked
before anything is submitted.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from slowqk.config import Recipe, load_recipe
from slowqk.launch import check_world
from slowqk.memory.report import layout_notes

SBATCH_SCRIPT = Path(__file__).resolve().parent.parent / "launch" / "slurm" / "slowqk.sbatch"


@dataclass
class SlurmJob:
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # default: one per GPU, or 1 without GPUs
    cpus_per_task: int | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    job_name: str | None = None
    signal_seconds: int = 180
    container_image: str | None = None
    extra: tuple[str, ...] = ()


def tasks_per_node(job: SlurmJob) -> int:
    """Ranks per node: one per GPU (checked), or ``job.tasks_per_node``, or 1."""
    tasks = job.tasks_per_node or max(1, job.gpus_per_node)
    if job.gpus_per_node and tasks != job.gpus_per_node:
        raise ValueError(
            f"--tasks-per-node {tasks} must equal --gpus-per-node {job.gpus_per_node} (one rank "
            "per GPU)"
        )
    return tasks


def job_flags(job: SlurmJob) -> list[str]:
    """sbatch's options for ``job``'s layout, limits and placement."""
    flags = [
        f"--nodes={job.nodes}",
        f"--ntasks-per-node={tasks_per_node(job)}",
        f"--signal=USR1@{job.signal_seconds}",
    ]
    if job.gpus_per_node:
        flags.append(f"--gpus-per-node={job.gpus_per_node}")
    for flag, value in (
        ("--cpus-per-task", job.cpus_per_task),
        ("--time", job.time),
        ("--partition", job.partition),
        ("--account", job.account),
    ):
        if value is not None:
            flags.append(f"{flag}={value}")
    return [*flags, *job.extra]


def check_job_layout(recipe: Recipe, job: SlurmJob) -> str:
    """The layout of ``recipe`` on ``job``'s ranks, described; LayoutError where it cannot fit."""
    tasks = tasks_per_node(job)
    world = job.nodes * tasks
    data = check_world(recipe, world, what="--nodes x --tasks-per-node")
    return (
        f"{world} ranks = {job.nodes} nodes x {tasks} = TP {recipe.parallel.tensor} "
        f"x PP {recipe.parallel.pipeline} x DP {data}"
    )


def sbatch_command(
    recipe: str, overrides: list[str], job: SlurmJob, workdir: Path
) -> tuple[list[str], dict[str, str], str]:
    """``(argv, extra environment, layout description)``; raises LayoutError / RecipeError."""
    r = load_recipe(recipe, overrides)
    layout = check_job_layout(r, job)
    cmd = ["sbatch", f"--chdir={workdir}", f"--job-name={job.job_name or r.name}"]
    cmd += [*job_flags(job), str(SBATCH_SCRIPT), recipe, *overrides]
    env = {"SLOWQK_CONTAINER_IMAGE": job.container_image} if job.container_image else {}
    return cmd, env, layout


def submit(
    recipe: str,
    overrides: list[str],
    job: SlurmJob,
    dry_run: bool = False,
    workdir: Path | None = None,
) -> int:
    workdir = (workdir or Path.cwd()).resolve()
    cmd, env, layout = sbatch_command(recipe, overrides, job, workdir)
    print(f"# {layout}", file=sys.stderr)
    if dry_run:
        world = job.nodes * tasks_per_node(job)
        for note in layout_notes(load_recipe(recipe, overrides), recipe, world):
            print(f"# {note}", file=sys.stderr)
    print(
        " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        + (" " if env else "")
        + shlex.join(cmd)
    )
    if dry_run:
        return 0
    (workdir / "logs").mkdir(exist_ok=True)  # Slurm does not create the --output directory
    return subprocess.run(cmd, env={**os.environ, **env}).returncode
