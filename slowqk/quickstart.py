"""The embedded default: the tiny recipe twice (control, intervention), a table and a plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from slowqk.config import load_recipe
from slowqk.distributed import single_process_env
from slowqk.metrics import read_metrics

ARMS = {"control": ["qk.enabled=false"], "intervention": ["qk.enabled=true"]}


def run_arm(recipe: str, overrides: list[str], out: Path, arm: str) -> dict:
    """Train one arm in its own process (the same command a user runs) and return its summary."""
    args = [*overrides, *ARMS[arm], f"out_dir={out / arm}", f"name={arm}"]
    load_recipe(recipe, args)  # fail fast, with the recipe error, before starting a process
    cmd = [sys.executable, "-m", "slowqk.cli", "train", recipe, *args, "--no-resume"]

    env = single_process_env(
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    )
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(
            f"the {arm} arm failed (exit code {proc.returncode}); its output is above"
        )
    return json.loads((out / arm / "summary.json").read_text())


def format_table(summaries: dict[str, dict]) -> str:
    header = f"{'arm':<14}{'val loss':>10}{'val ppl':>10}{'tokens/s':>11}{'train s':>9}"
    rows = [header, "-" * len(header)]
    for arm, s in summaries.items():
        rows.append(
            f"{arm:<14}{s['final_val_loss']:>10.4f}{s['final_val_ppl']:>10.2f}"
            f"{s['tokens_per_s']:>11.0f}{s['train_seconds']:>9.1f}"
        )
    if {"control", "intervention"} <= summaries.keys():
        d = summaries["intervention"]["final_val_loss"] - summaries["control"]["final_val_loss"]
        rows.append(
            f"difference (intervention - control): val loss {d:+.4f} (one seed, no error bar)"
        )
    return "\n".join(rows)


def plot_curves(out: Path, arms: list[str]) -> Path:
    # deferred: matplotlib is slow to import, and only this path needs it
    import matplotlib

    matplotlib.use("Agg")
    # deferred: matplotlib is slow to import, and only this path needs it
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for arm in arms:
        recs = read_metrics(out / arm / "metrics.jsonl")
        ax_train.plot([r["step"] for r in recs], [r["loss"] for r in recs], label=arm)
        val = [r for r in recs if "val_loss" in r]
        ax_val.plot([r["step"] for r in val], [r["val_loss"] for r in val], marker="o", label=arm)
    for ax, title in ((ax_train, "training loss"), (ax_val, "validation loss")):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out / "loss_curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_quickstart(recipe: str, overrides: list[str], out: str, steps: int | None = None) -> int:
    out_dir = Path(out)
    overrides = list(overrides) + ([f"train.steps={steps}"] if steps is not None else [])
    load_recipe(recipe, overrides)  # a bad recipe or --steps is one line here, before anything runs
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        summaries = {arm: run_arm(recipe, overrides, out_dir, arm) for arm in ARMS}
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    table = format_table(summaries)
    png = plot_curves(out_dir, list(ARMS))
    (out_dir / "results.json").write_text(json.dumps(summaries, indent=2))
    (out_dir / "results.txt").write_text(table + "\n")
    print("\n" + table)
    print(f"\nloss curves: {png}\nresults: {out_dir / 'results.json'}")
    return 0
