"""What content verification costs on a real checkpoint: save and load of a model's weights with
megatron-core dist_checkpointing, beside the time spent hashing (at save) and verifying (at load).

    python tools/bench_checkpoint.py [--recipe llama-1b] [--dir DIR] [overrides ...]

One process, fp32 weights (a 1.1B-parameter model is 4.4 GB on disk). Hashing is timed on the
finished checkpoint's files, as the save does after the files are written (page cache warm, as
there); load is timed with a cold verification cache. Optimizer state only adds bytes: the cost
per byte is the printed throughput.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--recipe", default="llama-1b")
    ap.add_argument(
        "--dir", type=Path, default=None, help="where to write (default: a temporary directory)"
    )
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from slowqk import checkpoint
    from slowqk.config import load_recipe
    from slowqk.distributed import init_distributed, shutdown
    from slowqk.models import build_gpt_model, build_transformer_config, padded_vocab_size

    recipe = load_recipe(args.recipe, ["train.precision=fp32", *args.overrides])
    init_distributed(recipe.parallel, recipe.seed)
    model = build_gpt_model(
        recipe.model,
        build_transformer_config(recipe.model),
        padded_vocab_size(args.vocab, recipe.model.make_vocab_size_divisible_by, 1),
    )
    params = sum(p.numel() for p in model.parameters())
    root = Path(tempfile.mkdtemp(dir=args.dir)) / "checkpoints"
    try:
        start = time.perf_counter()
        path = checkpoint.save_checkpoint(
            root, 1, [model], None, None, {"recipe": recipe.model_dump(mode="json")}
        )
        save_s = time.perf_counter() - start
        files = [p for p in path.rglob("*") if p.is_file()]
        gib = sum(p.stat().st_size for p in files) / 2**30
        start = time.perf_counter()
        checkpoint.sha256_files(files)
        hash_s = time.perf_counter() - start
        checkpoint._VERIFIED.clear()
        start = time.perf_counter()
        checkpoint.verify_checkpoint(path)
        verify_s = time.perf_counter() - start
        checkpoint._VERIFIED.clear()
        start = time.perf_counter()
        checkpoint.load_model_weights(path, [model])
        load_s = time.perf_counter() - start
    finally:
        shutil.rmtree(root.parent, ignore_errors=True)
        shutdown()
    print(f"{args.recipe}: {params / 1e9:.2f}B parameters, {gib:.2f} GiB in {len(files)} files")
    print(
        f"save  {save_s:7.2f} s, of which hashing {hash_s:6.2f} s = {100 * hash_s / save_s:5.1f}% "
        f"(+{100 * hash_s / (save_s - hash_s):.1f}% over the save without it); {gib / hash_s:.2f} "
        "GiB/s"
    )
    print(
        f"load  {load_s:7.2f} s, of which verifying {verify_s:6.2f} s = "
        f"{100 * verify_s / load_s:5.1f}% "
        f"(+{100 * verify_s / (load_s - verify_s):.1f}% over the load without it)"
    )


if __name__ == "__main__":
    main()
