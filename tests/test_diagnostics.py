"""Attention-specialization estimators against analytic values."""

from __future__ import annotations

import math

import pytest
import torch

from slowqk.diagnostics import attention_entropy, attention_max_prob, qk_relative_update
from slowqk.qk.selection import FusedQKVLayout


def _uniform_causal(batch: int, heads: int, seq: int) -> torch.Tensor:
    mask = torch.ones(seq, seq).tril()
    return (mask / mask.sum(-1, keepdim=True)).expand(batch, heads, seq, seq)


def test_uniform_causal_attention_has_entropy_one_and_analytic_max_prob() -> None:
    seq = 16
    p = _uniform_causal(2, 3, seq)
    torch.testing.assert_close(attention_entropy(p), torch.ones(3, dtype=torch.float64))
    want = sum(1 / (i + 1) for i in range(seq)) / seq  # max weight at position i is 1/(i+1)
    torch.testing.assert_close(attention_max_prob(p), torch.full((3,), want, dtype=torch.float64))


def test_one_hot_attention_has_entropy_zero() -> None:
    seq = 8
    p = torch.zeros(1, 2, seq, seq)
    p[..., torch.arange(seq), torch.arange(seq)] = 1.0  # attend to self
    assert attention_entropy(p).abs().max() < 1e-9
    assert attention_max_prob(p).tolist() == [1.0, 1.0]


def test_entropy_of_two_equal_keys_matches_log2() -> None:
    # every query attends equally to two keys: H = log 2, normalized by log(i + 1)
    seq = 6
    p = torch.zeros(1, 1, seq, seq)
    for i in range(1, seq):
        p[0, 0, i, 0] = p[0, 0, i, i] = 0.5
    p[0, 0, 0, 0] = 1.0
    want = sum(math.log(2) / math.log(i + 1) for i in range(1, seq)) / (seq - 1)
    assert attention_entropy(p).item() == pytest.approx(want, rel=1e-12)


def test_qk_relative_update_reads_only_its_rows() -> None:
    layout = FusedQKVLayout(num_query_groups=2, heads_per_group=2, head_dim=3)
    w0 = torch.randn(layout.total_rows, 5, generator=torch.Generator().manual_seed(0))
    w1 = w0.clone()
    k_rows = torch.cat([torch.arange(a, b) for a, b in layout.global_rows("k")])
    w1[k_rows] *= 1.5  # K moves by half its norm; Q and V untouched
    v_rows = torch.cat([torch.arange(a, b) for a, b in layout.global_rows("v")])
    w1[v_rows] += 10.0
    got = qk_relative_update(w0, w1, layout)
    assert got["q"] == 0.0 and got["k"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="do not match"):
        qk_relative_update(w0[:-1], w1[:-1], layout)


def _probe_worker(rank: int, world: int, tp: int, model_overrides: dict) -> dict:
    from megatron_harness import VOCAB, gather_full_state, tiny_recipe
    from reference_model import ReferenceGPT

    from slowqk.distributed import init_distributed, shutdown
    from slowqk.models import build_gpt_model, build_transformer_config
    from slowqk.monitor import probe_stats
    from slowqk.probe import attention_probs

    recipe = tiny_recipe(model=model_overrides, parallel={"tensor": tp})
    init_distributed(recipe.parallel, recipe.seed)
    cfg = build_transformer_config(recipe.model, tensor_parallel=tp)
    model = build_gpt_model(recipe.model, cfg, VOCAB, probe=True)
    plain_keys = set(build_gpt_model(recipe.model, cfg, VOCAB).state_dict())
    ids = torch.randint(0, VOCAB, (2, recipe.model.seq_length), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    probs = attention_probs(model, ids, pos)
    stats = probe_stats(model, ids, pos)
    ref = ReferenceGPT(recipe.model, VOCAB)
    ref.load_megatron(gather_full_state(model, recipe.model.ffn == "swiglu"))
    ref(ids)
    worst = max((probs[i] - blk.last_probs).abs().max().item() for i, blk in enumerate(ref.blocks))
    entropy = {i: attention_entropy(p).tolist() for i, p in probs.items()}
    shutdown()
    return {"worst": worst, "same_keys": set(model.state_dict()) == plain_keys, "entropy": entropy,
            "shape": tuple(probs[0].shape), "stats": stats}


@pytest.mark.slow
@pytest.mark.parametrize("tp,model", [(1, {}), (2, {"num_query_groups": 2, "position": "rope"})], ids=["tp1-mha", "tp2-gqa-rope"])
def test_probed_attention_matches_the_reference(tp, model) -> None:
    from multiproc import run_ranks

    results = run_ranks(_probe_worker, tp, tp, model)
    for res in results:
        assert res["same_keys"]  # the probe changes no parameter or checkpoint key
        assert res["shape"] == (2, 4, 16, 16)  # every head, gathered over TP
        assert res["worst"] < 1e-5
    assert results[0]["entropy"] == results[-1]["entropy"]  # same on every TP rank
    assert results[0]["stats"] == results[-1]["stats"]


@pytest.mark.slow
def test_probe_stats_tp2_equal_tp1_on_the_same_weights() -> None:
    from multiproc import run_ranks

    model = {"num_query_groups": 2}
    tp1 = run_ranks(_probe_worker, 1, 1, model)[0]["stats"]
    tp2 = run_ranks(_probe_worker, 2, 2, model)[0]["stats"]
    assert tp1.keys() == tp2.keys() == {0, 1, 2, 3}
    for layer, values in tp1.items():
        for key, x in values.items():
            torch.testing.assert_close(torch.tensor(tp2[layer][key]), torch.tensor(x), rtol=1e-5, atol=1e-7)


def _train_worker(rank: int, world: int, overrides: list[str]) -> dict:
    from slowqk.config import load_recipe
    from slowqk.train import train

    return train(load_recipe("tiny/gpt", overrides), quiet=True)


def _overrides(corpus, run_dir, **extra) -> list[str]:
    base = {
        "out_dir": str(run_dir), "data.corpus": str(corpus), "data.tokenizer_vocab_size": 384,
        "model.num_layers": 4, "model.hidden_size": 64, "model.num_attention_heads": 4, "model.seq_length": 32,
        "train.steps": 6, "train.micro_batch_size": 2, "train.global_batch_size": 4, "train.log_interval": 1,
        "train.eval_interval": 3, "train.eval_iters": 1, "train.progress_bar": "false", "train.tensorboard": "false",
        "qk.enabled": "true", "qk.unit": "steps", "qk.hold": 3, "qk.ramp": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    from conftest import SHARED

    path = tmp_path_factory.mktemp("c") / "corpus.txt"
    src = SHARED / "data" / "tinyshakespeare" / "input.txt"
    path.write_text("".join(src.read_text().splitlines(keepends=True)[:2500]))
    return path


@pytest.mark.slow
def test_diagnostics_do_not_change_training(small_corpus, tmp_path) -> None:
    from multiproc import run_ranks

    from slowqk.metrics import read_metrics
    from slowqk.monitor import read_diagnostics

    def losses(run):
        return [(r["step"], r["loss"], r.get("val_loss")) for r in read_metrics(run / "metrics.jsonl")]

    off, on, tp2 = tmp_path / "off", tmp_path / "on", tmp_path / "tp2"
    run_ranks(_train_worker, 1, _overrides(small_corpus, off))
    run_ranks(_train_worker, 1, _overrides(small_corpus, on, **{"diagnostics.interval": 2}))
    run_ranks(_train_worker, 2, _overrides(small_corpus, tp2, **{"diagnostics.interval": 2, "parallel.tensor": 2}))
    assert losses(on) == losses(off)  # the probe never changes the trajectory: bitwise

    d1, d2 = read_diagnostics(on / "diagnostics.jsonl"), read_diagnostics(tp2 / "diagnostics.jsonl")
    assert [r["step"] for r in d1] == [1, 3, 5] == [r["step"] for r in d2]
    for rec in d1:
        for layer in map(str, range(4)):
            v = rec["layers"][layer]
            assert 0.0 < v["entropy"] <= 1.0 and 0.0 < v["max_prob"] <= 1.0
            assert len(v["entropy_per_head"]) == 4
            assert v["residual_rms"] > 0 and v["attn_write_rms"] > 0 and v["ffn_write_rms"] > 0
            assert v["dq_rel"] > 0 and v["dk_rel"] > 0
    assert all(r["layers"].keys() == d1[0]["layers"].keys() for r in d2)  # TP=2 runs the probe too
