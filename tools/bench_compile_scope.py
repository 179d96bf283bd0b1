"""How much of the megatron-core model to put under torch.compile: each scope against the plain
twin, in one process, forward and backward alternated.

    python tools/bench_compile_scope.py [--recipe tiny/gpt] [--scopes eager layers decoder model]
        [--rounds 120] [--vocab 2048] [--json PATH] [-- overrides ...]

Scopes (each a separate megatron-core model of the recipe, built alike from one seed):
  eager    no compilation
  layers   each ``TransformerLayer`` compiled in place (one graph per layer call)
  decoder  the ``TransformerBlock``: the layers and the final norm in one graph
  model    the whole ``GPTModel``, embedding to loss (what ``train.compile`` does)
and ``plain``, tools/plain_decoder.py's model of the same shapes, eager. One round runs every
model's forward (with the loss) and backward once, the order rotated each round; no optimizer
step (the same for every scope), so every call of a model sees the same weights and gives the
same loss, recorded to show the scopes compute the same model (plain's is its own). Compilation
falls in the warmup calls and is reported apart. Prints each model's median seconds a call and
the ratio plain / scope (above 1: faster than plain); ``--json`` writes every call's seconds.
CPU only (fp32, no precision wrapper): on a GPU, ``tools/bench_gpu.py --cases off compiled`` is
the measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import _alternated  # noqa: E402

SCOPES = ("eager", "layers", "decoder", "model")


def compiled_in_place(model, scope: str):
    """``model`` with the modules of ``scope`` compiled in place (parameters untouched)."""
    if scope == "layers":
        for layer in model.decoder.layers:
            layer.compile()
    elif scope == "decoder":
        model.decoder.compile()
    elif scope == "model":
        model.compile()
    return model


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--recipe", default="tiny/gpt")
    ap.add_argument("--scopes", nargs="+", choices=SCOPES, default=list(SCOPES))
    ap.add_argument("--rounds", type=int, default=120)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import torch

    if torch.cuda.is_available():
        print(
            "bench_compile_scope: CPU only; on a GPU use tools/bench_gpu.py --cases off compiled",
            file=sys.stderr,
        )
        sys.exit(2)
    from plain_decoder import PlainDecoder

    from slowqk.config import load_recipe
    from slowqk.distributed import init_distributed
    from slowqk.models import build_gpt_model, build_transformer_config, padded_vocab_size
    from slowqk.provenance import provenance

    # random tokens, as the plain cases of bench_gpu.py: no corpus, tokenizer or trainer needed
    recipe = load_recipe(args.recipe, args.overrides)
    m, b = recipe.model, recipe.train.micro_batch_size
    init_distributed(recipe.parallel, recipe.seed)  # megatron-core's layers need its groups
    t = recipe.train
    config = build_transformer_config(m, precision=t.precision, fused_kernels=t.fused_kernels)
    vocab = padded_vocab_size(args.vocab, m.make_vocab_size_divisible_by, 1)
    gen = torch.Generator().manual_seed(recipe.seed)
    ids = torch.randint(0, args.vocab, (b, m.seq_length), generator=gen)
    labels = torch.randint(0, args.vocab, (b, m.seq_length), generator=gen)
    positions = torch.arange(m.seq_length).expand(b, -1)

    def forward_backward(loss_of):
        def call() -> float:
            loss = loss_of()
            loss.backward()
            return float(loss)

        return call

    def megatron_call(scope: str):
        torch.manual_seed(recipe.seed)
        model = compiled_in_place(build_gpt_model(m, config, vocab), scope)
        return forward_backward(lambda: model(ids, positions, None, labels=labels).mean())

    def plain_call():
        torch.manual_seed(recipe.seed)
        model = PlainDecoder(m, vocab)
        return forward_backward(lambda: model(ids, labels))

    calls = {scope: megatron_call(scope) for scope in args.scopes}
    calls["plain"] = plain_call()
    timed = _alternated(calls, args.rounds, args.warmup)
    plain = statistics.median(timed["plain"][0])
    rows = []
    for name, (seconds, warm, losses) in timed.items():
        median = statistics.median(seconds)
        rows.append(
            {
                "scope": name,
                "median_s": median,
                "plain_over_scope": plain / median,
                "loss": losses[0],  # the same weights every call (no optimizer step)
                "seconds": seconds,
                "warmup_seconds": warm,
            }
        )
        print(
            f"{args.recipe:11s} {name:8s} {median * 1e3:8.2f} ms  plain/this {plain / median:.3f}"
            f"  (warmup {sum(warm):.1f} s)"
        )
    if args.json:
        meta = {"recipe": args.recipe, "overrides": args.overrides, **provenance()}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
