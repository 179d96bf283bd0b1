"""The GPU acceptance targets, each stated as met or missed, from the bench records that
``launch/gpu_check.sh run bench`` writes (``$OUT/bench_*.json``).

    python tools/gpu_targets.py gpu-results [--big llama-1b] [--mid llama-350m]

Targets: the largest recipe's MFU >= 45% (without Transformer Engine); tokens/s >= the plain eager
twin's at both sizes; peak memory <= 1.2x the plain twin's; the Q/K hold (the multipliers active)
costs < 1% of a step against ``off``. Writes ``targets.json`` beside the records.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def median_of(records: list[dict], recipe: str, case: str, key: str) -> float | None:
    values = [
        r[key]
        for r in records
        if r.get("recipe") == recipe and r.get("case") == case and r.get(key) is not None
    ]
    return statistics.median(values) if values else None


def targets(records: list[dict], big: str, mid: str) -> list[dict]:
    out = []

    def add(name: str, value: float | None, goal: str, ok) -> None:
        met = None if value is None else bool(ok(value))
        out.append({"target": name, "value": value, "goal": goal, "met": met})

    add("MFU, " + big, median_of(records, big, "off", "mfu"), ">= 0.45", lambda v: v >= 0.45)
    for recipe in (mid, big):
        off = median_of(records, recipe, "off", "tokens_per_s")
        plain = median_of(records, recipe, "plain", "tokens_per_s")
        ratio = off / plain if off and plain else None
        add(f"tokens/s vs plain eager, {recipe}", ratio, ">= 1.0", lambda v: v >= 1.0)
        mem_off = median_of(records, recipe, "off", "peak_mem_gib")
        mem_plain = median_of(records, recipe, "plain", "peak_mem_gib")
        mem = mem_off / mem_plain if mem_off and mem_plain else None
        add(f"peak memory vs plain, {recipe}", mem, "<= 1.2", lambda v: v <= 1.2)
        hold = median_of(records, recipe, "hold", "tokens_per_s")
        cost = off / hold - 1 if off and hold else None
        add(f"Q/K hold cost per step, {recipe}", cost, "< 0.01", lambda v: v < 0.01)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="the folder with bench_*.json")
    ap.add_argument("--big", default="llama-1b")
    ap.add_argument("--mid", default="llama-350m")
    args = ap.parse_args()
    records = []
    for path in sorted(args.out.glob("bench_*.json")):
        records += json.loads(path.read_text())
    result = targets(records, args.big, args.mid)
    for t in result:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        value = "-" if t["value"] is None else f"{t['value']:.4g}"
        print(f"{t['target']:<40} {value:>10}  goal {t['goal']:<7} {verdict}")
    (args.out / "targets.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
