"""The memory report: parameters, gradients and optimizer state predicted to the byte as
megatron-core allocates them, activations saved for backward within 10% of what autograd really
saves (counted with saved-tensor hooks), the formula against Korthikanti et al.'s Table 2, and
the scale recipes fitting 80 GB in their layouts."""

from __future__ import annotations

import subprocess
import sys

import pytest
from multiproc import run_ranks

VOCAB = "data.tokenizer_vocab_size=512"
SMALL = ["model.num_layers=2", "train.micro_batch_size=2", "train.global_batch_size=4"]
WIDE = [
    "model.hidden_size=384",
    "model.num_attention_heads=6",
    "model.num_query_groups=2",
    "model.seq_length=256",
    "train.micro_batch_size=1",
    "train.global_batch_size=2",
    "model.num_layers=2",
]


def _measure(rank: int, world: int, name: str, overrides: list[str]) -> dict:
    from slowqk.config import load_recipe
    from slowqk.memory.check import measure

    recipe = load_recipe(name, [VOCAB, *overrides])
    return measure(recipe, recipe.data.tokenizer_vocab_size)


CASES = {  # id: (ranks, recipe, overrides)
    "gpt": (1, "tiny/gpt", SMALL),
    "gpt-selective": (1, "tiny/gpt", [*SMALL, "train.recompute.granularity=selective"]),
    "gpt-full": (1, "tiny/gpt", [*SMALL, "train.recompute.granularity=full"]),
    "gpt-local-dropout": (
        1,
        "tiny/gpt",
        [
            *SMALL,
            "model.attention_backend=local",
            "model.hidden_dropout=0.1",
            "model.attention_dropout=0.1",
        ],
    ),
    "gpt-qknorm-gqa-bf16": (
        1,
        "tiny/gpt",
        [*SMALL, "model.qk_norm=true", "model.num_query_groups=2", "train.precision=bf16"],
    ),
    "llama": (1, "tiny/llama", SMALL),
    "llama-wide": (1, "tiny/llama", WIDE),
    "llama-wide-tp2-sp-selective": (
        2,
        "tiny/llama",
        [
            *WIDE,
            "parallel.tensor=2",
            "parallel.sequence_parallel=true",
            "train.recompute.granularity=selective",
        ],
    ),
    "gpt-dp2-buckets": (
        2,
        "tiny/gpt",
        [*SMALL, "parallel.overlap_grad_reduce=true", "parallel.bucket_size=20000"],
    ),
    "llama-pp2-vpp2": (
        2,
        "tiny/llama",
        [
            "train.micro_batch_size=2",
            "train.global_batch_size=4",
            "parallel.pipeline=2",
            "parallel.virtual_pipeline=2",
            "model.tie_embeddings=false",
            "train.precision=bf16",
        ],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prediction_matches_what_a_rank_holds(case: str) -> None:
    ranks, name, overrides = CASES[case]
    for rank, result in enumerate(run_ranks(_measure, ranks, name, overrides)):
        measured, predicted = result["measured"], result["predicted"]
        for key in ("parameters", "gradients", "optimizer"):
            assert predicted[key] == measured[key], (case, rank, key, predicted, measured)
        for key in ("activations_per_layer", "activations_outside_layers"):
            if key in measured:
                ratio = predicted[key] / measured[key]
                assert abs(ratio - 1) <= 0.10, (case, rank, key, ratio, predicted, measured)


def _recipe(name: str, *overrides: str):
    from slowqk.config import load_recipe

    return load_recipe(name, list(overrides))


def test_layer_terms_are_korthikanti_table_2() -> None:
    """GPT block, bf16 on a GPU, dropout on, attention that keeps its scores: per layer
    s*b*h*(34 + 5*a*s/h) bytes, plus what the paper leaves out (the norms' fp32 statistics and
    the causal mask); with sequence parallelism and selective recomputation under flash attention
    34*s*b*h/t plus the statistics."""
    from slowqk.memory.predict import CUDA, layer_activation_bytes

    s, b, h, a = 2048, 4, 1024, 16
    shape = [
        f"model.seq_length={s}",
        f"model.hidden_size={h}",
        f"model.num_attention_heads={a}",
        f"train.micro_batch_size={b}",
        "model.hidden_dropout=0.1",
        "model.attention_dropout=0.1",
        "train.precision=bf16",
    ]
    local = _recipe("tiny/gpt", *shape, "model.attention_backend=local")
    stats = 2 * 2 * s * b * 4
    expected = s * b * h * (34 + 5 * a * s // h) + stats + s * s
    assert layer_activation_bytes(local, CUDA) == expected
    t = 4
    split = _recipe(
        "tiny/gpt",
        *shape,
        f"parallel.tensor={t}",
        "parallel.sequence_parallel=true",
        "train.recompute.granularity=selective",
        "model.attention_backend=sdpa",
    )
    assert layer_activation_bytes(split, CUDA) == 34 * s * b * h // t + stats // t


def test_pipeline_peak_is_megatron_lms_interleaving_factor() -> None:
    """Stage 0 of PP p with v virtual stages holds L * (1 + (p-1)/(p*v)) layer-micro-batches
    (Megatron-LM's theoretical memory report); without virtual stages L, and fewer with fewer
    micro-batches than stages."""
    from slowqk.memory.predict import in_flight

    r = _recipe("llama-8b")  # 32 layers, PP 2, VPP 4
    held, per_chunk = in_flight(r, 0, micro_batches=64)
    assert held * per_chunk == 32 * (1 + 1 / 8)
    r1 = _recipe("llama-8b", "parallel.virtual_pipeline=null")
    assert in_flight(r1, 0, 64) == (2, 16)
    assert in_flight(r1, 1, 64) == (1, 16)
    assert in_flight(r1, 0, 1) == (1, 16)


SCALE = {
    "llama-8b": 64,
    "llama-8b-16gpu": 16,
    "llama-8b-8gpu": 8,
    "gpt-1.3b": 64,
    "gpt-1.3b-16gpu": 16,
    "gpt-1.3b-8gpu": 8,
}


@pytest.mark.parametrize("name", [n + arm for n in SCALE for arm in ("", "-slowqk")])
def test_scale_recipes_fit_80gb_in_their_layouts(name: str) -> None:
    from slowqk.memory.predict import memory_report

    r = _recipe(name)
    gpus = SCALE[name.removesuffix("-slowqk")]
    stages = memory_report(r, gpus, r.model.vocab_size)
    assert len(stages) == r.parallel.pipeline
    assert max(st.total for st in stages) < 0.9 * 80e9
    if r.parallel.sequence_parallel:  # the knobs save what they should
        bare = _recipe(name, "parallel.sequence_parallel=false", "train.recompute.granularity=none")
        saved = [
            a.activations - b.activations
            for a, b in zip(memory_report(bare, gpus, r.model.vocab_size), stages, strict=True)
        ]
        assert min(saved) > 0


def _slowqk(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "slowqk.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_print_recipe_memory_prints_each_stage() -> None:
    out = _slowqk("print-recipe", "llama-8b", "--memory", "--gpus", "64")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "TP 4 x PP 2 x DP 8" in lines[0] and "4 virtual stages" in lines[0]
    rows = [line.split() for line in lines if line.split() and line.split()[0].isdigit()]
    assert [row[0] for row in rows] == ["0", "1"]
    for row in rows:
        assert float(row[5]) == pytest.approx(sum(map(float, row[1:5])), abs=0.02)
    assert ": fits" in lines[-1]


def test_print_recipe_memory_refuses_a_world_that_does_not_divide() -> None:
    out = _slowqk("print-recipe", "llama-8b", "--memory", "--gpus", "12")
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "--gpus" in out.stderr
    assert "Traceback" not in out.stderr


def test_dry_runs_show_the_knobs_and_the_memory() -> None:
    launch = _slowqk("launch", "--nproc", "64", "--dry-run", "llama-8b")
    submit = _slowqk("submit", "--nodes", "8", "--gpus-per-node", "8", "--dry-run", "llama-8b")
    for out in (launch, submit):
        assert out.returncode == 0, out.stderr
        assert "TP 4 x PP 2 x DP 8" in out.stderr
        assert "4 virtual stages per pipeline rank, sequence parallel" in out.stderr
        assert "memory per GPU, predicted:" in out.stderr
