"""Turn a finished grid into a table a researcher can trust, and plots.

Per variant and arm: final validation loss and perplexity (mean, sample std over seeds) and
downstream scores when a run has them (``<run>/eval/results.json``). Per variant and non-control
arm: the **paired** difference ``arm - control`` over the seeds both have, with a two-sided 95%
Student-t confidence interval ``mean +- t_{0.975, n-1} * sd / sqrt(n)``.

A grid's pre-registered ``contrasts`` (``arm - minus``, any two cells) get the same paired
interval, a two-sided paired t-test p-value, and the grid's family-wise correction over all of
them at alpha 0.05: Holm's step-down adjusted p-values (a contrast survives when its adjusted p is
below alpha) or Bonferroni's; the intervals shown beside them are Bonferroni's (level 1 - alpha/m),
which Holm's decisions never contradict for the contrast with the smallest p and are conservative
for the others.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from slowqk.grid_record import read_record
from slowqk.metrics import read_metrics
from slowqk.monitor import read_diagnostics
from slowqk.provenance import DETERMINING


@dataclass
class RunResult:
    variant: str
    arm: str
    seed: int
    run_dir: Path
    final_val_loss: float
    val_curve: list[tuple[int, float]]
    downstream: dict[str, float] = field(default_factory=dict)
    diagnostics: list[dict] = field(default_factory=list)  # the run's diagnostics.jsonl records
    release: dict | None = None  # summary.json's qk_release: when and why the slowdown ended
    warning: dict | None = None  # summary.json's specialization_warning
    provenance: dict | None = None
    groups: str = "-"  # the learning-rate groups as run (qk and lr_groups)

    @property
    def upper_entropy(self) -> float | None:
        """Attention entropy at the last probe, mean over the upper half of the layers."""
        if not self.diagnostics:
            return None
        layers = self.diagnostics[-1]["layers"]
        upper = [v["entropy"] for k, v in layers.items() if int(k) >= len(layers) / 2]
        return float(np.mean(upper)) if upper else None


@dataclass(frozen=True)
class Interval:
    n: int
    mean: float
    std: float
    low: float
    high: float


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; nan for one value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else math.nan


def paired_interval(differences: list[float], confidence: float = 0.95) -> Interval:
    """Student-t confidence interval of the mean paired difference."""
    # deferred: scipy is slow to import, and only this path needs it
    from scipy.stats import t

    n = len(differences)
    if n == 0:
        raise ValueError("no paired runs: nothing to compare")
    mean, std = mean_std(differences)
    if n < 2:
        return Interval(n, mean, std, math.nan, math.nan)
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Interval(n, mean, std, mean - half, mean + half)


ALPHA = 0.05


def paired_p_value(differences: list[float]) -> float:
    """Two-sided paired t-test of mean difference 0 (nan below two pairs; 0 or 1 when sd is 0)."""
    # deferred: scipy is slow to import, and only this path needs it
    from scipy.stats import t

    n = len(differences)
    mean, std = mean_std(differences)
    if n < 2:
        return math.nan
    if std == 0:
        return 1.0 if mean == 0 else 0.0
    return float(2 * t.sf(abs(mean) / (std / math.sqrt(n)), n - 1))


def adjusted_p_values(p_values: list[float], correction: str) -> list[float]:
    """Family-wise adjusted p-values: Holm's step-down, Bonferroni's, or unchanged (``none``)."""
    m = len(p_values)
    if correction == "none":
        return list(p_values)
    if correction == "bonferroni":
        return [min(1.0, m * p) for p in p_values]
    if correction != "holm":
        raise ValueError(f"correction {correction!r}: expected holm, bonferroni or none")
    order = sorted(range(m), key=lambda i: p_values[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        out[i] = running
    return out


def contrast_rows(grid: dict, by: dict) -> list[dict]:
    """The grid's pre-registered contrasts, paired by seed, with the family-wise correction."""
    contrasts = grid.get("contrasts") or []
    correction = grid.get("correction", "holm")
    sizes = Counter(c.get("family", "primary") for c in contrasts)
    rows = []
    for c in contrasts:
        family = c.get("family", "primary")
        m = sizes[family]
        terms = [(1.0, c["arm"]), (-1.0, c["minus"])]
        if c.get("versus"):
            terms += [(-1.0, c["versus"]["arm"]), (1.0, c["versus"]["minus"])]
        cells = [(sign, by.get(tuple(name.split("/", 1)), {})) for sign, name in terms]
        common = sorted(set.intersection(*(set(cell) for _, cell in cells)))
        diffs = [sum(sign * cell[k].final_val_loss for sign, cell in cells) for k in common]
        row = {
            "name": c["name"],
            "family": family,
            "family_size": m,
            "arm": c["arm"],
            "minus": c["minus"]
            + (f" - ({c['versus']['arm']} - {c['versus']['minus']})" if c.get("versus") else ""),
            "seeds": common,
            "val_loss_diff": diffs,
        }
        if len(common) >= 2:
            ci = paired_interval(diffs)
            level = 1 - ALPHA / m if correction != "none" else 1 - ALPHA
            wide = paired_interval(diffs, level)
            row.update(
                mean=ci.mean,
                std=ci.std,
                ci95=[ci.low, ci.high],
                p=paired_p_value(diffs),
                adjusted_level=level,
                ci_adjusted=[wide.low, wide.high],
            )
        rows.append(row)
    for family in sizes:
        tested = [r for r in rows if "p" in r and r["family"] == family]
        # a contrast without two pairs still counts in m: the family was fixed before the runs
        adjusted = adjusted_p_values(
            [r["p"] for r in tested] + [1.0] * (sizes[family] - len(tested)), correction
        )
        for r, adj in zip(tested, adjusted, strict=False):
            r["p_adjusted"] = adj
            r["survives"] = adj < ALPHA
    return rows


def collect(grid_dir: str | Path) -> tuple[dict, list[RunResult], list[str]]:
    """``(grid, results, missing)``: the grid record, every finished run, and unfinished run
    dirs."""
    record = read_record(grid_dir)
    results, missing = [], []
    for run in record["runs"]:
        run_dir = Path(run["run_dir"])
        summary = run_dir / "summary.json"
        if not summary.is_file():
            missing.append(str(run_dir))
            continue
        s = json.loads(summary.read_text())
        curve = [
            (r["step"], r["val_loss"])
            for r in read_metrics(run_dir / "metrics.jsonl")
            if "val_loss" in r
        ]
        downstream = {}
        evals = run_dir / "eval" / "results.json"
        if evals.is_file():
            downstream = {
                k: float(v) for k, v in json.loads(evals.read_text()).get("scores", {}).items()
            }
        diag = run_dir / "diagnostics.jsonl"
        results.append(
            RunResult(
                run["variant"],
                run["arm"],
                run["seed"],
                run_dir,
                s["final_val_loss"],
                curve,
                downstream,
                read_diagnostics(diag) if diag.is_file() else [],
                s.get("qk_release"),
                s.get("specialization_warning"),
                s.get("provenance"),
                groups_cell(s),
            )
        )
    return record["grid"], results, missing


def groups_cell(summary: dict) -> str:
    """The learning-rate groups of a run, from its summary.json: ``qk; v@2-3 x0.25 (hold 12, ramp
    3)``."""
    cells = ["qk"] if summary.get("qk_enabled") else []
    for g in summary.get("lr_groups") or []:
        if g.get("rule") == "quack":
            cells.append(f"{g['name']} (QuacK, tau {g['mult']:g})")
            continue
        when = (
            "constant"
            if g["hold_steps"] is None
            else f"hold {g['hold_steps']}, ramp {g['ramp_steps']}"
        )
        cells.append(f"{g['name']} x{g['mult']:g} ({when})")
    return "; ".join(cells) or "-"


def summarize(grid: dict, results: list[RunResult]) -> dict:
    control = grid["control"]
    by = defaultdict(dict)
    for r in results:
        by[(r.variant, r.arm)][r.seed] = r
    rows, pairs = [], []
    for (variant, arm), seeds in by.items():
        losses = [r.final_val_loss for r in seeds.values()]
        m, s = mean_std(losses)
        ppl_m, ppl_s = mean_std([math.exp(x) for x in losses])
        row = {
            "variant": variant,
            "arm": arm,
            "groups": next(iter(seeds.values())).groups,
            "n": len(losses),
            "val_loss_mean": m,
            "val_loss_std": s,
            "val_ppl_mean": ppl_m,
            "val_ppl_std": ppl_s,
        }
        tasks = sorted({k for r in seeds.values() for k in r.downstream})
        row["downstream"] = {
            k: mean_std([r.downstream[k] for r in seeds.values() if k in r.downstream])[0]
            for k in tasks
        }
        releases = [
            r.release for r in seeds.values() if r.release and r.release.get("step") is not None
        ]
        if releases:
            steps = [x["step"] for x in releases]
            row["release"] = {
                "rule": releases[0]["rule"],
                "steps": steps,
                "mean": mean_std(steps)[0],
                "std": mean_std(steps)[1],
                "reasons": {
                    why: sum(x["reason"] == why for x in releases)
                    for why in sorted({x["reason"] for x in releases})
                },
            }
        warned = [r for r in seeds.values() if r.warning is not None]
        if warned:
            row["warnings"] = {
                "runs": len(warned),
                "fired": sum(bool(r.warning["fired"]) for r in warned),
            }
        rows.append(row)
        if arm != control and (variant, control) in by:
            base = by[(variant, control)]
            common = sorted(set(seeds) & set(base))
            if not common:
                continue
            diffs = [seeds[k].final_val_loss - base[k].final_val_loss for k in common]
            ppl_diffs = [
                math.exp(seeds[k].final_val_loss) - math.exp(base[k].final_val_loss) for k in common
            ]
            ci, ppl_ci = paired_interval(diffs), paired_interval(ppl_diffs)
            pair = {
                "variant": variant,
                "arm": arm,
                "control": control,
                "seeds": common,
                "val_loss_diff": diffs,
                "mean": ci.mean,
                "std": ci.std,
                "ci95": [ci.low, ci.high],
                "ppl_mean": ppl_ci.mean,
                "ppl_ci95": [ppl_ci.low, ppl_ci.high],
            }
            ent = [(seeds[k].upper_entropy, base[k].upper_entropy) for k in common]
            if all(a is not None and b is not None for a, b in ent):
                e = paired_interval([a - b for a, b in ent])
                pair["upper_entropy"] = {
                    "control": float(np.mean([b for _, b in ent])),
                    "arm": float(np.mean([a for a, _ in ent])),
                    "diff": e.mean,
                    "ci95": [e.low, e.high],
                }
            pairs.append(pair)
    return {
        "rows": rows,
        "pairs": pairs,
        "contrasts": contrast_rows(grid, by),
        "correction": grid.get("correction", "holm"),
        "provenance": provenance_summary(results),
    }


def provenance_summary(results: list[RunResult]) -> dict:
    """The distinct code and environment records of the runs (a mix is worth knowing about)."""
    seen: dict[str, dict] = {}
    unrecorded = 0
    for r in results:
        if not r.provenance:
            unrecorded += 1
            continue
        key = json.dumps({k: r.provenance.get(k) for k in DETERMINING}, sort_keys=True)
        entry = seen.setdefault(key, {**{k: r.provenance.get(k) for k in DETERMINING}, "runs": 0})
        entry["runs"] += 1
    return {"records": list(seen.values()), "unrecorded_runs": unrecorded}


def _release_cell(row: dict) -> str:
    rel = row.get("release")
    if rel is None:
        return "-"
    reasons = ", ".join(f"{k} {v}" for k, v in rel["reasons"].items())
    spread = "" if len(rel["steps"]) < 2 else f" ± {rel['std']:.1f}"
    return f"{rel['rule']}: {rel['mean']:.1f}{spread} ({reasons})"


def _fmt(x: float, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def format_markdown(summary: dict) -> str:
    tasks = sorted({k for r in summary["rows"] for k in r["downstream"]})
    head = [
        "variant",
        "arm",
        "lr groups",
        "n",
        "val loss (mean ± sd)",
        "val ppl (mean ± sd)",
        "release step (mean ± sd)",
        "early warning",
        *tasks,
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["rows"]:
        cells = [
            r["variant"],
            r["arm"],
            r.get("groups", "-"),
            str(r["n"]),
            f"{_fmt(r['val_loss_mean'])} ± {_fmt(r['val_loss_std'])}",
            f"{_fmt(r['val_ppl_mean'], 2)} ± {_fmt(r['val_ppl_std'], 2)}",
            _release_cell(r),
            f"{r['warnings']['fired']}/{r['warnings']['runs']} runs" if r.get("warnings") else "-",
            *[_fmt(r["downstream"].get(t)) for t in tasks],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Paired differences (arm - control, same seed), 95% Student-t confidence interval:",
        "",
        "| variant | arm | pairs | Δ val loss mean [95% CI] | Δ val ppl mean [95% CI] | CI "
        "excludes 0 |",
        "|---|---|---|---|---|---|",
    ]
    for p in summary["pairs"]:
        lo, hi = p["ci95"]
        sig = "n/a" if math.isnan(lo) else ("yes" if lo > 0 or hi < 0 else "no")
        lines.append(
            f"| {p['variant']} | {p['arm']} | {len(p['seeds'])} | {p['mean']:+.4f} [{_fmt(lo)}, "
            f"{_fmt(hi)}] | {p['ppl_mean']:+.3f} [{_fmt(p['ppl_ci95'][0], 3)}, "
            f"{_fmt(p['ppl_ci95'][1], 3)}] | {sig} |"
        )
    if summary.get("contrasts"):
        lines += _contrast_lines(summary["contrasts"], summary.get("correction", "holm"))
    with_entropy = [p for p in summary["pairs"] if "upper_entropy" in p]
    if with_entropy:
        lines += [
            "",
            "Final attention entropy of the upper half of the layers (normalized; diagnostics' "
            "last probe), paired difference arm - control with 95% CI:",
            "",
            "| variant | arm | control | arm | Δ [95% CI] | CI excludes 0 |",
            "|---|---|---|---|---|---|",
        ]
        for p in with_entropy:
            e = p["upper_entropy"]
            lo, hi = e["ci95"]
            sig = "n/a" if math.isnan(lo) else ("yes" if lo > 0 or hi < 0 else "no")
            lines.append(
                f"| {p['variant']} | {p['arm']} | {e['control']:.3f} | {e['arm']:.3f} | "
                f"{e['diff']:+.3f} [{_fmt(lo, 3)}, {_fmt(hi, 3)}] | {sig} |"
            )
    prov = summary.get("provenance")
    if prov:
        lines += ["", "Made with:", ""]
        for rec in prov["records"]:
            pk = rec.get("packages") or {}
            lines.append(
                f"- {rec['runs']} runs: commit {rec.get('commit') or 'unknown'}"
                f"{' (uncommitted changes)' if rec.get('dirty') else ''}, "
                + ", ".join(f"{k} {v}" for k, v in sorted(pk.items()))
                + f", Python {rec.get('python')}, {rec.get('threads')} "
                + f"thread{'' if rec.get('threads') == 1 else 's'}, "
                + f"{rec.get('device')}"
            )
        if prov["unrecorded_runs"]:
            lines.append(
                f"- {prov['unrecorded_runs']} runs without a record (made before records were kept)"
            )
    return "\n".join(lines) + "\n"


def _contrast_lines(contrasts: list[dict], correction: str) -> list[str]:
    sizes = {c["family"]: c["family_size"] for c in contrasts}
    lines = [
        "",
        f"Pre-registered contrasts (final val loss, arm - minus, paired by seed; {correction} "
        f"within each family ({', '.join(f'{f}: {m}' for f, m in sizes.items())}), family-wise "
        f"alpha {ALPHA}; the second interval is Bonferroni's, level 1 - alpha/m):",
        "",
        "| family | contrast | arm - minus | pairs | Δ [95% CI] | Δ [adjusted CI] | p | p "
        "adjusted | survives |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in contrasts:
        if "p" not in c:
            lines.append(
                f"| {c['family']} | {c['name']} | {c['arm']} - {c['minus']} | {len(c['seeds'])} | "
                "n/a | n/a | n/a | n/a | n/a |"
            )
            continue
        (lo, hi), (alo, ahi) = c["ci95"], c["ci_adjusted"]
        lines.append(
            f"| {c['family']} | {c['name']} | {c['arm']} - {c['minus']} | {len(c['seeds'])} | "
            f"{c['mean']:+.4f} [{_fmt(lo)}, {_fmt(hi)}] | [{_fmt(alo)}, {_fmt(ahi)}] | "
            f"{c['p']:.3g} | {c['p_adjusted']:.3g} | {'yes' if c['survives'] else 'no'} |"
        )
    return lines


# ---------------------------------------------------------------------------------------- plots


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    # deferred: matplotlib is slow to import, and only this path needs it
    import matplotlib

    matplotlib.use("Agg")
    # deferred: matplotlib is slow to import, and only this path needs it
    import matplotlib.pyplot as plt

    return plt


def _style(ax, title: str, ylabel: str | None = None, log: bool = False) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    if ylabel:
        ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _group(results: list[RunResult]) -> dict[str, dict[str, list[RunResult]]]:
    out: dict[str, dict[str, list[RunResult]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        out[r.variant][r.arm].append(r)
    return out


def commits_stamp(summary: dict) -> str:
    """``runs of commit abc1234`` (more than one when the runs mix code versions)."""
    recs = summary.get("provenance", {}).get("records", [])
    names = sorted(
        {
            (r.get("commit") or "unknown")[:7]
            + (" (uncommitted changes)" if r.get("dirty") else "")
            for r in recs
        }
    )
    return f"runs of commit {', '.join(names)}" if names else "runs without a code record"


def save_figure(fig: Any, path: Path, stamp: str) -> None:
    """Save with ``stamp`` (what made the runs: :func:`commits_stamp`) in the bottom corner."""
    fig.text(0.995, 0.003, stamp, ha="right", va="bottom", fontsize=6, color="0.4")
    fig.savefig(path, dpi=110)


def plot_loss_curves(results: list[RunResult], path: Path, stamp: str = "") -> Path:
    plt = pyplot()
    groups = _group(results)
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (variant, arms) in zip(axes[0], sorted(groups.items()), strict=True):
        for arm, runs in sorted(arms.items()):
            steps = [s for s, _ in runs[0].val_curve]
            curves = np.array(
                [[v for _, v in r.val_curve] for r in runs if len(r.val_curve) == len(steps)]
            )
            mean = curves.mean(0)
            ax.plot(steps, mean, label=f"{arm} (n={len(curves)})")
            if len(curves) > 1:
                sd = curves.std(0, ddof=1)
                ax.fill_between(steps, mean - sd, mean + sd, alpha=0.2)
        _style(ax, f"{variant}: validation loss (mean ± sd)", "loss (nats/token)")
    fig.tight_layout()
    save_figure(fig, path, stamp)
    plt.close(fig)
    return path


def plot_paired_differences(summary: dict, path: Path, stamp: str = "") -> Path:
    plt = pyplot()
    pairs = summary["pairs"]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(pairs) + 2), 4))
    for i, p in enumerate(pairs):
        ax.scatter([i] * len(p["val_loss_diff"]), p["val_loss_diff"], color="grey", s=14, zorder=2)
        lo, hi = p["ci95"]
        if not math.isnan(lo):
            ax.errorbar(
                [i],
                [p["mean"]],
                yerr=[[p["mean"] - lo], [hi - p["mean"]]],
                fmt="o",
                color="C3",
                capsize=5,
                zorder=3,
            )
        else:
            ax.scatter([i], [p["mean"]], color="C3", zorder=3)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(range(len(pairs)), [f"{p['variant']}\n{p['arm']}" for p in pairs], fontsize=8)
    ax.set_ylabel("Δ final val loss (arm - control)")
    ax.set_title("paired differences per seed (grey), mean and 95% CI (red)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save_figure(fig, path, stamp)
    plt.close(fig)
    return path


def plot_contrasts(summary: dict, path: Path, stamp: str = "") -> Path:
    """Forest plot of the pre-registered contrasts: per-seed differences, mean, 95% and
    family-wise (Bonferroni) intervals; the survivors of the correction in red."""
    plt = pyplot()
    rows = [c for c in summary["contrasts"] if "p" in c][::-1]  # first contrast on top
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.6))
    for i, c in enumerate(rows):
        color = "C3" if c["survives"] else "C0"
        ax.scatter(c["val_loss_diff"], [i] * len(c["val_loss_diff"]), color="grey", s=10, zorder=2)
        ax.plot(c["ci_adjusted"], [i, i], color=color, lw=1, zorder=3)
        ax.plot(c["ci95"], [i, i], color=color, lw=4, alpha=0.6, zorder=3)
        ax.scatter([c["mean"]], [i], color=color, zorder=4)
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(
        range(len(rows)), [f"{c['name']} (n={len(c['seeds'])})" for c in rows], fontsize=8
    )
    ax.set_xlabel("Δ final val loss (arm - minus); < 0: the arm reaches a lower loss")
    ax.set_title(
        "contrasts: 95% CI (thick), Bonferroni CI (thin); red = survives "
        f"{summary.get('correction')}",
        fontsize=9,
    )
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    save_figure(fig, path, stamp)
    plt.close(fig)
    return path


def _diagnostic_series(runs: list[RunResult], key: str) -> tuple[list[int], np.ndarray] | None:
    """``(steps, [seed, step, layer])`` of a per-layer diagnostic over the runs that have it."""
    series, steps = [], None
    for r in runs:
        recs = r.diagnostics
        if not recs:
            continue
        s = [x["step"] for x in recs]
        if steps is not None and s != steps:
            continue
        steps = s
        layers = sorted(recs[0]["layers"], key=int)
        series.append([[x["layers"][k].get(key, math.nan) for k in layers] for x in recs])
    if not series:
        return None
    return steps, np.asarray(series, dtype=np.float64)


def plot_entropy_heatmaps(results: list[RunResult], out_dir: Path, stamp: str = "") -> list[Path]:
    plt = pyplot()
    paths = []
    for variant, arms in sorted(_group(results).items()):
        data = {arm: _diagnostic_series(runs, "entropy") for arm, runs in sorted(arms.items())}
        data = {k: v for k, v in data.items() if v is not None}
        if not data:
            continue
        means = {arm: arr.mean(0).T for arm, (_, arr) in data.items()}  # [layer, probe]
        lo = min(float(np.nanmin(m)) for m in means.values())
        hi = max(float(np.nanmax(m)) for m in means.values())
        fig, axes = plt.subplots(
            1,
            len(data),
            figsize=(4.2 * len(data) + 1.5, 3.4),
            squeeze=False,
            constrained_layout=True,
        )
        for ax, (arm, (steps, arr)) in zip(axes[0], data.items(), strict=True):
            img = ax.imshow(
                means[arm],
                aspect="auto",
                origin="lower",
                vmin=lo,
                vmax=hi,
                cmap="viridis",
                extent=(steps[0], steps[-1], -0.5, arr.shape[2] - 0.5),
                interpolation="nearest",
            )
            ax.set_title(f"{variant} / {arm} (n={arr.shape[0]})", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel("layer")
            ax.set_yticks(range(arr.shape[2]))
        fig.colorbar(
            img, ax=axes[0].tolist(), label="normalized attention entropy\n(mean over seeds)"
        )
        path = out_dir / f"entropy_{variant}.png"
        save_figure(fig, path, stamp)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_lambda(
    results: list[RunResult], path: Path, upper_from: float = 0.5, stamp: str = ""
) -> Path | None:
    """lambda_Q, lambda_K and R_P/||X||^2 over time, averaged over the upper layers and seeds."""
    plt = pyplot()
    groups = _group(results)
    keys = ("lambda_q", "lambda_k", "pathway_energy")
    fig, axes = plt.subplots(len(groups), 3, figsize=(14, 3.2 * len(groups)), squeeze=False)
    drew = False
    for row, (variant, arms) in zip(axes, sorted(groups.items()), strict=True):
        for ax, key in zip(row, keys, strict=True):
            for arm, runs in sorted(arms.items()):
                got = _diagnostic_series(runs, key)
                if got is None:
                    continue
                steps, arr = got
                upper = arr[:, :, int(arr.shape[2] * upper_from) :]
                ax.plot(steps, np.nanmean(upper, axis=(0, 2)), label=arm)
                drew = True
            _style(ax, f"{variant}: {key} (upper layers)", log=True)
    fig.tight_layout()
    if drew:
        save_figure(fig, path, stamp)
    plt.close(fig)
    return path if drew else None


def write_summary(
    grid_dir: str | Path, out_dir: str | Path | None = None
) -> tuple[str, list[Path]]:
    """Table (markdown + JSON) and plots for a grid directory; returns the table and the files."""
    grid, results, missing = collect(grid_dir)
    if not results:
        raise ValueError(f"{grid_dir}: no finished runs")
    out = Path(out_dir or Path(grid_dir) / "summary")
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(grid, results)
    table = format_markdown(summary)
    if missing:
        table += f"\n{len(missing)} runs unfinished and left out: {', '.join(missing)}\n"
    (out / "summary.md").write_text(table)
    stamp = commits_stamp(summary)
    (out / "summary.json").write_text(json.dumps({**summary, "missing": missing}, indent=2))
    files = [
        out / "summary.md",
        out / "summary.json",
        plot_loss_curves(results, out / "loss_curves.png", stamp),
        plot_paired_differences(summary, out / "paired_differences.png", stamp)
        if summary["pairs"]
        else None,
        plot_contrasts(summary, out / "contrasts.png", stamp)
        if any("p" in c for c in summary["contrasts"])
        else None,
        *plot_entropy_heatmaps(results, out, stamp),
        plot_lambda(results, out / "lambda.png", stamp=stamp),
    ]
    return table, [f for f in files if f is not None]
