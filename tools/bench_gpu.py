"""Throughput, memory and MFU of the training step, with the Q/K intervention off, holding, released.

    python tools/bench_gpu.py [--recipes gpt-125m llama-350m] [--steps 20] [--warmup 5] [--peak-tflops X]

For each recipe, three cases in one process each (one GPU): ``off`` (no patch), ``hold`` (the
multipliers are active: the patch's pre/post-step hooks run every step) and ``after`` (the
intervention was released before the timed steps: the hooks return at once). Synthetic data (the
bundled corpus, tokenized once); timings exclude the warmup steps.

Model FLOPs per token follow the PaLM/Megatron convention, counting matmuls only:
``6 * N_matmul + 12 * L * s * d_attn`` with N_matmul the parameters of every linear layer plus the
output projection, L layers, s the sequence length and d_attn = heads x head_dim; MFU divides
tokens/s x FLOPs/token by the GPU's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s; give
``--peak-tflops`` for other devices). Prints one table at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "data" / "shakespeare" / "shakespeare_modern.txt"
PEAKS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


def model_flops_per_token(model, recipe) -> float:
    m = recipe.model
    d_attn = m.hidden_size  # heads x head_dim
    matmul = sum(p.numel() for n, p in model.named_parameters()
                 if p.dim() == 2 and "embedding" not in n and "layer_norm" not in n)
    if m.tie_embeddings:  # the output projection reuses the embedding matrix but is still a matmul
        matmul += model.embedding.word_embeddings.weight.numel() * (recipe.parallel.tensor or 1)
    return 6.0 * matmul + 12.0 * m.num_layers * m.seq_length * d_attn


def run_case(recipe_name: str, case: str, steps: int, warmup: int, data: str, out: str, extra: list[str]) -> dict:
    import torch

    from slowqk.config import load_recipe
    from slowqk.train import Trainer

    qk = {"off": ["qk.enabled=false"],
          "hold": ["qk.enabled=true", "qk.unit=steps", f"qk.hold={steps + warmup + 10}", "qk.ramp=1"],
          "after": ["qk.enabled=true", "qk.unit=steps", "qk.hold=1", "qk.ramp=1"]}[case]
    recipe = load_recipe(recipe_name, [*extra, *qk, "data.corpus=null", f"data.dataset={data}", "data.tokenizer=null",
                                       "data.train_prefixes=[]", "data.valid_prefixes=[]", f"out_dir={out}",
                                       f"train.steps={steps + warmup}", "train.save_interval=null",
                                       "train.tensorboard=false", "diagnostics.interval=0", "train.eval_iters=1"])
    trainer = Trainer(recipe, quiet=True)
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        trainer.train_step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    mults = []
    for _ in range(steps):
        mults.append(trainer.train_step()["mult_q"])
    sync()
    seconds = (time.perf_counter() - start) / steps
    tokens = recipe.tokens_per_step / seconds
    return {
        "recipe": recipe_name, "case": case, "step_s": seconds, "tokens_per_s": tokens,
        "flops_per_token": model_flops_per_token(trainer.chunks[0].module, recipe),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "mult_q": sorted(set(mults)), "device": torch.cuda.get_device_name() if cuda else "cpu",
        "te": trainer.use_te,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=["gpt-125m", "llama-350m", "llama-1b"])
    ap.add_argument("--cases", nargs="+", default=["off", "hold", "after"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device")
    ap.add_argument("--corpus", default=str(CORPUS), help="text the synthetic run reads")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--case", nargs=4, help=argparse.SUPPRESS)  # internal: recipe case data out
    ap.add_argument("overrides", nargs="*", help="recipe overrides for every case (e.g. train.micro_batch_size=4)")
    args = ap.parse_args()
    if args.case:
        res = run_case(args.case[0], args.case[1], args.steps, args.warmup, args.case[2], args.case[3], args.overrides)
        print("RESULT " + json.dumps(res))
        return

    from slowqk.data.corpus import prepare_corpus

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_corpus(args.corpus, Path(tmp) / "data", vocab_size=args.vocab).dataset_dir
        for recipe in args.recipes:
            for case in args.cases:
                cmd = [sys.executable, __file__, "--case", recipe, case, str(data), str(Path(tmp) / f"{recipe}-{case}"),
                       "--steps", str(args.steps), "--warmup", str(args.warmup), *args.overrides]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    print(f"{recipe}/{case} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                    continue
                rows.append(json.loads(line[7:]))
                print(f"  {recipe}/{case}: {rows[-1]['step_s'] * 1e3:.1f} ms/step", file=sys.stderr, flush=True)
    if not rows:
        sys.exit(1)
    device = rows[0]["device"]
    peak = args.peak_tflops or next((v for k, v in PEAKS.items() if k in device), None)
    base = {r["recipe"]: r["step_s"] for r in rows if r["case"] == "off"}
    print(f"\ndevice: {device}; Transformer Engine: {rows[0]['te']}; dense bf16 peak: {peak or 'unknown'} TFLOP/s")
    print(f"{'recipe':<14}{'case':<7}{'ms/step':>9}{'tokens/s':>12}{'vs off':>9}{'peak GiB':>10}{'MFU':>8}  mult_q")
    for r in rows:
        mfu = r["tokens_per_s"] * r["flops_per_token"] / (peak * 1e12) if peak else float("nan")
        rel = (r["step_s"] / base[r["recipe"]] - 1) * 100 if r["recipe"] in base else float("nan")
        print(f"{r['recipe']:<14}{r['case']:<7}{r['step_s'] * 1e3:>9.1f}{r['tokens_per_s']:>12.0f}{rel:>+8.2f}%"
              f"{r['peak_mem_gib']:>10.2f}{mfu:>8.1%}  {r['mult_q']}")


if __name__ == "__main__":
    main()
