"""Experiment grids: arms x model variants x seeds (x sweep points), run as local processes.

A grid file (YAML)::

    name: study
    out_dir: runs/study
    seeds: [1, 2, 3]
    overrides: {train.steps: 600}          # every run
    control: control                        # the arm paired differences are taken against
    arms:
      control: {qk.enabled: false}
      slowqk: {qk.enabled: true}
    variants:
      gpt: {recipe: tiny/gpt}
      llama: {recipe: tiny/llama, seeds: [1, 2]}   # a variant may use fewer seeds (or arms: [...])
    sweep: {qk.mult_q: [0.1, 0.25]}         # optional: every non-control arm x each point
    contrasts:                              # optional: pre-registered paired comparisons
      - {name: slowqk-vs-control, arm: gpt/slowqk, minus: gpt/control}
    correction: holm                        # within each contrast family: holm | bonferroni | none

Each run lives in ``<out_dir>/<variant>/<arm>/seed<k>/`` with its resolved recipe; a run whose
``summary.json`` records all its steps is skipped, and an interrupted one resumes from its latest
checkpoint. Command-line overrides with a list value (``qk.mult_q=[0.1,0.5]``) join the sweep;
other overrides apply to every run.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from slowqk.config import (
    DataConfig,
    RecipeError,
    StrictSection,
    load_recipe,
    parse_override,
    resolve_recipe_path,
)
from slowqk.data.corpus import DATASET_DIR
from slowqk.data.stage import needs_stage, prepare_stage, stage_inputs
from slowqk.distributed import single_process_env
from slowqk.grid_record import RECORD, read_record
from slowqk.metrics import read_metrics
from slowqk.provenance import differences, provenance


class ClusterLayout(StrictSection):
    """A run's share of a SLURM cluster (``experiment submit``), one rank per task; a variant's
    layout wins over the grid's, the grid's over the command line's."""

    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node, one rank each (0: CPU ranks)")
    tasks_per_node: int | None = Field(None, ge=1, description="default: one per GPU, or 1")


class Variant(StrictSection):
    recipe: str
    layout: ClusterLayout | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)
    seeds: list[int] | None = None
    arms: list[str] | None = Field(
        None, description="only these arms (default: all; [] = only the control)"
    )
    control: bool = Field(
        True,
        description="run the control arm here (false: the variant's arms are compared "
        "with another variant's control through contrasts)",
    )


class Difference(StrictSection):
    """``arm - minus``, each named ``variant/arm``."""

    arm: str
    minus: str


class Contrast(StrictSection):
    """``arm - minus`` over the seeds both ran, each named ``variant/arm``; with ``versus``, that
    difference minus another one, seed by seed (an interaction: does an effect change between
    two settings?)."""

    name: str
    arm: str
    minus: str
    versus: Difference | None = Field(
        None, description="subtract this difference of the same seed (difference in differences)"
    )
    family: str = Field(
        "primary", description="the correction runs within each family (e.g. primary, secondary)"
    )


class Grid(StrictSection):
    name: str
    out_dir: str
    seeds: list[int] = Field(min_length=1)
    arms: dict[str, dict[str, Any]] = Field(min_length=1)
    control: str = "control"
    variants: dict[str, Variant] = Field(min_length=1)
    overrides: dict[str, Any] = Field(default_factory=dict)
    sweep: dict[str, list[Any]] = Field(default_factory=dict)
    contrasts: list[Contrast] = Field(default_factory=list)
    correction: Literal["holm", "bonferroni", "none"] = Field(
        "holm", description="family-wise correction over `contrasts` (alpha 0.05)"
    )
    layout: ClusterLayout | None = Field(
        None, description="every run's layout on SLURM (experiment submit), unless its variant's"
    )
    one_dataset: bool = Field(
        True,
        description="every run reads the same data (checked before anything runs); false for a "
        "grid whose arms compare data: each distinct preparation is still made once",
    )


@dataclass(frozen=True)
class Run:
    variant: str
    arm: str
    seed: int
    recipe: str
    overrides: tuple[str, ...]
    run_dir: str

    @property
    def name(self) -> str:
        return f"{self.variant}/{self.arm}/seed{self.seed}"


def _as_override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value) if not isinstance(value, str) else value}"


def load_grid(path: str | Path, cli_overrides: list[str] | None = None) -> Grid:
    path = resolve_recipe_path(str(path))
    try:
        grid = Grid.model_validate(yaml.safe_load(path.read_text()) or {})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(map(str, first["loc"])) or "<top>"
        raise RecipeError(f"{path}: key {where!r}: {first['msg']}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({exc})") from None
    if grid.control not in grid.arms:
        raise RecipeError(
            f"{path}: control arm {grid.control!r} is not among arms {sorted(grid.arms)}"
        )
    for vname, variant in grid.variants.items():
        unknown = sorted(set(variant.arms or []) - set(grid.arms))
        if unknown:
            raise RecipeError(
                f"{path}: key 'variants.{vname}.arms': {unknown} not among arms {sorted(grid.arms)}"
            )
    for text in cli_overrides or []:
        parts, value = parse_override(text)
        key = ".".join(parts)
        if isinstance(value, list):
            grid.sweep = {**grid.sweep, key: value}
        else:
            grid.overrides = {**grid.overrides, key: value}
    for key, values in grid.sweep.items():
        if not values:
            raise RecipeError(f"{path}: sweep {key!r} has no values")
    ran = {
        f"{v}/{_point_name(a, p)}"
        for v, a in _cells(grid)
        for p in ([{}] if a == grid.control else _sweep_points(grid.sweep))
    }
    names = [c.name for c in grid.contrasts]
    for i, c in enumerate(grid.contrasts):
        named = [(key, getattr(c, key)) for key in ("arm", "minus")]
        if c.versus is not None:
            named += [(f"versus.{key}", getattr(c.versus, key)) for key in ("arm", "minus")]
        for key, cell in named:
            if cell not in ran:
                raise RecipeError(
                    f"{path}: key 'contrasts.{i}.{key}': {cell!r} is no variant/arm the "
                    f"grid runs ({', '.join(sorted(ran))})"
                )
        if names.count(c.name) > 1:
            raise RecipeError(f"{path}: key 'contrasts.{i}.name': {c.name!r} is used twice")
    return grid


def _sweep_points(sweep: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(sweep)
    return [
        dict(zip(keys, combo, strict=True))
        for combo in itertools.product(*(sweep[k] for k in keys))
    ]


def _point_name(arm: str, point: dict[str, Any]) -> str:
    if not point:
        return arm
    return arm + "[" + ",".join(f"{k.split('.')[-1]}={v}" for k, v in point.items()) + "]"


def _cells(grid: Grid) -> list[tuple[str, str]]:
    """``(variant, arm)`` of every cell the grid runs (before sweep points)."""
    out = []
    for vname, variant in grid.variants.items():
        for arm in grid.arms:
            if arm == grid.control and not variant.control:
                continue
            if variant.arms is not None and arm != grid.control and arm not in variant.arms:
                continue
            out.append((vname, arm))
    return out


def expand(grid: Grid, only: list[str] | None = None) -> list[Run]:
    """Every run of the grid (of the variants ``only`` names, if given), each validated as a recipe
    (so a bad grid fails before any run)."""
    out = Path(grid.out_dir)
    unknown = sorted(set(only or []) - set(grid.variants))
    if unknown:
        raise RecipeError(
            f"grid {grid.name!r}: --only {unknown}: not among variants {sorted(grid.variants)}"
        )
    runs: list[Run] = []
    for vname, arm in _cells(grid):
        if only and vname not in only:
            continue
        variant, arm_overrides = grid.variants[vname], grid.arms[arm]
        points = [{}] if arm == grid.control else _sweep_points(grid.sweep)
        for point in points:
            name = _point_name(arm, point)
            for seed in variant.seeds or grid.seeds:
                run_dir = out / vname / name / f"seed{seed}"
                merged = {**grid.overrides, **variant.overrides, **arm_overrides, **point}
                overrides = tuple(
                    [_as_override(k, v) for k, v in merged.items()]
                    + [f"seed={seed}", f"out_dir={run_dir}", f"name={vname}-{name}-seed{seed}"]
                )
                try:
                    load_recipe(variant.recipe, list(overrides))
                except RecipeError as exc:
                    raise RecipeError(
                        f"grid {grid.name!r}, run {vname}/{name}/seed{seed}: {exc}"
                    ) from None
                runs.append(Run(vname, name, seed, variant.recipe, overrides, str(run_dir)))
    return runs


def is_finished(run: Run) -> bool:
    summary = Path(run.run_dir) / "summary.json"
    if not summary.is_file():
        return False
    steps = load_recipe(run.recipe, list(run.overrides)).train.steps
    try:
        return json.loads(summary.read_text()).get("steps") == steps
    except json.JSONDecodeError:
        return False


def _data_identity(data: DataConfig) -> dict:
    """What decides the tokens a run reads (paths resolved; ``verify`` only checks them)."""
    out = data.model_dump(mode="json", exclude={"verify"})
    for key in ("corpus", "tokenizer"):
        out[key] = str(Path(out[key]).resolve()) if out[key] else None
    if out["dataset"] is not None:
        paths = out["dataset"] if isinstance(out["dataset"], list) else [out["dataset"]]
        out["dataset"] = [str(Path(p).resolve()) for p in paths]
    return out


def grid_data(grid: Grid, runs: list[Run]) -> list[DataConfig]:
    """The distinct data sections the runs read, in order of first use. With ``one_dataset`` (the
    default) there must be one: a grid whose runs would read different data is refused, naming
    two of them and the key."""
    seen: dict[str, tuple[Run, dict, DataConfig]] = {}
    for run in runs:
        data = load_recipe(run.recipe, list(run.overrides)).data
        ident = _data_identity(data)
        seen.setdefault(json.dumps(ident, sort_keys=True), (run, ident, data))
        if grid.one_dataset and len(seen) > 1:
            (a, first, _), (b, other, _) = list(seen.values())
            key = next(k for k in other if other[k] != first[k])
            raise RecipeError(
                f"grid {grid.name!r}: runs read different data ({a.variant}/{a.arm}/seed{a.seed} "
                f"has data.{key}={first[key]}, {b.variant}/{b.arm}/seed{b.seed} has "
                f"data.{key}={other[key]}); a grid compares runs on one dataset unless it sets "
                "one_dataset: false"
            )
    return [data for _, _, data in seen.values()]


def grid_data_dir(grid_dir: Path, data: DataConfig) -> Path:
    """Where a grid's corpus is prepared (one folder per distinct preparation inputs)."""
    key = json.dumps(stage_inputs(data), sort_keys=True)
    return grid_dir / "data" / hashlib.sha256(key.encode()).hexdigest()[:12]


def with_grid_data(grid_dir: Path, runs: list[Run]) -> list[Run]:
    """The runs pointed at the grid's prepared datasets (a corpus is never prepared per run)."""
    out = []
    for r in runs:
        data = load_recipe(r.recipe, list(r.overrides)).data
        if needs_stage(data):
            dataset = grid_data_dir(grid_dir, data) / DATASET_DIR
            r = Run(
                r.variant,
                r.arm,
                r.seed,
                r.recipe,
                (*r.overrides, "data.corpus=null", f"data.dataset={dataset}"),
                r.run_dir,
            )
        out.append(r)
    return out


def prepare_recorded_grid_data(grid_dir: str | Path) -> list[Path]:
    """The data stage of a grid directory (the data job of ``experiment submit``)."""
    grid, runs = read_grid_record(grid_dir)
    return prepare_grid_data(Path(grid_dir), grid_data(grid, runs))


def prepare_grid_data(grid_dir: Path, datas: list[DataConfig]) -> list[Path]:
    """The data stage of a grid: each corpus its runs read prepared once."""
    return [
        prepare_stage(d, grid_data_dir(grid_dir, d), progress=False)
        for d in datas
        if needs_stage(d)
    ]


def _train(run: Run, threads: int) -> tuple[Run, int, float]:
    run_dir = Path(run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "slowqk.cli",
        "train",
        run.recipe,
        *run.overrides,
        "train.progress_bar=false",
        "--quiet",
    ]

    env = single_process_env(OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    with open(run_dir / "train.log", "ab") as log:
        code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    return run, code, time.perf_counter() - start


# what a grid may change in its directory: how its runs are read and laid out, not what they are
NOT_RUN_DECIDING = ("contrasts", "correction", "layout", "one_dataset")


def _run_deciding(dump: dict) -> dict:
    out = {k: v for k, v in dump.items() if k not in NOT_RUN_DECIDING}
    out["variants"] = {
        name: {k: v for k, v in variant.items() if k != "layout"}
        for name, variant in dump["variants"].items()
    }
    return out


def check_grid_dir(grid: Grid) -> None:
    """Refuse a grid directory whose record was written by another grid (its runs would mix)."""
    record_path = Path(grid.out_dir) / RECORD
    if not record_path.is_file():
        return
    try:
        recorded = json.loads(record_path.read_text())["grid"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise RecipeError(f"{record_path}: not a grid record (damaged?)") from None
    mine = _run_deciding(grid.model_dump(mode="json"))
    try:  # the record as this version reads it (keys added since take their defaults)
        recorded = _run_deciding(Grid.model_validate(recorded).model_dump(mode="json"))
    except ValidationError:
        raise RecipeError(f"{record_path}: written by another grid (not valid here)") from None
    recorded["out_dir"] = mine["out_dir"]  # the same folder, however it was named
    if recorded != mine:
        key = next(k for k in mine if recorded.get(k) != mine[k])
        raise RecipeError(
            f"{record_path}: written by another grid (key {key!r}: {recorded.get(key)!r} there, "
            f"{mine[key]!r} here); use another out_dir"
        )


def read_grid_record(grid_dir: str | Path) -> tuple[Grid, list[Run]]:
    """The grid and its runs as ``experiment run`` / ``submit`` recorded them."""
    record = read_record(grid_dir)
    runs = [Run(**{**r, "overrides": tuple(r["overrides"])}) for r in record["runs"]]
    return Grid.model_validate(record["grid"]), runs


def write_grid_record(grid: Grid, runs: list[Run]) -> None:
    grid_dir = Path(grid.out_dir)
    grid_dir.mkdir(parents=True, exist_ok=True)
    record = {"grid": grid.model_dump(mode="json"), "runs": [asdict(r) for r in runs]}
    tmp = grid_dir / "grid.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(grid_dir / RECORD)


@dataclass(frozen=True)
class GridPlan:
    runs: list[Run]  # every run of the grid
    todo: list[Run]  # the unfinished runs asked for
    data: list[DataConfig]  # the distinct data the runs read (one unless one_dataset is false)


def plan_grid(grid: Grid, only: list[str] | None = None) -> GridPlan:
    """Every check before anything runs or is submitted: each run a valid recipe, one dataset
    for the grid, a grid directory of this grid only."""
    runs = expand(grid)
    data = grid_data(grid, runs)
    check_grid_dir(grid)
    # seed by seed (every cell's seed 1, then seed 2, ...): a grid cut short by a time limit
    # leaves complete pairs
    seeds = sorted({r.seed for r in runs}, key=[r.seed for r in runs].index)
    todo = sorted(
        (r for r in expand(grid, only) if not is_finished(r)), key=lambda r: seeds.index(r.seed)
    )
    return GridPlan(runs, todo, data)


def run_grid(
    grid: Grid, jobs: int = 1, dry_run: bool = False, only: list[str] | None = None
) -> int:
    """Run every unfinished run of ``grid`` (of the variants ``only`` names, if given; the record
    lists them all); ``jobs`` processes at a time. Returns an exit code."""
    plan = plan_grid(grid, only)
    grid_dir = Path(grid.out_dir)
    print(
        f"grid {grid.name}: {len(plan.runs)} runs, {sum(map(is_finished, plan.runs))} finished, "
        f"{len(plan.todo)} to run{' (variants ' + ', '.join(only) + ')' if only else ''}, "
        f"{jobs} at a time"
    )
    if dry_run:
        for r in plan.todo:
            print("  slowqk train", r.recipe, " ".join(r.overrides))
        return 0
    write_grid_record(grid, plan.runs)
    prepare_grid_data(grid_dir, plan.data)
    todo = with_grid_data(grid_dir, plan.todo)
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs))
    failed = []
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for run, code, seconds in pool.map(lambda r: _train(r, threads), todo):
            status = (
                "ok"
                if code == 0
                else f"FAILED (exit {code}; log: {Path(run.run_dir) / 'train.log'})"
            )
            print(f"  {run.name}: {status} in {seconds:.0f} s", flush=True)
            if code != 0:
                failed.append(run)
    print(
        f"grid {grid.name}: {len(todo) - len(failed)} runs done, {len(failed)} failed, "
        f"{time.perf_counter() - start:.0f} s wall"
    )
    return 1 if failed else 0


# values that must come out bitwise equal in a re-run (timings and the like may differ)
COMPARED = ("loss", "val_loss", "grad_norm", "lower_drift")
# Where the kernels differ (another CPU vector capability, BLAS or oneDNN build, torch), a re-run
# rounds differently from the first step and the difference grows with the steps; it is then
# compared within these relative tolerances instead. Measured on tiny/gpt over 150 steps, AVX2 and
# the scalar path against AVX-512: losses within 1.3e-5, gradient norms within 1.3e-3
# (docs/results/reproduce/)
CROSS_KERNEL_RTOL = {"loss": 1e-4, "val_loss": 1e-4, "grad_norm": 1e-2, "lower_drift": 1e-2}


def find_run(grid_dir: str | Path, which: str) -> Run:
    """The run ``variant/arm/seedK`` of a grid directory (as ``experiment run`` listed it)."""
    _, runs = read_grid_record(grid_dir)
    names = {r.name: r for r in runs}
    if which not in names:
        raise ValueError(
            f"{grid_dir}: no run {which!r}; runs are named variant/arm/seedK, e.g. "
            f"{next(iter(names))}"
        )
    return names[which]


def _differs(x, y, rtol: float) -> bool:
    if rtol == 0.0 or not all(isinstance(v, (int, float)) for v in (x, y)):
        return x != y
    return abs(x - y) > rtol * max(abs(x), abs(y))


def _first_difference(
    recorded: list[dict], again: list[dict], rtol: dict[str, float] | None = None
) -> str | None:
    """The first logged value that differs (bitwise, or by more than its key's ``rtol``)."""
    a = {r["step"]: r for r in recorded}
    b = {r["step"]: r for r in again}
    if sorted(a) != sorted(b):
        return f"logged steps differ: {len(a)} recorded, {len(b)} re-run"
    for step in sorted(a):
        for key in COMPARED:
            if _differs(a[step].get(key), b[step].get(key), (rtol or {}).get(key, 0.0)):
                return (
                    f"step {step}: {key} {a[step].get(key)!r} recorded, {b[step].get(key)!r} re-run"
                )
    return None


def reproduce(
    grid_dir: str | Path, which: str, out_dir: str | Path | None = None
) -> tuple[bool, str]:
    """Re-run one listed run from scratch with its recorded thread count and compare its logged
    losses, gradient norms and final validation loss: bit for bit where the code, environment and
    CPU kernels are the recorded ones, else within :data:`CROSS_KERNEL_RTOL`.
    ``(reproduced, report)``."""
    run = find_run(grid_dir, which)
    summary_path = Path(run.run_dir) / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(
            f"{summary_path}: the run {which} has not finished; nothing to compare with"
        )
    recorded = json.loads(summary_path.read_text())
    prov = recorded.get("provenance") or {}
    threads = int(prov.get("threads") or 1)
    target = Path(out_dir) if out_dir else Path(grid_dir) / "reproduce" / which
    shutil.rmtree(target, ignore_errors=True)
    again = Run(
        run.variant,
        run.arm,
        run.seed,
        run.recipe,
        tuple(o for o in run.overrides if not o.startswith("out_dir=")) + (f"out_dir={target}",),
        str(target),
    )
    again = with_grid_data(Path(grid_dir), [again])[0]
    prepare_grid_data(Path(grid_dir), [load_recipe(run.recipe, list(run.overrides)).data])
    _, code, seconds = _train(again, threads)
    if code != 0:
        return False, f"{which}: the re-run failed (exit {code}; log: {target / 'train.log'})"
    new = json.loads((target / "summary.json").read_text())

    env = (
        differences(prov, new.get("provenance") or {})
        if prov
        else ["the run has no provenance record"]
    )
    # bitwise is to be expected only from the same code, packages, threads and kernels
    bitwise = not env
    before, after = (read_metrics(d / "metrics.jsonl") for d in (Path(run.run_dir), target))

    def first_difference(rtol: dict | None) -> str | None:
        diff = _first_difference(before, after, rtol)
        final_rtol = CROSS_KERNEL_RTOL["val_loss"] if rtol else 0.0
        if diff is None and _differs(recorded["final_val_loss"], new["final_val_loss"], final_rtol):
            diff = (
                f"final val loss {recorded['final_val_loss']!r} recorded, "
                f"{new['final_val_loss']!r} re-run"
            )
        return diff

    diff = first_difference(None if bitwise else CROSS_KERNEL_RTOL)
    # where only a tolerance was promised, say whether every bit agreed all the same (e.g. a later
    # commit that changed no arithmetic)
    exact = bitwise or (diff is None and first_difference(None) is None)
    lines = [
        f"{which}: re-ran in {seconds:.0f} s with {threads} thread{'' if threads == 1 else 's'} "
        f"into {target}",
        "made with the same code, environment and CPU kernels: bitwise equality expected"
        if bitwise
        else "differs from the recorded code, environment or CPU kernels ("
        + "; ".join(env)
        + "): bitwise equality is not to be expected; compared within "
        + ", ".join(f"{v:g} on {k}" for k, v in CROSS_KERNEL_RTOL.items())
        + " (relative)",
    ]
    agreement = "bitwise" if bitwise else "within tolerance"
    if diff is None:
        lines.append(
            f"reproduces {agreement}: every logged loss and gradient norm, final val loss "
            f"{new['final_val_loss']!r}"
            + ("" if bitwise or not exact else "; in fact bit for bit: every value equal")
        )
    else:
        lines.append(
            f"does NOT reproduce {agreement}: {diff} (final val loss "
            f"{recorded['final_val_loss']!r} recorded, {new['final_val_loss']!r} re-run, "
            f"difference {new['final_val_loss'] - recorded['final_val_loss']:+.3g})"
        )
    if not prov and provenance().get("commit") is None:
        lines.append("(no git checkout here either: compare package versions by hand)")
    return diff is None, "\n".join(lines)
