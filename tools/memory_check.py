"""The memory report's prediction against what CPU ranks really hold, case by case.

    python tools/memory_check.py [--json docs/results/memory/check.json]

Each case runs ``python -m slowqk.memory.check`` under torchrun (one or two CPU ranks) and prints
one markdown row: parameter, gradient and optimizer bytes (predicted = allocated, or the two
numbers), and the activation bytes saved for backward per layer and outside the layers,
measured with saved-tensor hooks, with prediction / measurement.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["data.tokenizer_vocab_size=2048", "train.global_batch_size=16"]
WIDE = [
    "model.hidden_size=384",
    "model.num_attention_heads=6",
    "model.num_query_groups=2",
    "model.seq_length=512",
    "model.num_layers=2",
    "train.micro_batch_size=2",
]
RECOMPUTE = {
    "none": [],
    "selective": ["train.recompute.granularity=selective"],
    "full": ["train.recompute.granularity=full"],
}
SP = ["parallel.tensor=2", "parallel.sequence_parallel=true"]


def cases() -> list[tuple[str, int, str, list[str]]]:
    out = []
    for name, recipe, shape in (
        ("tiny/gpt", "tiny/gpt", []),
        ("tiny/llama", "tiny/llama", []),
        ("wide llama (384 x 512, GQA 6/2)", "tiny/llama", WIDE),
    ):
        for mode, extra in RECOMPUTE.items():
            out.append((f"{name}, {mode}", 1, recipe, shape + extra))
        out.append(
            (f"{name}, SP at TP2, selective", 2, recipe, shape + SP + RECOMPUTE["selective"])
        )
    out.append(
        (
            "tiny/gpt, local attention, dropout 0.1",
            1,
            "tiny/gpt",
            [
                "model.attention_backend=local",
                "model.hidden_dropout=0.1",
                "model.attention_dropout=0.1",
            ],
        )
    )
    out.append(
        (
            "tiny/llama, bf16, QK-norm",
            1,
            "tiny/llama",
            ["train.precision=bf16", "model.qk_norm=true"],
        )
    )
    out.append(
        (
            "tiny/llama, PP2 x VPP2, bf16 (state only)",
            2,
            "tiny/llama",
            [
                "parallel.pipeline=2",
                "parallel.virtual_pipeline=2",
                "model.tie_embeddings=false",
                "train.precision=bf16",
            ],
        )
    )
    return out


def run_case(ranks: int, recipe: str, overrides: list[str]) -> list[dict]:
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [
        str(torchrun),
        "--standalone",
        f"--nproc-per-node={ranks}",
        "-m",
        "slowqk.memory.check",
        recipe,
        *COMMON,
        *overrides,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode:
        sys.exit(f"case failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cell(predicted: int, measured: int, exact: bool) -> str:
    if exact:
        return f"{measured:,}" if predicted == measured else f"{predicted:,} vs {measured:,}"
    return f"{measured:,} ({predicted / measured:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="also write every case's numbers here")
    args = parser.parse_args()
    print(
        "| case | ranks | parameters | gradients | optimizer | activations per layer "
        "(predicted / measured) | outside the layers |"
    )
    print("|---|---|---|---|---|---|---|")
    records = []
    for label, ranks, recipe, overrides in cases():
        result = run_case(ranks, recipe, overrides)[0]  # rank 0 (the ranks are alike)
        m, p = result["measured"], result["predicted"]
        cells = [_cell(p[k], m[k], True) for k in ("parameters", "gradients", "optimizer")]
        for key in ("activations_per_layer", "activations_outside_layers"):
            cells.append(_cell(p[key], m[key], False) if key in m else "-")
        print(f"| {label} | {ranks} | " + " | ".join(cells) + " |", flush=True)
        records.append(
            {
                "case": label,
                "ranks": ranks,
                "recipe": recipe,
                "overrides": COMMON + overrides,
                **result,
            }
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
