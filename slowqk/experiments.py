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
    RecipeError,
    StrictSection,
    load_recipe,
    parse_override,
    resolve_recipe_path,
)
from slowqk.data.corpus import prepare_corpus
from slowqk.distributed import single_process_env
from slowqk.metrics import read_metrics
from slowqk.provenance import differences, provenance


class Variant(StrictSection):
    recipe: str
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


class Contrast(StrictSection):
    """``arm - minus`` over the seeds both ran, each named ``variant/arm``."""

    name: str
    arm: str
    minus: str
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


@dataclass(frozen=True)
class Run:
    variant: str
    arm: str
    seed: int
    recipe: str
    overrides: tuple[str, ...]
    run_dir: str


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
        for key in ("arm", "minus"):
            if getattr(c, key) not in ran:
                raise RecipeError(
                    f"{path}: key 'contrasts.{i}.{key}': {getattr(c, key)!r} is no variant/arm the "
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


def _shared_corpora(grid_dir: Path, runs: list[Run]) -> list[Run]:
    """Prepare each distinct bundled-corpus dataset once and point the runs at it (the tokenizer
    and shards would otherwise be rebuilt in every run directory)."""
    prepared: dict[str, Path] = {}
    out = []
    for run in runs:
        d = load_recipe(run.recipe, list(run.overrides)).data
        if d.corpus is None:
            out.append(run)
            continue
        key = json.dumps([str(d.corpus), d.valid_fraction, d.tokenizer_vocab_size, d.tokenizer])
        if key not in prepared:
            where = grid_dir / "data" / hashlib.sha256(key.encode()).hexdigest()[:12]
            prepared[key] = prepare_corpus(
                d.corpus,
                where,
                valid_fraction=d.valid_fraction,
                vocab_size=d.tokenizer_vocab_size,
                tokenizer=d.tokenizer,
            ).dataset_dir
        extra = ("data.corpus=null", f"data.dataset={prepared[key]}")
        out.append(
            Run(run.variant, run.arm, run.seed, run.recipe, run.overrides + extra, run.run_dir)
        )
    return out


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


def run_grid(
    grid: Grid, jobs: int = 1, dry_run: bool = False, only: list[str] | None = None
) -> int:
    """Run every unfinished run of ``grid`` (of the variants ``only`` names, if given; the record
    lists them all); ``jobs`` processes at a time. Returns an exit code."""
    runs = expand(grid)
    grid_dir = Path(grid.out_dir)
    todo = [r for r in expand(grid, only) if not is_finished(r)]
    print(
        f"grid {grid.name}: {len(runs)} runs, {sum(map(is_finished, runs))} finished, {len(todo)} "
        f"to run{' (variants ' + ', '.join(only) + ')' if only else ''}, {jobs} at a time"
    )
    if dry_run:
        for r in todo:
            print("  slowqk train", r.recipe, " ".join(r.overrides))
        return 0
    grid_dir.mkdir(parents=True, exist_ok=True)
    record = {"grid": grid.model_dump(mode="json"), "runs": [asdict(r) for r in runs]}
    tmp = grid_dir / "grid.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(grid_dir / "grid.json")
    todo = _shared_corpora(grid_dir, todo)
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
            print(
                f"  {run.variant}/{run.arm}/seed{run.seed}: {status} in {seconds:.0f} s", flush=True
            )
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
    grid_dir = Path(grid_dir)
    record_path = grid_dir / "grid.json"
    if not record_path.is_file():
        raise FileNotFoundError(
            f"{record_path}: not a grid directory (run `slowqk experiment run` first)"
        )
    runs = [
        Run(**{**r, "overrides": tuple(r["overrides"])})
        for r in json.loads(record_path.read_text())["runs"]
    ]
    names = {f"{r.variant}/{r.arm}/seed{r.seed}": r for r in runs}
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
    again = _shared_corpora(Path(grid_dir), [again])[0]
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
    rtol = None if bitwise else CROSS_KERNEL_RTOL
    diff = _first_difference(
        read_metrics(Path(run.run_dir) / "metrics.jsonl"),
        read_metrics(target / "metrics.jsonl"),
        rtol,
    )
    final_rtol = CROSS_KERNEL_RTOL["val_loss"] if rtol else 0.0
    if diff is None and _differs(recorded["final_val_loss"], new["final_val_loss"], final_rtol):
        diff = (
            f"final val loss {recorded['final_val_loss']!r} recorded, "
            f"{new['final_val_loss']!r} re-run"
        )
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
