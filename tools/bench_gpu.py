"""Throughput, memory and MFU of the training step, beside a plain-PyTorch baseline of the same
shapes, on the GPU or the CPU (whatever device is there).

    python tools/bench_gpu.py [--recipes gpt-125m llama-350m llama-1b]
        [--cases off hold after plain plain-compiled] [--nproc 1 2] [--steps 20] [--warmup 5]
        [--repeats 1] [--paired] [--json PATH] [-- overrides ...]

Cases, each in a fresh process (or ``--nproc`` ranks under torchrun, data parallel):
  off             megatron-core, the Q/K intervention disabled (no patch)
  hold            the multipliers active: the patch's pre/post-step hooks work every step
  after           the intervention released before the timed steps: the hooks return at once
  compiled        ``off`` with ``train.compile=true`` (the whole model under torch.compile)
  selective       ``off`` with selective recomputation (core attention)
  full            ``off`` with full recomputation (every layer, uniform, one per unit)
  overlap         ``off`` with the gradient reduce and the parameter gather overlapped
  plain           tools/plain_decoder.py: the same shapes written directly in PyTorch (SDPA, bf16
                  autocast, fused AdamW; torch DDP over several ranks), what a user would
                  otherwise run
  plain-compiled  the same under torch.compile
The megatron cases read the bundled corpus (tokenized once); the plain ones random tokens of the
same vocabulary. Timings exclude the warmup steps (and compilation); each record keeps every timed
step's seconds and every warmup step's (the first one's excess over the steady step is about the
compile time). ``--repeats R`` runs the whole list of cases R times, interleaved (case 1, 2, ...,
then again), so slow drifts of a shared machine fall on every case alike; the table gives each
case's median tokens/s with the spread (min-max) over the repeats, and the ratio to plain (of the
same rank count) as the median of the per-repeat ratios. On the CPU the cores are split between
the ranks. Overrides apply to the megatron cases (e.g. ``model.attention_backend=local``,
``train.micro_batch_size=4``) and shape the plain one too.

``--paired`` runs each megatron case in one process (or set of ranks) together with the plain
cases, their steps alternated with the order rotated every step: one allocator, one set of threads
and one machine state for both, which separate processes do not share (on the CPU, megatron-core's
start tunes glibc's heap, which the plain process would otherwise lack; and a noisy machine moves
two processes apart by more than it moves two alternating steps). The ratio to plain is then taken
within the process; peak memory is not recorded (both models are resident).

Model FLOPs per token follow the PaLM/Megatron convention, counting matmuls only:
``6 * N_matmul + 12 * L * s * d_attn`` with N_matmul the weights of every linear layer plus the
output projection, L layers, s the sequence length and d_attn = heads x head_dim; MFU divides
tokens/s x FLOPs/token by the GPU's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s; give
``--peak-tflops`` for other devices). Prints one table; ``--json`` writes the records.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "data" / "shakespeare" / "shakespeare_modern.txt"
PEAKS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}
MEGATRON_CASES = ("off", "hold", "after", "compiled", "selective", "full", "overlap")
PLAIN_CASES = ("plain", "plain-compiled")


def model_flops_per_token(m, vocab_size: int) -> float:
    """From the shapes alone, so megatron-core and the plain model are counted the same way."""
    heads, groups, hd = (
        m.num_attention_heads,
        m.num_query_groups or m.num_attention_heads,
        m.hidden_size // m.num_attention_heads,
    )
    h, f = m.hidden_size, m.ffn_size
    per_layer = (
        h * (heads + 2 * groups) * hd + heads * hd * h + (3 if m.ffn == "swiglu" else 2) * h * f
    )
    matmul = (
        m.num_layers * per_layer + vocab_size * h
    )  # the output projection is a matmul, tied or not
    return 6.0 * matmul + 12.0 * m.num_layers * m.seq_length * heads * hd


def synthetic_recipe(
    recipe_name: str, case: str, steps: int, warmup: int, data: str, out: str, extra: list[str]
):
    """``recipe_name`` on the prepared ``data``, with the case's Q/K settings, no checkpoints,
    TensorBoard or diagnostics: what a timed run needs (shared with tools/profile_step.py)."""
    from slowqk.config import load_recipe

    qk = {
        "off": ["qk.enabled=false"],
        "hold": ["qk.enabled=true", "qk.unit=steps", f"qk.hold={steps + warmup}", "qk.ramp=0"],
        "after": ["qk.enabled=true", "qk.unit=steps", "qk.hold=1", "qk.ramp=1"],
        "compiled": ["qk.enabled=false", "train.compile=true"],
        "selective": ["qk.enabled=false", "train.recompute.granularity=selective"],
        "full": ["qk.enabled=false", "train.recompute.granularity=full"],
        "overlap": [
            "qk.enabled=false",
            "parallel.overlap_grad_reduce=true",
            "parallel.overlap_param_gather=true",
        ],
    }.get(case, ["qk.enabled=false"])
    return load_recipe(
        recipe_name,
        [
            *extra,
            *qk,
            "data.corpus=null",
            f"data.dataset={data}",
            "data.tokenizer=null",
            "data.train_prefixes=[]",
            "data.valid_prefixes=[]",
            f"out_dir={out}",
            f"train.steps={steps + warmup}",
            "train.save_interval=null",
            "train.tensorboard=false",
            "diagnostics.interval=0",
            "train.eval_iters=1",
        ],
    )


def _alternated(steps_by_case: dict, steps: int, warmup: int) -> dict[str, tuple[list, list, list]]:
    """Every case's step once per round, the order rotated each round (with two cases: swapped),
    so each case runs after each other equally often; one case is a plain timed loop. Per case:
    the timed steps' seconds, the warmup steps' seconds (compilation falls there), the timed
    steps' results. On CUDA the peak-memory counter restarts with the timed steps."""
    import torch

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    names = list(steps_by_case)
    out: dict[str, tuple[list, list, list]] = {n: ([], [], []) for n in names}
    for i in range(warmup + steps):
        if i == warmup and cuda:
            torch.cuda.reset_peak_memory_stats()
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            result = steps_by_case[name]()
            sync()  # per-step times need it; a sync per step is what a loop's logging costs
            timed, warm, results = out[name]
            (timed if i >= warmup else warm).append(time.perf_counter() - t0)
            if i >= warmup:
                results.append(result)
    return out


def _peak_gib() -> float | None:
    """Peak GiB allocated on the GPU since the timed steps began; None on the CPU."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _timing(timed: list[float], warm: list[float], peak: float | None) -> dict:
    return {
        "step_s": sum(timed) / len(timed),
        "step_seconds": timed,
        "warmup_step_seconds": warm,
        "peak_mem_gib": peak,
    }


def _megatron_fields(trainer, results: list[dict]) -> dict:
    return {
        "vocab": trainer.vocab_size,
        "te": trainer.use_te,
        "attention_backend": trainer.attention_backend,
        "mult_q": sorted({r["mult_q"] for r in results}),
    }


def _plain_fields(padded_vocab: int) -> dict:
    return {"vocab": padded_vocab, "te": False, "attention_backend": "sdpa", "mult_q": [1.0]}


def _ranks() -> tuple[int, int]:
    """World size and rank under torchrun (1 and 0 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


def run_megatron_case(recipe, case: str, steps: int, warmup: int) -> dict:
    from slowqk.train import Trainer

    trainer = Trainer(recipe, quiet=True)
    timed, warm, results = _alternated({case: trainer.train_step}, steps, warmup)[case]
    return {**_timing(timed, warm, _peak_gib()), **_megatron_fields(trainer, results)}


def plain_case_step(recipe, case: str, vocab: int):
    """The plain twin's training step on random tokens, and its padded vocabulary."""
    import torch
    from plain_decoder import PlainDecoder, plain_train_step

    from slowqk.models import padded_vocab_size

    m, t = recipe.model, recipe.train
    world, rank = _ranks()
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if cuda else "cpu")
    torch.manual_seed(recipe.seed)
    padded = padded_vocab_size(vocab, m.make_vocab_size_divisible_by, 1)
    model = PlainDecoder(m, padded).to(device)
    if world > 1:  # what a user would run: torch's DDP, one gradient all-reduce a step
        import torch.distributed as dist

        if cuda:
            torch.cuda.set_device(device)
        if not dist.is_initialized():  # --paired: megatron-core's trainer started it
            dist.init_process_group("nccl" if cuda else "gloo")
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=recipe.optimizer.lr,
        betas=(recipe.optimizer.beta1, recipe.optimizer.beta2),
        weight_decay=recipe.optimizer.weight_decay,
        fused=device.type == "cuda",
    )
    if case == "plain-compiled":
        model = torch.compile(model)
    torch.manual_seed(recipe.seed + rank)  # each rank its own micro-batches
    ids = torch.randint(
        0,
        vocab,
        (t.global_batch_size // (t.micro_batch_size * world), t.micro_batch_size, m.seq_length + 1),
        device=device,
    )
    batches = [(x[:, :-1], x[:, 1:]) for x in ids]
    return (lambda: plain_train_step(model, opt, batches)), padded


def run_plain_case(recipe, case: str, steps: int, warmup: int, vocab: int) -> dict:
    step, padded = plain_case_step(recipe, case, vocab)
    timed, warm, _ = _alternated({case: step}, steps, warmup)[case]
    return {**_timing(timed, warm, _peak_gib()), **_plain_fields(padded)}


def _record(recipe_name: str, case: str, recipe, res: dict) -> dict:
    import megatron.core
    import torch

    from slowqk.provenance import provenance

    code = provenance()
    return {
        "recipe": recipe_name,
        "case": case,
        "commit": code["commit"],  # every figure names its commit
        "dirty": code["dirty"],
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "megatron_core": megatron.core.__version__,
        "torch": torch.__version__,
        "nproc": _ranks()[0],
        "tokens_per_s": recipe.tokens_per_step / res["step_s"],
        "flops_per_token": model_flops_per_token(recipe.model, res["vocab"]),
        "micro_batch_size": recipe.train.micro_batch_size,
        "global_batch_size": recipe.train.global_batch_size,
        "seq_length": recipe.model.seq_length,
        **res,
    }


class CaseSetup(NamedTuple):
    """What every case of one bench run shares."""

    steps: int
    warmup: int
    data: str
    out: str
    extra: list[str]
    vocab: int

    def recipe(self, recipe_name: str, case: str):
        return synthetic_recipe(
            recipe_name, case, self.steps, self.warmup, self.data, self.out, self.extra
        )


def run_case(recipe_name: str, case: str, setup: CaseSetup) -> dict:
    recipe = setup.recipe(recipe_name, case)
    if case in PLAIN_CASES:
        res = run_plain_case(recipe, case, setup.steps, setup.warmup, setup.vocab)
    else:
        res = run_megatron_case(recipe, case, setup.steps, setup.warmup)
    return _record(recipe_name, case, recipe, res)


def run_paired(recipe_name: str, case: str, plain_cases: list[str], setup: CaseSetup) -> list[dict]:
    """One megatron case and the plain cases in one process, their steps alternated: the same
    allocator (megatron-core's start sets the CPU heap's), threads and machine state for both,
    so a drift of a shared machine falls on both alike. No peak memory (both models are held)."""
    from slowqk.train import Trainer

    recipe = setup.recipe(recipe_name, case)
    trainer = Trainer(recipe, quiet=True)
    steps_by_case = {case: trainer.train_step}
    recipes = {case: recipe}
    padded = {}
    for plain in plain_cases:
        recipes[plain] = setup.recipe(recipe_name, plain)
        steps_by_case[plain], padded[plain] = plain_case_step(recipes[plain], plain, setup.vocab)
    records = []
    alternated = _alternated(steps_by_case, setup.steps, setup.warmup)
    for name, (timed, warm, results) in alternated.items():
        fields = _megatron_fields(trainer, results) if name == case else _plain_fields(padded[name])
        res = {**_timing(timed, warm, None), **fields, "paired": True, "group": case}
        records.append(_record(recipe_name, name, recipes[name], res))
    return records


def _with_mfu(record: dict, peak_tflops: float | None) -> dict:
    mfu = (
        record["tokens_per_s"] * record["flops_per_token"] / (peak_tflops * 1e12)
        if peak_tflops
        else None
    )
    return {**record, "mfu": mfu}


def _write_json(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--recipes", nargs="+", default=["gpt-125m", "llama-350m", "llama-1b"])
    ap.add_argument(
        "--cases",
        nargs="+",
        default=[*MEGATRON_CASES, *PLAIN_CASES],
        choices=[*MEGATRON_CASES, *PLAIN_CASES],
    )
    ap.add_argument(
        "--nproc",
        nargs="+",
        type=int,
        default=[1],
        help="ranks per case (data parallel; torchrun), each count measured in turn",
    )
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats of every case")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device")
    ap.add_argument("--corpus", default=str(CORPUS), help="text the megatron cases read")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--json", type=Path, default=None, help="write the records (a JSON list) here")
    ap.add_argument(
        "--paired",
        action="store_true",
        help="each megatron case in one process with the plain cases, their steps alternated",
    )
    ap.add_argument("--case", nargs=4, help=argparse.SUPPRESS)  # internal: recipe case data out
    ap.add_argument("--paired-plain", nargs="+", help=argparse.SUPPRESS)  # internal: with --case
    ap.add_argument(
        "overrides",
        nargs="*",
        help="recipe overrides for every case (e.g. train.micro_batch_size=4)",
    )
    args = ap.parse_args()
    if args.case:
        recipe, case, data, out = args.case
        setup = CaseSetup(args.steps, args.warmup, data, out, args.overrides, args.vocab)
        if args.paired_plain:
            results = run_paired(recipe, case, args.paired_plain, setup)
        else:
            results = [run_case(recipe, case, setup)]
        if _ranks()[1] == 0:
            for res in results:
                print("RESULT " + json.dumps(res))
        return
    plains = [c for c in args.cases if c in PLAIN_CASES]
    if args.paired and (not plains or plains == args.cases):
        ap.error("--paired needs a megatron case and a plain case in --cases")

    import torch

    from slowqk.data.corpus import prepare_corpus

    cuda = torch.cuda.is_available()
    rows, failed, peak = [], [], args.peak_tflops
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_corpus(args.corpus, Path(tmp) / "data", vocab_size=args.vocab).dataset_dir
        plan = [
            (rep, recipe, nproc, case)
            for rep in range(args.repeats)
            for recipe in args.recipes
            for nproc in args.nproc
            for case in args.cases
            if not (args.paired and case in PLAIN_CASES)  # they run inside the megatron ones
        ]
        for rep, recipe, nproc, case in plan:
            cmd = [
                *_launcher(nproc),
                __file__,
                "--case",
                recipe,
                case,
                str(data),
                str(Path(tmp) / f"{recipe}-{case}-{nproc}-{rep}"),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--vocab",
                str(args.vocab),
                *(["--paired-plain", *plains] if args.paired else []),
                "--",
                *args.overrides,
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=_case_env(nproc, cuda))
            lines = [x[7:] for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"{recipe}/{case} x{nproc} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                failed.append(f"{recipe}/{case} x{nproc}")
                continue
            for line in lines:
                record = {**json.loads(line), "repeat": rep}
                peak = args.peak_tflops or next(
                    (v for k, v in PEAKS.items() if k in record["device"]), None
                )
                rows.append(_with_mfu(record, peak))
                first = record["warmup_step_seconds"][:1]
                print(
                    f"  {recipe}/{record['case']} x{nproc} (repeat {rep + 1}): "
                    f"{record['step_s'] * 1e3:.1f} ms/step"
                    + "".join(f", first warmup step {x:.1f} s" for x in first),
                    file=sys.stderr,
                    flush=True,
                )
            if args.json:  # after every case, so a run cut short keeps what it measured
                _write_json(args.json, rows)
    if not rows:
        sys.exit(1)
    print_table(rows, peak)
    if failed:
        print(f"failed cases: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


def _launcher(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
    ]


def _case_env(nproc: int, cuda: bool) -> dict[str, str]:
    """On the CPU the cores are split between the ranks (torchrun would give each one thread);
    an OMP_NUM_THREADS set by the caller stands."""
    env = dict(os.environ)
    if not cuda and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // nproc))
    return env


def _median(xs: list[float]) -> float:
    ys = sorted(xs)
    n = len(ys)
    return ys[n // 2] if n % 2 else (ys[n // 2 - 1] + ys[n // 2]) / 2


def print_table(rows: list[dict], peak: float | None) -> None:
    """One line per recipe and case: medians over the repeats, the spread in brackets."""
    by_case: dict[tuple[str, int, str], list[dict]] = {}
    for r in rows:
        by_case.setdefault((r["recipe"], r.get("nproc", 1), r["case"]), []).append(r)
    r0 = rows[0]
    repeats = len(by_case[r0["recipe"], r0.get("nproc", 1), r0["case"]])
    print(
        f"\ndevice: {r0['device']}; megatron-core {r0['megatron_core']}; torch {r0['torch']}; "
        f"dense bf16 peak: {peak or 'unknown'} TFLOP/s; repeats: {repeats}"
    )
    print(
        f"{'recipe':<12}{'ranks':>5}  {'case':<16}{'backend':<8}{'ms/step':>9}{'tokens/s':>11}"
        f"{'(min-max)':>18}"
        f"{'vs off':>9}{'vs plain':>10}{'(min-max)':>16}{'peak GiB':>10}{'MFU':>8}  mult_q"
    )

    def ratios(key: tuple[str, int, str], base: str, same_process: bool) -> list[float]:
        """Per repeat: this case's tokens/s over the base case's of the same repeat and ranks
        (and, ``same_process``, of the same --paired process where the records come from one)."""

        def match(r: dict) -> tuple:
            return (r["repeat"], r.get("group") if same_process else None)

        base_of = {match(r): r for r in by_case.get((*key[:2], base), [])}
        return [
            r["tokens_per_s"] / base_of[match(r)]["tokens_per_s"]
            for r in by_case[key]
            if match(r) in base_of
        ]

    for (recipe, nproc, case), rs in by_case.items():
        tps = [r["tokens_per_s"] for r in rs]
        key = (recipe, nproc, case)
        vs_off, vs_plain = ratios(key, "off", False), ratios(key, "plain", True)
        off = f"{_median(vs_off):.3f}x" if vs_off else "-"
        plain = f"{_median(vs_plain):.3f}x" if vs_plain else "-"
        spread = f"({min(vs_plain):.3f}-{max(vs_plain):.3f})" if vs_plain else ""
        mem = [r["peak_mem_gib"] for r in rs if r["peak_mem_gib"] is not None]
        mfu = [r["mfu"] for r in rs if r["mfu"] is not None and not math.isnan(r["mfu"])]
        print(
            f"{recipe:<12}{nproc:>5}  {case:<16}{rs[0]['attention_backend']:<8}"
            f"{_median([r['step_s'] for r in rs]) * 1e3:>9.1f}{_median(tps):>11.0f}"
            f"{f'({min(tps):.0f}-{max(tps):.0f})':>18}{off:>9}{plain:>10}{spread:>16}"
            f"{(f'{max(mem):.2f}' if mem else '-'):>10}"
            f"{(f'{_median(mfu):.1%}' if mfu else '-'):>8}  {rs[0]['mult_q']}"
        )


if __name__ == "__main__":
    main()
