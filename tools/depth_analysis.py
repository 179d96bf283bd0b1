"""The depth grid's mechanism analyses (M1-M3 of recipes/study/depth.yaml), as pre-registered.

    python tools/depth_analysis.py runs/depth --out docs/results/depth

Reads every finished run's summary.json and diagnostics.jsonl (probes at 1, 2, 4, ... and every
50 steps) and writes ``mechanism.json``, ``mechanism.md`` and four plots, each stamped with the
commit that made the runs:

- M1, delay: per depth, an arm minus the control, paired by seed, in the upper layers' mean
  specialization step (first probe with normalized entropy < 0.9; a layer that never crosses
  counts as crossing at the last probe, as summary.json's censored gap does) and in their mean
  entropy at probe step 16.
- M2, prediction: a control seed's early gap (upper minus lower mean entropy at step 16) against
  that seed's benefit from the recipe (control minus slowqk final loss), GPT depths pooled after
  centring both within depth; Pearson r, Fisher-z 95% interval with n - 5 degrees.
- M3, the early warning: which control runs it fired on, the benefit of those seeds against the
  others; the gap threshold that best splits seeds with a benefit from those without
  (exploratory, in sample).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from slowqk.summary import (
    RunResult,
    collect,
    commits_stamp,
    paired_interval,
    pyplot,
    save_figure,
)

THRESHOLD = "0.9"
EARLY_STEP = 16
# exploratory, chosen after the runs: every layer's attention was still uniform at step 16 (the
# warmup's learning rate was a quarter of its peak), and 51 is the first probe after it was not
LATER_STEP = 51
GPT_DEPTHS = ("d4", "d8", "d16")
COLORS = {"control": "0.35", "slowqk": "tab:red", "quack": "tab:blue"}


def _summary(run: RunResult) -> dict:
    return json.loads((run.run_dir / "summary.json").read_text())


def _upper_lower(num_layers: int) -> tuple[list[int], list[int]]:
    half = num_layers // 2  # qk.layers top_fraction 0.5: index >= L/2
    return list(range(half, num_layers)), list(range(half))


def _probe(run: RunResult, step: int) -> dict[int, float]:
    for rec in run.diagnostics:
        if rec["step"] == step:
            return {int(k): v["entropy"] for k, v in rec["layers"].items()}
    raise ValueError(f"{run.run_dir}: no probe at step {step}")


def run_measures(run: RunResult) -> dict:
    """The per-run quantities M1-M3 read."""
    s = _summary(run)
    steps = s["specialization"]["steps"][THRESHOLD]
    last = max(rec["step"] for rec in run.diagnostics)  # not crossed: counted at the last probe
    upper, lower = _upper_lower(len(steps))
    early, later = _probe(run, EARLY_STEP), _probe(run, LATER_STEP)
    return {
        "final_val_loss": run.final_val_loss,
        "spec_steps": [last if x is None else x for x in steps],
        "uncrossed": sum(x is None for x in steps),
        "upper_spec_step": float(np.mean([last if steps[i] is None else steps[i] for i in upper])),
        "upper_entropy_early": float(np.mean([early[i] for i in upper])),
        "early_gap": float(np.mean([early[i] for i in upper]) - np.mean([early[i] for i in lower])),
        "upper_entropy_later": float(np.mean([later[i] for i in upper])),
        "later_gap": float(np.mean([later[i] for i in upper]) - np.mean([later[i] for i in lower])),
        "warning": s.get("specialization_warning"),
        # the learning-rate groups' hooks (QuacK's norms among them) against the rest of training
        "hooks_percent": 100
        * s["lr_groups_seconds"]
        / (s["train_seconds"] - s["lr_groups_seconds"]),
    }


def _interval(diffs: list[float]) -> dict:
    ci = paired_interval(diffs)
    return {"n": ci.n, "mean": ci.mean, "ci95": [ci.low, ci.high], "values": diffs}


def delay(measures: dict, variant: str, arm: str) -> dict:
    """M1: ``arm`` minus the control of ``variant``, paired by seed."""
    ctl, other = measures[(variant, "control")], measures[(variant, arm)]
    seeds = sorted(set(ctl) & set(other))
    out = {"variant": variant, "arm": arm, "seeds": seeds}
    for key in ("upper_spec_step", "upper_entropy_early", "upper_entropy_later"):
        out[key] = _interval([other[k][key] - ctl[k][key] for k in seeds])
    return out


def fisher_interval(r: float, dof: int) -> list[float]:
    """95% interval of a correlation by Fisher's z with ``dof`` = n - 3 for a plain r."""
    if dof <= 0 or abs(r) >= 1:
        return [math.nan, math.nan]
    z, half = math.atanh(r), 1.959963984540054 / math.sqrt(dof)
    return [math.tanh(z - half), math.tanh(z + half)]


def prediction(measures: dict, gap_key: str = "early_gap") -> dict:
    """M2: early gap of the control seed against its benefit, centred within depth, pooled."""
    gaps, benefits, per_depth = [], [], {}
    for variant in GPT_DEPTHS:
        ctl, rec = measures.get((variant, "control"), {}), measures.get((variant, "slowqk"), {})
        seeds = sorted(set(ctl) & set(rec))
        g = np.array([ctl[k][gap_key] for k in seeds])
        b = np.array([ctl[k]["final_val_loss"] - rec[k]["final_val_loss"] for k in seeds])
        if len(seeds) >= 3:
            r = float(np.corrcoef(g, b)[0, 1])
            per_depth[variant] = {
                "n": len(seeds),
                "r": r,
                "ci95": fisher_interval(r, len(seeds) - 3),
            }
        gaps += list(g - g.mean()) if len(g) else []
        benefits += list(b - b.mean()) if len(b) else []
    n = len(gaps)
    r = float(np.corrcoef(gaps, benefits)[0, 1]) if n >= 3 else math.nan
    return {
        "n": n,
        "r": r,
        "ci95": fisher_interval(r, n - 5),
        "per_depth": per_depth,
        "gap_centred": gaps,
        "benefit_centred": benefits,
    }


def warning_reading(measures: dict) -> dict:
    """M3: where the early warning fired on control runs, those seeds' benefit, and the gap
    threshold that best separates a benefit from none (exploratory, in sample)."""
    rows = []
    for variant in GPT_DEPTHS:
        ctl, rec = measures.get((variant, "control"), {}), measures.get((variant, "slowqk"), {})
        for k in sorted(set(ctl) & set(rec)):
            warning = ctl[k]["warning"]
            rows.append(
                {
                    "variant": variant,
                    "seed": k,
                    "fired": bool(warning and warning["fired"]),
                    "fired_at": warning["first"]["step"] if warning and warning["fired"] else None,
                    "early_gap": ctl[k]["early_gap"],
                    "benefit": ctl[k]["final_val_loss"] - rec[k]["final_val_loss"],
                }
            )
    fired = [r["benefit"] for r in rows if r["fired"]]
    quiet = [r["benefit"] for r in rows if not r["fired"]]
    best = None
    for cut in sorted({r["early_gap"] for r in rows}):
        flagged = [r for r in rows if r["early_gap"] <= cut]  # a more negative gap: upper sharper
        rest = [r for r in rows if r["early_gap"] > cut]
        if not flagged or not rest:
            continue
        sens = sum(r["benefit"] > 0 for r in flagged) / max(1, sum(r["benefit"] > 0 for r in rows))
        spec = sum(r["benefit"] <= 0 for r in rest) / max(1, sum(r["benefit"] <= 0 for r in rows))
        score = (sens + spec) / 2
        if best is None or score > best["balanced_accuracy"]:
            best = {"gap_at_most": cut, "balanced_accuracy": score, "flagged": len(flagged)}
    return {
        "runs": rows,
        "fired": len(fired),
        "benefit_fired": float(np.mean(fired)) if fired else None,
        "benefit_quiet": float(np.mean(quiet)) if quiet else None,
        "proposed": best,
    }


def analyse(results: list[RunResult]) -> dict:
    measures: dict[tuple[str, str], dict[int, dict]] = {}
    for run in results:
        measures.setdefault((run.variant, run.arm), {})[run.seed] = run_measures(run)
    delays = [
        delay(measures, variant, arm)
        for variant, arm in sorted(measures, key=lambda cell: (_depth_order(cell[0]), cell[1]))
        if arm != "control" and (variant, "control") in measures
    ]
    return {
        "threshold": float(THRESHOLD),
        "early_step": EARLY_STEP,
        "uncrossed_layers": sum(m["uncrossed"] for by in measures.values() for m in by.values()),
        "M1_delay": delays,
        "M2_prediction": prediction(measures),
        "M2_exploratory_later_gap": prediction(measures, "later_gap"),
        "M3_warning": warning_reading(measures),
        "quack_hooks_percent": sorted(
            m["hooks_percent"]
            for (_v, arm), by in measures.items()
            if arm == "quack"
            for m in by.values()
        ),
        "_measures": measures,
    }


# ------------------------------------------------------------------ plots


def _cells(results: list[RunResult]) -> dict[tuple[str, str], list[RunResult]]:
    cells: dict[tuple[str, str], list[RunResult]] = {}
    for r in results:
        cells.setdefault((r.variant, r.arm), []).append(r)
    return cells


def _depth_panels(plt: ModuleType, cells: dict[tuple[str, str], Any]) -> tuple[Any, Any, list]:
    """One titled panel per depth, side by side: the figure, its axes, and for each panel
    ``(ax, [(arm, cell), ...])`` with the cells of its depth."""
    variants = sorted({v for v, _ in cells}, key=_depth_order)
    fig, axes = plt.subplots(1, len(variants), figsize=(3.6 * len(variants), 3.2), squeeze=False)
    panels = []
    for ax, variant in zip(axes[0], variants, strict=True):
        ax.set_title(variant, fontsize=9)
        panels.append((ax, [(arm, c) for (v, arm), c in sorted(cells.items()) if v == variant]))
    return fig, axes, panels


def _finish(plt: ModuleType, fig: Any, axes: Any, ylabel: str, path: Path, stamp: str) -> Path:
    axes[0][0].set_ylabel(ylabel)
    fig.tight_layout()
    save_figure(fig, path, stamp)
    plt.close(fig)
    return path


def plot_spec_steps(result: dict, path: Path, stamp: str) -> Path:
    plt = pyplot()
    fig, axes, panels = _depth_panels(plt, result["_measures"])
    for ax, arms in panels:
        for arm, by_seed in arms:
            steps = np.array([m["spec_steps"] for m in by_seed.values()], dtype=float)
            ax.plot(
                range(steps.shape[1]),
                np.exp(np.log(steps).mean(0)),
                "o-",
                ms=3,
                color=COLORS.get(arm, "k"),
                label=f"{arm} (n={len(steps)})",
            )
        ax.set_yscale("log", base=2)
        ax.set_xlabel("layer")
        ax.axvline(steps.shape[1] / 2 - 0.5, color="0.8", lw=0.8)
        ax.legend(fontsize=7)
    ylabel = f"specialization step (entropy < {THRESHOLD}),\ngeometric mean over seeds"
    return _finish(plt, fig, axes, ylabel, path, stamp)


def plot_entropy_logsteps(results: list[RunResult], path: Path, stamp: str) -> Path:
    plt = pyplot()
    fig, axes, panels = _depth_panels(plt, _cells(results))
    for ax, arms in panels:
        for arm, runs in arms:
            steps = [rec["step"] for rec in runs[0].diagnostics]
            n = len(runs[0].diagnostics[0]["layers"])
            upper, lower = _upper_lower(n)
            for layers, style in ((upper, "-"), (lower, "--")):
                curve = np.mean(
                    [
                        [
                            np.mean([rec["layers"][str(i)]["entropy"] for i in layers])
                            for rec in r.diagnostics
                        ]
                        for r in runs
                    ],
                    axis=0,
                )
                ax.plot(
                    steps,
                    curve,
                    style,
                    color=COLORS.get(arm, "k"),
                    lw=1.2,
                    label=f"{arm} {'upper' if layers is upper else 'lower'}",
                )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("step (log)")
        ax.legend(fontsize=6)
    ylabel = "normalized attention entropy\n(mean of the half, over seeds)"
    return _finish(plt, fig, axes, ylabel, path, stamp)


def plot_effect_vs_depth(contrasts: list[dict], path: Path, stamp: str) -> Path:
    """The recipe's effect at each depth (C1-C3) with 95% intervals, QuacK and LLaMA beside."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    marks = {
        "C1": (4, "slowqk (GPT)", "tab:red", 0),
        "C2": (8, "slowqk (GPT)", "tab:red", 0),
        "C3": (16, "slowqk (GPT)", "tab:red", 0),
        "C5": (16, "QuacK (GPT)", "tab:blue", 0.08),
        "C7": (16, "slowqk (LLaMA)", "tab:green", -0.08),
    }
    shown = set()
    for c in contrasts:
        key = c["name"].split()[0]
        if key not in marks or "mean" not in c:
            continue
        depth, label, color, shift = marks[key]
        x = math.log2(depth) + shift
        lo, hi = c["ci95"]
        ax.errorbar(
            x,
            c["mean"],
            yerr=[[c["mean"] - lo], [hi - c["mean"]]],
            fmt="o",
            color=color,
            capsize=3,
            label=None if label in shown else label,
        )
        ax.scatter([x] * len(c["val_loss_diff"]), c["val_loss_diff"], s=6, color=color, alpha=0.35)
        shown.add(label)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_xticks([2, 3, 4], ["4", "8", "16"])
    ax.set_xlabel("layers (about the same compute per step)")
    ax.legend(fontsize=7)
    ylabel = "final val loss, arm - control\n(mean, 95% CI, seeds)"
    return _finish(plt, fig, [[ax]], ylabel, path, stamp)


def plot_gap_vs_benefit(pred: dict, path: Path, stamp: str) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.4, 3.4))
    ax.scatter(pred["gap_centred"], pred["benefit_centred"], s=14, color="tab:purple")
    lo, hi = pred["ci95"]
    ax.set_title(f"r = {pred['r']:+.2f} [{lo:+.2f}, {hi:+.2f}], n = {pred['n']}", fontsize=9)
    ax.set_xlabel(f"control's upper - lower entropy at step {EARLY_STEP}\n(centred within depth)")
    ax.axhline(0, color="0.8", lw=0.8)
    ylabel = "benefit: control - slowqk loss\n(centred within depth)"
    return _finish(plt, fig, [[ax]], ylabel, path, stamp)


def _depth_order(variant: str) -> tuple[int, str]:
    digits = "".join(ch for ch in variant if ch.isdigit())
    return (int(digits) if digits else 0, variant)


# ------------------------------------------------------------------ text


def markdown(result: dict) -> str:
    lines = [
        f"# Mechanism (threshold {result['threshold']}, early step {result['early_step']})",
        "",
        "M1, delay (arm - control, paired by seed, mean [95% CI]):",
        "",
        f"| depth | arm | n | upper specialization step | upper entropy at step {EARLY_STEP} | "
        f"upper entropy at step {LATER_STEP} (exploratory) |",
        "|---|---|---|---|---|---|",
    ]
    for d in result["M1_delay"]:
        a, b, c = d["upper_spec_step"], d["upper_entropy_early"], d["upper_entropy_later"]
        lines.append(
            f"| {d['variant']} | {d['arm']} | {a['n']} | {a['mean']:+.2f} "
            f"[{a['ci95'][0]:+.2f}, {a['ci95'][1]:+.2f}] | {b['mean']:+.4f} "
            f"[{b['ci95'][0]:+.4f}, {b['ci95'][1]:+.4f}] | {c['mean']:+.4f} "
            f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] |"
        )
    p = result["M2_prediction"]
    lines += [
        "",
        f"M2, prediction: r = {p['r']:+.3f} [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}] over "
        f"{p['n']} GPT seed pairs (centred within depth); per depth: "
        + ", ".join(
            f"{v} r = {x['r']:+.2f} [{x['ci95'][0]:+.2f}, {x['ci95'][1]:+.2f}] (n={x['n']})"
            for v, x in p["per_depth"].items()
        ),
        "",
    ]
    x = result["M2_exploratory_later_gap"]
    lines += [
        f"M2 with the gap at step {LATER_STEP} (exploratory): r = {x['r']:+.3f} "
        f"[{x['ci95'][0]:+.3f}, {x['ci95'][1]:+.3f}] over {x['n']} pairs",
        "",
    ]
    w = result["M3_warning"]
    fired = [
        f"{r['variant']} seed {r['seed']} (step {r['fired_at']})" for r in w["runs"] if r["fired"]
    ]
    lines += [
        f"M3, early warning on the {len(w['runs'])} GPT control runs: fired on {w['fired']}"
        + (f" ({', '.join(fired)})" if fired else ""),
        f"mean benefit where it fired: {_fmt(w['benefit_fired'])}; where it did not: "
        f"{_fmt(w['benefit_quiet'])}",
    ]
    if w["proposed"]:
        pr = w["proposed"]
        lines.append(
            f"proposed from these data (in sample, exploratory): flag a run whose early gap is at "
            f"most {pr['gap_at_most']:+.4f} (balanced accuracy {pr['balanced_accuracy']:.2f}, "
            f"{pr['flagged']} of {len(w['runs'])} flagged)"
        )
    lines.append(f"\nLayers that never crossed {result['threshold']}: {result['uncrossed_layers']}")
    return "\n".join(lines) + "\n"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:+.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("grid_dir")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _grid, results, missing = collect(args.grid_dir)
    result = analyse(results)
    summary_path = out / "summary.json"
    contrasts = json.loads(summary_path.read_text())["contrasts"] if summary_path.is_file() else []
    stamp = commits_stamp(
        {"provenance": {"records": [_summary(r).get("provenance") or {} for r in results]}}
    )
    plot_spec_steps(result, out / "specialization_steps.png", stamp)
    plot_entropy_logsteps(results, out / "entropy_logsteps.png", stamp)
    if contrasts:
        plot_effect_vs_depth(contrasts, out / "effect_vs_depth.png", stamp)
    plot_gap_vs_benefit(result["M2_prediction"], out / "gap_vs_benefit.png", stamp)
    result.pop("_measures")
    commits = sorted(
        {(_summary(r).get("provenance") or {}).get("commit") or "unknown" for r in results}
    )
    result = {"commit": commits[0] if len(commits) == 1 else commits, **result, "missing": missing}
    (out / "mechanism.json").write_text(json.dumps(result, indent=2))
    text = markdown(result)
    (out / "mechanism.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
