"""Time and peak memory of the Hugging Face export, for a model of a chosen size.

    python tools/bench_export.py [--recipe llama-350m] [--vocab 8192] [overrides...]

Builds the recipe's model (random weights, fp32) on one process, saves a weights-only checkpoint
through the same code as training, then exports it in a fresh process and reports wall time and
the export process's peak resident memory beside the checkpoint size (one model copy).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def _make_checkpoint(recipe: str, overrides: list[str], tokenizer: Path, out: Path) -> None:
    from slowqk.checkpoint import save_checkpoint
    from slowqk.config import load_recipe
    from slowqk.data.tokenizer import load_tokenizer
    from slowqk.distributed import init_distributed
    from slowqk.models import build_gpt_model, build_transformer_config, padded_vocab_size

    r = load_recipe(recipe, [*overrides, "train.precision=fp32", f"data.tokenizer={tokenizer}"])
    tok = load_tokenizer(tokenizer)
    init_distributed(r.parallel, r.seed)
    padded = padded_vocab_size(tok.vocab_size, r.model.make_vocab_size_divisible_by, 1)
    model = build_gpt_model(r.model, build_transformer_config(r.model), padded)
    extra = {
        "recipe": r.model_dump(mode="json"),
        "tokenizer_sha256": tok.sha256,
        "padded_vocab_size": padded,
        "vocab_size": tok.vocab_size,
        "tokenizer_file": f"tokenizer/{tokenizer.name}",
    }
    save_checkpoint(
        out, 0, [model], None, None, extra, files={f"tokenizer/{tokenizer.name}": tokenizer}
    )
    params = sum(p.numel() for p in model.parameters())
    (out / "bench.json").write_text(json.dumps({"params": params}))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--recipe", default="llama-350m")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument(
        "--make-checkpoint", nargs=2, metavar=("TOKENIZER", "OUT"), help=argparse.SUPPRESS
    )
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.make_checkpoint:
        _make_checkpoint(
            args.recipe,
            args.overrides,
            Path(args.make_checkpoint[0]),
            Path(args.make_checkpoint[1]),
        )
        return

    from slowqk.data.tokenizer import train_sentencepiece

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = tmp / "tokenizer.model"
        train_sentencepiece(
            [x for x in CORPUS.read_text().splitlines() if x.strip()], tokenizer, args.vocab
        )
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--recipe",
                args.recipe,
                "--make-checkpoint",
                str(tokenizer),
                str(tmp / "ckpt"),
                *args.overrides,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        ckpt = tmp / "ckpt" / "iter_0000000"
        params = json.loads((tmp / "ckpt" / "bench.json").read_text())["params"]
        ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.distcp"))
        # the export in a fresh process that reports its own peak (and its footprint after imports)
        probe = (
            "import resource, sys, time; import slowqk.hf.export as e, transformers, safetensors; "
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; t = time.perf_counter(); "
            "e.export_checkpoint(sys.argv[1], sys.argv[2]); print(time.perf_counter() - t, base, "
            "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
        )
        out = subprocess.run(
            [sys.executable, "-c", probe, str(ckpt), str(tmp / "hf")],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        seconds, base, peak = (
            float(out[-3]),
            int(out[-2]) * 1024,
            int(out[-1]) * 1024,
        )  # ru_maxrss is kB
        out_bytes = sum(f.stat().st_size for f in (tmp / "hf").glob("*.safetensors"))
        print(
            f"recipe {args.recipe} {' '.join(args.overrides)}: {params / 1e6:.1f}M parameters, "
            f"vocab {args.vocab}"
        )
        print(
            f"checkpoint tensors {ckpt_bytes / 2**30:.2f} GiB -> safetensors "
            f"{out_bytes / 2**30:.2f} GiB (fp32)"
        )
        print(
            f"export wall time {seconds:.1f} s, peak RSS {peak / 2**30:.2f} GiB "
            f"({peak / ckpt_bytes:.2f}x one model copy; {base / 2**30:.2f} GiB of it is the "
            "Python/torch footprint before the export starts)"
        )


if __name__ == "__main__":
    main()
