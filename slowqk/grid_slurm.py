"""A grid on SLURM: ``slowqk experiment submit`` and ``slowqk experiment status``.

One submission is three steps chained by dependencies:

1. a data job (``launch/slurm/grid_step.sbatch experiment prepare-data GRID_DIR``): the grid's
   corpus prepared once, before any run starts;
2. one job array per distinct layout (usually one) over the runs not finished and not queued:
   each task is ``launch/slurm/slowqk.sbatch`` on one run, whose directory, recipe and overrides
   it reads from a task file; a preempted task, or one whose node died, is requeued and resumes
   from its run's newest checkpoint like a single job (``afterok`` on the data job);
3. a summary job (``experiment summarize GRID_DIR``) once every task has ended (``afterany``).

Every submission is appended to ``<grid_dir>/slurm/submissions.jsonl`` (its job ids and which
array task trains which run); ``status`` reads it together with ``squeue``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from slowqk.config import load_recipe
from slowqk.experiments import (
    Grid,
    Run,
    is_finished,
    load_grid,
    plan_grid,
    read_grid_record,
    with_grid_data,
    write_grid_record,
)
from slowqk.slurm import SBATCH_SCRIPT, SlurmJob, check_job_layout, job_flags, tasks_per_node

STEP_SCRIPT = SBATCH_SCRIPT.parent / "grid_step.sbatch"
SUBMISSIONS = Path("slurm") / "submissions.jsonl"
# squeue states of a job that will still run (array tasks split out with -r)
WAITING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SUSPENDED", "RESIZING"}
RUNNING = {"RUNNING", "CONFIGURING", "COMPLETING", "SIGNALING", "STAGE_OUT"}


class SlurmUnavailable(RuntimeError):
    """A SLURM command is missing or failed (not the grid's fault)."""


def _slurm(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, env={**os.environ, **(env or {})}
        )
    except FileNotFoundError:
        raise SlurmUnavailable(
            f"{argv[0]} not found: run this where SLURM's commands are (a login node)"
        ) from None


def _last(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "(no message)"


def _sbatch(argv: list[str], env: dict[str, str] | None = None) -> str:
    proc = _slurm(argv, env)
    if proc.returncode:
        raise SlurmUnavailable(f"sbatch refused: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"


@dataclass(frozen=True)
class Partition:
    name: str
    nodes: int
    cpus: int  # the fewest CPUs of its nodes
    gpus: int  # the fewest GPUs of its nodes


def _gpus(gres: str) -> int:
    """GPUs in sinfo's GRES field, e.g. ``gpu:8``, ``gpu:h100:8(S:0-1)``, ``(null)``."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def partition_limits(partition: str | None) -> Partition:
    """The partition's node count and the smallest node (``sinfo``; the default partition when
    ``partition`` is None)."""
    proc = _slurm(["sinfo", "-h", "-N", "-o", "%N|%P|%c|%G"])
    if proc.returncode:
        raise SlurmUnavailable(f"sinfo failed: {_last(proc.stderr)}")
    rows = [line.split("|") for line in proc.stdout.split("\n") if line.strip()]
    default = next((p.rstrip("*") for _, p, _, _ in rows if p.endswith("*")), None)
    name = partition or default
    mine = {n: (int(c), _gpus(g)) for n, p, c, g in rows if p.rstrip("*") == name}
    if not mine:
        known = sorted({p.rstrip("*") for _, p, _, _ in rows})
        raise ValueError(f"--partition {name}: no such partition (there are {', '.join(known)})")
    cpus, gpus = zip(*mine.values(), strict=True)
    return Partition(name, len(mine), min(cpus), min(gpus))


def check_fits(job: SlurmJob, part: Partition, who: str) -> None:
    tasks = tasks_per_node(job)
    cpus = tasks * (job.cpus_per_task or 1)
    for what, need, have in (
        ("nodes", job.nodes, part.nodes),
        ("CPUs per node", cpus, part.cpus),
        ("GPUs per node", job.gpus_per_node, part.gpus),
    ):
        if need > have:
            raise ValueError(
                f"{who}: needs {need} {what} ({job.nodes} nodes x {tasks} tasks"
                f"{f' x {job.cpus_per_task} CPUs' if job.cpus_per_task else ''}"
                f"{f', {job.gpus_per_node} GPUs per node' if job.gpus_per_node else ''}); "
                f"partition {part.name} has {have}"
            )


def run_job(grid: Grid, run: Run, default: SlurmJob) -> SlurmJob:
    """The run's SLURM layout: its variant's, else the grid's, else the command line's."""
    layout = grid.variants[run.variant].layout or grid.layout
    if layout is None:
        return default
    return replace(
        default,
        nodes=layout.nodes,
        gpus_per_node=layout.gpus_per_node,
        tasks_per_node=layout.tasks_per_node,
    )


def read_submissions(grid_dir: Path) -> list[dict]:
    path = grid_dir / SUBMISSIONS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _task_jobs(submissions: list[dict]) -> dict[str, str]:
    """Each run's newest array task, ``ARRAYID_INDEX``."""
    out: dict[str, str] = {}
    for sub in submissions:
        for array in sub["arrays"]:
            for i, name in enumerate(array["runs"]):
                out[name] = f"{array['job']}_{i}"
    return out


def queue_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """``{job id: (state, reason)}`` of the jobs SLURM still holds (array tasks one by one)."""
    if not job_ids:
        return {}
    proc = _slurm(["squeue", "-h", "-r", "-o", "%i|%T|%r", "-j", ",".join(sorted(set(job_ids)))])
    if proc.returncode and "Invalid job id" not in proc.stderr:
        raise SlurmUnavailable(f"squeue failed: {_last(proc.stderr)}")
    out = {}
    for line in proc.stdout.splitlines():
        job, state, reason = line.split("|", 2)
        out[job] = (state, reason)
    return out


def _queued_tasks(grid_dir: Path) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """Each run's newest array task, and what ``squeue`` says of the tasks it still holds."""
    tasks = _task_jobs(read_submissions(grid_dir))
    return tasks, queue_states(sorted({t.split("_")[0] for t in tasks.values()}))


def _active(grid_dir: Path) -> dict[str, tuple[str, str, str]]:
    """Runs with a task SLURM still holds: ``{run: (task id, state, reason)}``."""
    tasks, states = _queued_tasks(grid_dir)
    return {name: (task, *states[task]) for name, task in tasks.items() if task in states}


def _write_task(path: Path, run: Run) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(a.encode() + b"\0" for a in (run.run_dir, run.recipe, *run.overrides)))
    tmp.replace(path)


def submit_grid(
    grid: Grid,
    job: SlurmJob,
    max_concurrent: int | None = None,
    only: list[str] | None = None,
    dry_run: bool = False,
    workdir: Path | None = None,
) -> int:
    """Submit the data job, the array(s) of unfinished runs and the summary job; 0 when done,
    refusals raise before anything is submitted."""
    workdir = (workdir or Path.cwd()).resolve()
    grid_dir = Path(grid.out_dir).resolve()
    grid = grid.model_copy(update={"out_dir": str(grid_dir)})
    plan = plan_grid(grid, only)
    active = _active(grid_dir) if not dry_run else {}
    todo = [r for r in plan.todo if r.name not in active]
    groups: dict[tuple, list[Run]] = {}
    jobs: dict[tuple, SlurmJob] = {}
    part = None
    if todo:
        try:
            part = partition_limits(job.partition)
        except SlurmUnavailable:
            if not dry_run:
                raise
            print("  (partition not checked: no SLURM here)")
    for run in todo:
        rj = run_job(grid, run, job)
        if part is not None:
            check_fits(rj, part, f"run {run.name}")
        check_job_layout(load_recipe(run.recipe, list(run.overrides)), rj)
        key = (rj.nodes, rj.gpus_per_node, tasks_per_node(rj))
        groups.setdefault(key, []).append(run)
        jobs[key] = rj
    print(
        f"grid {grid.name}: {len(plan.runs)} runs, {sum(map(is_finished, plan.runs))} finished, "
        f"{len(active)} queued or running, {len(todo)} to submit"
    )
    if not todo:
        return 0
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = grid_dir / "slurm" / "logs"
    # the jobs find this checkout (its venv and scripts) wherever `submit` was started
    repo = os.environ.get("SLOWQK_REPO", str(SBATCH_SCRIPT.parent.parent.parent))
    common = [f"--chdir={workdir}", f"--export=ALL,SLOWQK_REPO={repo}"] + [
        f"{flag}={value}"
        for flag, value in (
            ("--time", job.time),
            ("--partition", job.partition),
            ("--account", job.account),
        )
        if value is not None
    ]

    def step(what: str, dependency: str | None, args: list[str]) -> list[str]:
        return [
            "sbatch",
            "--parsable",
            f"--job-name={grid.name}-{what}",
            f"--output={logs}/%x-%j.out",
            *common,
            *([f"--dependency={dependency}"] if dependency else []),
            str(STEP_SCRIPT),
            *args,
        ]

    def array(key: tuple, n: int, task_dir: Path, data_job: str) -> list[str]:
        limit = f"%{max_concurrent}" if max_concurrent else ""
        return [
            "sbatch",
            "--parsable",
            f"--chdir={workdir}",
            f"--job-name={grid.name}",
            f"--array=0-{n - 1}{limit}",
            f"--output={logs}/%x-%A_%a.out",
            f"--dependency=afterok:{data_job}",
            "--kill-on-invalid-dep=yes",  # a failed data job cancels the array, not a hang
            f"--export=ALL,SLOWQK_REPO={repo},SLOWQK_TASK_DIR={task_dir}",
            *job_flags(jobs[key]),
            str(SBATCH_SCRIPT),
        ]

    tasks = grid_dir / "slurm" / "tasks"
    if dry_run:
        print("  " + shlex.join(step("data", None, ["prepare-data", str(grid_dir)])))
        for key, runs in groups.items():
            print(f"  array of {len(runs)} ({', '.join(r.name for r in runs)}):")
            argv = array(key, len(runs), tasks / f"{stamp}-XXXX", "<data job>")
            print("    " + shlex.join(argv))
        print("  " + shlex.join(step("summary", "afterany:<arrays>", ["summarize", str(grid_dir)])))
        return 0
    write_grid_record(grid, plan.runs)
    logs.mkdir(parents=True, exist_ok=True)
    tasks.mkdir(parents=True, exist_ok=True)
    submitted: list[str] = []
    try:  # all or nothing: a refused sbatch cancels the jobs this submission made
        data_job = _sbatch(step("data", None, ["prepare-data", str(grid_dir)]))
        submitted.append(data_job)
        arrays = []
        env = {"SLOWQK_CONTAINER_IMAGE": job.container_image} if job.container_image else {}
        for key, runs in groups.items():
            task_dir = Path(tempfile.mkdtemp(prefix=f"{stamp}-", dir=tasks))  # never shared
            for i, run in enumerate(with_grid_data(grid_dir, runs)):
                _write_task(task_dir / str(i), run)
            job_id = _sbatch(array(key, len(runs), task_dir, data_job), env)
            submitted.append(job_id)
            arrays.append({"job": job_id, "runs": [r.name for r in runs]})
        after = ":".join(a["job"] for a in arrays)
        summary_job = _sbatch(step("summary", f"afterany:{after}", ["summarize", str(grid_dir)]))
    except SlurmUnavailable:
        if submitted:
            _slurm(["scancel", *submitted])
        raise
    record = {
        "submitted": stamp,
        "data_job": data_job,
        "arrays": arrays,
        "summary_job": summary_job,
    }
    with open(grid_dir / SUBMISSIONS, "a") as f:
        f.write(json.dumps(record) + "\n")
    at_a_time = f", {max_concurrent} at a time" if max_concurrent else ""
    for a in arrays:
        print(f"  array {a['job']}: {len(a['runs'])} tasks{at_a_time}")
    print(f"  data job {data_job} first, summary job {summary_job} after the array")
    print(f"  follow with: slowqk experiment status {grid_dir}")
    return 0


def _last_line(*paths: Path) -> str:
    for path in paths:
        if path.is_file():
            lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
            if lines:
                return lines[-1].strip()
    return "(no log)"


def grid_status(grid_dir: Path) -> tuple[list[str], dict[str, int]]:
    """One line per run (state, SLURM job id, and for a failure its log's last line), and the
    count per state."""
    grid, runs = read_grid_record(grid_dir)
    tasks, states = _queued_tasks(grid_dir)
    lines, counts = [], {}
    for run in runs:
        name, task = run.name, tasks.get(run.name)
        detail = ""
        if is_finished(run):
            state = "finished"
        elif task is None:
            state = "not submitted"
        elif task in states:
            slurm_state, reason = states[task]
            state = "running" if slurm_state in RUNNING else "pending"
            if state == "pending" and reason not in ("None", ""):
                detail = f" ({reason})"
        else:
            state = "failed"
            array, index = task.split("_")
            job_log = grid_dir / "slurm" / "logs" / f"{grid.name}-{array}_{index}.out"
            detail = ": " + _last_line(Path(run.run_dir) / "logs" / "rank0.log", job_log)
        counts[state] = counts.get(state, 0) + 1
        lines.append(f"{name:<40} {state:<13} {task or '-':<12}{detail}")
    return lines, counts


def find_grid_dir(grid_or_dir: str) -> Path:
    """A grid directory, or the one a grid file writes to."""
    path = Path(grid_or_dir)
    return path if path.is_dir() else Path(load_grid(grid_or_dir).out_dir)


def print_status(grid_or_dir: str) -> int:
    grid_dir = find_grid_dir(grid_or_dir)
    lines, counts = grid_status(grid_dir)  # (refuses a folder without a grid record)
    print(f"{'run':<40} {'state':<13} {'slurm job':<12}")
    print("\n".join(lines))
    print(", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    return 0
