"""What each of the CPU process fixes buys, one on or off at a time (one rank).

Every variant trains the same recipe in a fresh process and reports, per timed step: wall
seconds, the process's user and system CPU seconds, minor page faults, and the context switches
of its threads (voluntary: a thread went to sleep; involuntary: it was preempted). The fixes:

- ``malloc``: glibc keeps freed blocks (``slowqk/host_memory.py``),
- ``gloo_device``: every gloo group on one transport device (``patches/gloo_shared_device.py``).

    python tools/bench_cpu_overheads.py --recipes tiny/gpt tiny/llama --repeats 3 --vocab 2048
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import CORPUS, synthetic_recipe  # noqa: E402

VARIANTS = {
    "both": (),
    "no-malloc": ("malloc",),
    "no-gloo-device": ("gloo_device",),
    "neither": ("malloc", "gloo_device"),
}


def _switches() -> tuple[int, int]:
    voluntary = involuntary = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            status = Path(f"/proc/self/task/{tid}/status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        voluntary += int(fields["voluntary_ctxt_switches"])
        involuntary += int(fields["nonvoluntary_ctxt_switches"])
    return voluntary, involuntary


def run_variant(
    recipe_name: str, off: list[str], data: str, out: str, steps: int, warmup: int, extra: list[str]
) -> dict:
    if "malloc" in off:
        from slowqk import host_memory

        host_memory.keep_freed_blocks = lambda: False
    if "gloo_device" in off:
        from slowqk.patches import gloo_shared_device

        gloo_shared_device.apply = lambda: False
    from slowqk.train import Trainer

    recipe = synthetic_recipe(recipe_name, "off", steps, warmup, data, out, extra)
    trainer = Trainer(recipe, quiet=True)
    for _ in range(warmup):
        trainer.train_step()
    usage0, switches0 = resource.getrusage(resource.RUSAGE_SELF), _switches()
    t0 = time.perf_counter()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step()
        seconds.append(time.perf_counter() - start)
    wall = time.perf_counter() - t0
    usage, switches = resource.getrusage(resource.RUSAGE_SELF), _switches()
    return {
        "step_seconds": seconds,
        "wall_s": wall / steps,
        "user_s": (usage.ru_utime - usage0.ru_utime) / steps,
        "sys_s": (usage.ru_stime - usage0.ru_stime) / steps,
        "minor_faults": (usage.ru_minflt - usage0.ru_minflt) / steps,
        "voluntary_switches": (switches[0] - switches0[0]) / steps,
        "involuntary_switches": (switches[1] - switches0[1]) / steps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--recipes", nargs="+", default=["tiny/gpt", "tiny/llama"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every variant")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--corpus", default=str(CORPUS), help="text the runs read")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--variant", nargs=4, help=argparse.SUPPRESS)  # internal: recipe name data out
    ap.add_argument("overrides", nargs="*", help="recipe overrides for every variant")
    args = ap.parse_args()
    if args.variant:
        recipe, name, data, out = args.variant
        off = list(VARIANTS[name])
        res = run_variant(recipe, off, data, out, args.steps, args.warmup, args.overrides)
        print("RESULT " + json.dumps(res))
        return

    from slowqk.data.corpus import prepare_corpus

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_corpus(args.corpus, Path(tmp) / "data", vocab_size=args.vocab).dataset_dir
        for rep in range(args.repeats):
            for recipe in args.recipes:
                for name in args.variants:
                    out = str(Path(tmp) / f"{recipe.replace('/', '-')}-{name}-{rep}")
                    cmd = [sys.executable, __file__, "--variant", recipe, name, str(data), out]
                    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
                    cmd += ["--", *args.overrides]
                    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                    line = next(
                        (x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None
                    )
                    if line is None:
                        sys.exit(f"{recipe} {name} failed:\n{proc.stderr[-2000:]}")
                    rows.append({"recipe": recipe, "variant": name, "repeat": rep,
                                 **json.loads(line[7:])})  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    keys = ("wall_s", "user_s", "sys_s", "minor_faults", "voluntary_switches")
    keys += ("involuntary_switches",)
    print(f"{'recipe':<11} {'variant':<15} " + " ".join(f"{k:>20}" for k in keys))
    seen: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        seen.setdefault((r["recipe"], r["variant"]), []).append(r)
    for (recipe, name), rs in seen.items():
        cells = []
        for k in keys:
            xs = [r[k] for r in rs]
            scale = 1000 if k.endswith("_s") else 1
            low, high = min(xs) * scale, max(xs) * scale
            cells.append(f"{statistics.median(xs) * scale:8.1f} ({low:.0f}-{high:.0f})")
        print(f"{recipe:<11} {name:<15} " + " ".join(f"{c:>20}" for c in cells))
    print("per timed step, median over the repeats (min-max); *_s in milliseconds")


if __name__ == "__main__":
    main()
