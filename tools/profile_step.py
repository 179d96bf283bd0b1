"""Profile training steps of a recipe (torch.profiler) and print the top kernels by time.

    python tools/profile_step.py [--steps 2] [--warmup 3] [--top 25] [--out DIR] [--plain]
    [--] llama-1b [overrides ...]

``--plain`` profiles ``tools/plain_decoder.py``'s step of the same shapes instead (bench_gpu.py's
"plain" case), so the two tables show where the gap between them goes.

Reads the same synthetic data as ``tools/bench_gpu.py`` (the bundled corpus, tokenized once).
Writes ``DIR/top_kernels.txt`` (self device time on CUDA, self CPU time on CPU) and a Chrome trace
``DIR/trace.json`` for chrome://tracing or Perfetto.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench_gpu import CORPUS, plain_case_step, synthetic_recipe


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("recipe")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--corpus", default=str(CORPUS))
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--out", type=Path, default=Path("profile"))
    ap.add_argument("--plain", action="store_true", help="profile the plain-PyTorch twin")
    ap.add_argument(
        "--shapes",
        action="store_true",
        help="record input shapes too: a second table by operator and shape, and in the trace",
    )
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from slowqk.data.corpus import prepare_corpus
    from slowqk.train import Trainer

    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_corpus(args.corpus, Path(tmp) / "data", vocab_size=args.vocab).dataset_dir
        recipe = synthetic_recipe(
            args.recipe,
            "off",
            args.steps,
            args.warmup,
            str(data),
            str(Path(tmp) / "run"),
            args.overrides,
        )
        step = (
            plain_case_step(recipe, "plain", args.vocab)[0]
            if args.plain
            else Trainer(recipe, quiet=True).train_step
        )
        for _ in range(args.warmup):
            step()
        activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
        with profile(activities=activities, record_shapes=args.shapes) as prof:
            for _ in range(args.steps):
                step()
            if cuda:
                torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=args.top)
    if args.shapes:
        by_shape = prof.key_averages(group_by_input_shape=True)
        table += "\n" + by_shape.table(sort_by=key, row_limit=args.top, max_name_column_width=30)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "top_kernels.txt").write_text(
        f"{args.recipe}{' (plain)' if args.plain else ''} {' '.join(args.overrides)}, "
        f"{args.steps} steps\n{table}\n"
    )
    prof.export_chrome_trace(str(args.out / "trace.json"))
    print(table)


if __name__ == "__main__":
    main()
