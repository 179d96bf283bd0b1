"""tools/bench_gpu.py on CPU: its code path (megatron-core and plain cases, JSON records) and the
FLOP count it divides by, checked against the parameters of the models it times."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, SHARED

sys.path.insert(0, str(REPO / "tools"))

RECORD_KEYS = {
    "recipe",
    "case",
    "commit",
    "dirty",
    "device",
    "te",
    "attention_backend",
    "megatron_core",
    "tokens_per_s",
    "step_s",
    "mfu",
    "peak_mem_gib",
}


def _linear_weights(model: torch.nn.Module) -> int:
    return sum(
        p.numel()
        for n, p in model.named_parameters()
        if p.dim() == 2
        and "embed" not in n
        and n != "pos.weight"
        and "norm" not in n
        and "head" not in n
        and "output_layer" not in n
    )


@pytest.mark.parametrize("name", ["tiny/gpt", "tiny/llama", "llama-1b"])
def test_flops_per_token_counts_the_linear_weights_of_both_models(name: str) -> None:
    from bench_gpu import model_flops_per_token
    from plain_decoder import PlainDecoder

    from slowqk.config import load_recipe

    m = load_recipe(name, ["model.num_layers=2"]).model  # two layers of the real width
    vocab = 1024
    plain = PlainDecoder(m, vocab)
    expected = (
        6 * (_linear_weights(plain) + vocab * m.hidden_size)
        + 12 * m.num_layers * m.seq_length * m.hidden_size
    )
    assert model_flops_per_token(m, vocab) == expected
    if name.startswith("tiny"):  # the same count from megatron-core's own modules
        from multiproc import run_ranks

        assert run_ranks(_megatron_linear_weights, 1, name)[0] == _linear_weights(plain)


def _megatron_linear_weights(rank: int, world: int, name: str) -> int:
    from slowqk.config import load_recipe
    from slowqk.distributed import init_distributed, shutdown
    from slowqk.models import build_gpt_model, build_transformer_config

    recipe = load_recipe(name, ["model.num_layers=2"])
    init_distributed(recipe.parallel, recipe.seed)
    n = _linear_weights(build_gpt_model(recipe.model, build_transformer_config(recipe.model), 1024))
    shutdown()
    return n


def test_plain_decoder_learns_and_matches_the_shapes() -> None:
    from plain_decoder import PlainDecoder, plain_train_step

    from slowqk.config import load_recipe

    m = load_recipe("tiny/llama", ["model.seq_length=32"]).model
    torch.manual_seed(0)
    model = PlainDecoder(m, 256)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 256, (2, 33))
    losses = [plain_train_step(model, opt, [(ids[:, :-1], ids[:, 1:])]) for _ in range(5)]
    assert losses[0] == pytest.approx(
        torch.log(torch.tensor(256.0)).item(), abs=0.1
    )  # small init: uniform
    assert losses[-1] < losses[0] - 0.1


def _run_tool(
    tmp_path, tool: str, *args: str, corpus_arg: bool = True
) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """``tools/<tool>`` on the first 3000 lines of tiny Shakespeare (``corpus_arg``: the tool
    reads a corpus), its JSON records read back."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "".join((SHARED / "data/tinyshakespeare/input.txt").read_text().splitlines(True)[:3000])
    )
    out = tmp_path / "records.json"
    tool_args = (*(("--corpus", str(corpus)) if corpus_arg else ()), "--json", str(out), *args)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / tool), *tool_args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_bench_writes_json_records(tmp_path) -> None:
    proc, records = _run_tool(
        tmp_path,
        "bench_gpu.py",
        *("--recipes", "tiny/llama", "--cases", "off", "hold", "plain", "--steps", "1"),
        *("--warmup", "1", "--repeats", "2", "--vocab", "400", "--peak-tflops", "1"),
        *("train.micro_batch_size=4", "model.seq_length=32"),
    )
    # interleaved: every case once, then every case again
    assert [(r["repeat"], r["case"]) for r in records] == [
        (rep, case) for rep in (0, 1) for case in ("off", "hold", "plain")
    ]
    for r in records:
        assert len(r["step_seconds"]) == 1 and r["step_seconds"][0] > 0
        assert r.keys() >= RECORD_KEYS
        # None outside a git checkout (an installed wheel)
        assert r["commit"] is None or (len(r["commit"]) == 40 and isinstance(r["dirty"], bool))
        assert r["device"] == "cpu" and r["attention_backend"] == "sdpa" and r["te"] is False
        assert r["tokens_per_s"] == pytest.approx(16 * 32 / r["step_s"])
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / 1e12)
    assert [r["mult_q"] for r in records] == [[1.0], [0.25], [1.0]] * 2
    assert "vs plain" in proc.stdout


def test_bench_runs_data_parallel_ranks(tmp_path) -> None:
    proc, records = _run_tool(
        tmp_path,
        "bench_gpu.py",
        *("--recipes", "tiny/gpt", "--cases", "off", "compiled", "plain", "--nproc", "2"),
        *("--steps", "1", "--warmup", "1", "--vocab", "400"),
        *("train.micro_batch_size=4", "model.seq_length=32"),
    )
    assert [(r["case"], r["nproc"]) for r in records] == [("off", 2), ("compiled", 2), ("plain", 2)]
    for r in records:  # the global batch (16 x 32 tokens) over both ranks
        assert r["tokens_per_s"] == pytest.approx(16 * 32 / r["step_s"])
        assert len(r["warmup_step_seconds"]) == 1
    assert "    2  plain" in proc.stdout


def test_cpu_overhead_bench_switches_each_fix(tmp_path) -> None:
    _, (both, neither) = _run_tool(
        tmp_path,
        "bench_cpu_overheads.py",
        *("--recipes", "tiny/gpt", "--variants", "both", "neither", "--repeats", "1"),
        *("--steps", "3", "--warmup", "1", "--vocab", "400"),
        *("train.micro_batch_size=4", "model.seq_length=32"),
    )
    assert (both["variant"], neither["variant"]) == ("both", "neither")
    assert len(both["step_seconds"]) == 3 and both["wall_s"] > 0
    # ~21 gloo event loops wake every 10 ms without the shared device, one with it
    per_second = [r["voluntary_switches"] / r["wall_s"] for r in (both, neither)]
    assert per_second[1] > 5 * per_second[0], per_second


def test_alternated_steps_rotate_the_order_and_time_only_after_warmup() -> None:
    from bench_gpu import _alternated

    calls: list[str] = []
    steps = {name: (lambda name=name: calls.append(name) or name) for name in ("a", "b", "c")}
    out = _alternated(steps, steps=3, warmup=2)
    # every round each case once, the first one moved to the end each round
    rounds = ["".join(calls[i : i + 3]) for i in range(0, len(calls), 3)]
    assert rounds == ["abc", "bca", "cab", "abc", "bca"]
    for name, (timed, warm, results) in out.items():
        assert len(timed) == 3 and len(warm) == 2 and results == [name] * 3


def test_bench_pairs_a_megatron_case_with_the_plain_one_in_one_process(tmp_path) -> None:
    proc, records = _run_tool(
        tmp_path,
        "bench_gpu.py",
        *("--recipes", "tiny/gpt", "--cases", "off", "plain", "--paired", "--steps", "2"),
        *("--warmup", "1", "--vocab", "400"),
        *("train.micro_batch_size=4", "model.seq_length=32"),
    )
    assert [(r["case"], r["group"], r["paired"]) for r in records] == [
        ("off", "off", True),
        ("plain", "off", True),
    ]
    for r in records:
        assert len(r["step_seconds"]) == 2 and len(r["warmup_step_seconds"]) == 1
        assert r["peak_mem_gib"] is None  # both models live in the process
    off, plain = records
    ratio = off["tokens_per_s"] / plain["tokens_per_s"]
    assert f"{ratio:.3f}x" in proc.stdout  # the table's ratio is the one process's


def test_compile_scope_bench_compares_the_same_model_under_each_scope(tmp_path) -> None:
    proc, report = _run_tool(
        tmp_path,
        "bench_compile_scope.py",
        *("--recipe", "tiny/gpt", "--scopes", "eager", "layers", "model", "--rounds", "2"),
        *("--vocab", "400", "--", "model.num_layers=2", "model.hidden_size=64"),
        *("model.seq_length=32", "train.micro_batch_size=2"),
        corpus_arg=False,
    )
    rows = {r["scope"]: r for r in report["rows"]}
    assert list(rows) == ["eager", "layers", "model", "plain"]
    assert report["meta"]["recipe"] == "tiny/gpt" and "commit" in report["meta"]
    for r in rows.values():
        assert len(r["seconds"]) == 2 and min(r["seconds"]) > 0
        assert r["plain_over_scope"] == pytest.approx(rows["plain"]["median_s"] / r["median_s"])
    # one model under three scopes: the same loss (inductor reorders reductions: not bitwise)
    assert rows["layers"]["loss"] == pytest.approx(rows["eager"]["loss"], abs=1e-5)
    assert rows["model"]["loss"] == pytest.approx(rows["eager"]["loss"], abs=1e-5)
    assert rows["eager"]["loss"] != rows["plain"]["loss"]
    assert "plain/this" in proc.stdout


def test_gpu_targets_are_stated_met_or_missed_from_bench_records() -> None:
    from gpu_targets import targets

    def rec(recipe, case, tps, mem=None, mfu=None):
        return {
            "recipe": recipe,
            "case": case,
            "tokens_per_s": tps,
            "peak_mem_gib": mem,
            "mfu": mfu,
        }

    records = [
        rec("big", "off", 1000.0, 30.0, 0.46),
        rec("big", "hold", 995.0, 30.0),
        rec("big", "plain", 1100.0, 24.0),
        rec("mid", "off", 3000.0, 10.0, 0.3),
        rec("mid", "hold", 2900.0, 10.0),
        rec("mid", "plain", 2950.0, 9.0),
    ]
    got = {t["target"]: (round(t["value"], 4), t["met"]) for t in targets(records, "big", "mid")}
    assert got["MFU, big"] == (0.46, True)
    assert got["tokens/s vs plain eager, big"] == (round(1000 / 1100, 4), False)
    assert got["tokens/s vs plain eager, mid"] == (round(3000 / 2950, 4), True)
    assert got["peak memory vs plain, big"] == (1.25, False)
    assert got["Q/K hold cost per step, big"] == (round(1000 / 995 - 1, 4), True)
    assert got["Q/K hold cost per step, mid"] == (round(3000 / 2900 - 1, 4), False)
    none = {t["target"]: t["met"] for t in targets([], "big", "mid")}
    assert set(none.values()) == {None}  # not measured is said, not guessed
