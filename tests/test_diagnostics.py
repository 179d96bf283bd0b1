"""Attention-specialization estimators against analytic values."""

from __future__ import annotations

import json
import math

import pytest
import torch

from slowqk.diagnostics import attention_entropy, attention_max_prob, qk_relative_update
from slowqk.lr_groups.rows import FusedQKVLayout


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
    ids = torch.randint(
        0, VOCAB, (2, recipe.model.seq_length), generator=torch.Generator().manual_seed(3)
    )
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    probs = attention_probs(model, ids, pos)
    stats = probe_stats(model, ids, pos)
    ref = ReferenceGPT(recipe.model, VOCAB)
    ref.load_megatron(gather_full_state(model, recipe.model.ffn == "swiglu"))
    ref(ids)
    worst = max((probs[i] - blk.last_probs).abs().max().item() for i, blk in enumerate(ref.blocks))
    entropy = {i: attention_entropy(p).tolist() for i, p in probs.items()}
    shutdown()
    return {
        "worst": worst,
        "same_keys": set(model.state_dict()) == plain_keys,
        "entropy": entropy,
        "shape": tuple(probs[0].shape),
        "stats": stats,
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "tp,model",
    [
        (1, {"attention_backend": "local"}),
        (2, {"num_query_groups": 2, "position": "rope", "attention_backend": "sdpa"}),
        (1, {"qk_norm": True}),
    ],
    ids=["tp1-mha-local", "tp2-gqa-rope-sdpa", "tp1-qk-norm"],
)
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
            torch.testing.assert_close(
                torch.tensor(tp2[layer][key]), torch.tensor(x), rtol=1e-5, atol=1e-7
            )


def _train_worker(rank: int, world: int, overrides: list[str]) -> dict:
    from slowqk.config import load_recipe
    from slowqk.train import train

    return train(load_recipe("tiny/gpt", overrides), quiet=True)


def _overrides(dataset, run_dir, **extra) -> list[str]:
    base = {
        "out_dir": str(run_dir),
        "data.corpus": "null",
        "data.dataset": str(dataset),
        "model.num_layers": 4,
        "model.hidden_size": 64,
        "model.num_attention_heads": 4,
        "model.seq_length": 32,
        "train.steps": 6,
        "train.micro_batch_size": 2,
        "train.global_batch_size": 4,
        "train.log_interval": 1,
        "train.eval_interval": 3,
        "train.eval_iters": 1,
        "train.progress_bar": "false",
        "train.tensorboard": "false",
        "qk.enabled": "true",
        "qk.unit": "steps",
        "qk.hold": 3,
        "qk.ramp": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


RELEASE = (
    3  # the adaptive release settles here in these runs: lower-layer drift ratios 1, 0.85, 0.74
)


@pytest.mark.slow
def test_diagnostics_do_not_change_training(small_dataset, tmp_path) -> None:
    """The probe leaves training bitwise unchanged; every layout measures the same statistics and
    the
    same lower-layer drift, and makes the same adaptive release decision (from a checkpoint taken
    before it was made)."""
    from multiproc import run_ranks

    from slowqk.metrics import read_metrics
    from slowqk.monitor import read_diagnostics

    def losses(run):
        return [
            (r["step"], r["loss"], r.get("val_loss")) for r in read_metrics(run / "metrics.jsonl")
        ]

    off, on = tmp_path / "off", tmp_path / "on"
    common = {
        "diagnostics.interval": 2,
        "parallel.distributed_optimizer": "true",
        "train.save_interval": 2,
        "train.keep_last": 5,
        "qk.release": "adaptive",
        "qk.adaptive.min_hold": 1,
        "qk.adaptive.max_hold": 5,
        "qk.adaptive.threshold": 0.8,
    }
    run_ranks(
        _train_worker, 1, _overrides(small_dataset, off, **{**common, "diagnostics.interval": 0})
    )
    run_ranks(_train_worker, 1, _overrides(small_dataset, on, **common))
    assert losses(on) == losses(off)  # the probe never changes the trajectory: bitwise
    release = json.loads((on / "summary.json").read_text())["qk_release"]
    assert (release["step"], release["reason"]) == (RELEASE, "settled"), release
    drift_on = {
        r["step"]: r["lower_drift"]
        for r in read_metrics(on / "metrics.jsonl")
        if "lower_drift" in r
    }

    d1 = read_diagnostics(on / "diagnostics.jsonl")
    assert [r["step"] for r in d1] == [1, 3, 5]
    for rec in d1:
        for layer in map(str, range(4)):
            v = rec["layers"][layer]
            assert 0.0 < v["entropy"] <= 1.0 and 0.0 < v["max_prob"] <= 1.0
            assert len(v["entropy_per_head"]) == 4
            assert v["residual_rms"] > 0 and v["attn_write_rms"] > 0 and v["ffn_write_rms"] > 0
            assert v["dq_rel"] > 0 and v["dk_rel"] > 0
            assert v["grad_norm"] > 0 and v["lambda_q"] > 0 and v["lambda_k"] > 0
        assert rec["layers"]["0"]["pathway_energy"] == 0.0 < rec["layers"]["3"]["pathway_energy"]

    # Every layout measures the same thing on the same weights (resumed from the step-2 checkpoint):
    # sums over TP shards, distributed-optimizer shards and pipeline stages. The trajectories
    # differ only by reduction order, hence the tolerance.
    from test_training import _resume_copy

    layouts = {
        "tp2": {"parallel.tensor": 2},
        "pp2": {"parallel.pipeline": 2},
        "dp2_distopt": {},
    }
    keys = (
        "entropy",
        "max_prob",
        "residual_rms",
        "ffn_write_rms",
        "dq_rel",
        "dk_rel",
        "grad_norm",
        "lambda_q",
        "lambda_k",
        "pathway_energy",
    )
    bad = []
    for name, extra in layouts.items():
        _resume_copy(on, tmp_path / name, 2)
        run_ranks(_train_worker, 2, _overrides(small_dataset, tmp_path / name, **common, **extra))
        release = json.loads((tmp_path / name / "summary.json").read_text())["qk_release"]
        assert (release["step"], release["reason"]) == (RELEASE, "settled"), (name, release)
        drift = {
            r["step"]: r["lower_drift"]
            for r in read_metrics(tmp_path / name / "metrics.jsonl")
            if "lower_drift" in r
        }
        assert drift == pytest.approx({s: x for s, x in drift_on.items() if s > 2}, rel=1e-4), name
        d2 = read_diagnostics(tmp_path / name / "diagnostics.jsonl")
        assert [r["step"] for r in d2] == [3, 5], name
        for r1, r2 in zip(d1[1:], d2, strict=True):
            for layer, v in r1["layers"].items():
                for k in keys:
                    got = r2["layers"][layer][k]
                    if abs(got - v[k]) > 1e-4 * abs(v[k]) + 1e-7:
                        bad.append((name, r1["step"], layer, k, got, v[k]))
    assert not bad, "\n".join(map(str, bad))


def test_logit_change_estimators_match_separate_q_k_logits() -> None:
    """lambda_Q / lambda_K against logits built from separate per-head Q and K matrices."""
    from slowqk.diagnostics import qk_logit_change_sums

    g = torch.Generator().manual_seed(5)
    layout = FusedQKVLayout(num_query_groups=2, heads_per_group=2, head_dim=3)
    hidden, seq = 6, 5
    x = torch.randn(seq, 2, hidden, generator=g, dtype=torch.float64)
    w0 = torch.randn(layout.total_rows, hidden, generator=g, dtype=torch.float64)
    b0 = torch.randn(layout.total_rows, generator=g, dtype=torch.float64)
    w1, b1 = w0 + 0.1 * torch.randn_like(w0), b0 + 0.1 * torch.randn_like(b0)

    def logits(kind_q, kind_k):  # S[b, head, i, j] from separate Q, K rows, causal pairs only
        out = []
        for head in range(4):
            group, h = divmod(head, 2)
            qa = layout.global_rows("q")[group][0] + h * 3
            ka = layout.global_rows("k")[group][0]
            q = x @ kind_q[0][qa : qa + 3].T + kind_q[1][qa : qa + 3]
            k = x @ kind_k[0][ka : ka + 3].T + kind_k[1][ka : ka + 3]
            out.append(torch.einsum("sbd,tbd->bst", q, k))
        return torch.stack(out, 1).tril()

    s = logits((w0, b0), (w0, b0))
    dq = logits((w1, b1), (w0, b0)) - s  # S is linear in Q: the exact Q-side change
    dk = logits((w0, b0), (w1, b1)) - s
    got = qk_logit_change_sums(x, w0, w1, b0, b1, heads_per_group=2, head_dim=3)
    want = (dq.pow(2).sum().item(), dk.pow(2).sum().item(), s.pow(2).sum().item())
    assert got == pytest.approx(want, rel=1e-10)
    # TP: each rank's query groups give partial sums that add up to the whole
    rows = layout.rows_per_group
    halves = [
        qk_logit_change_sums(
            x,
            w0[i * rows : (i + 1) * rows],
            w1[i * rows : (i + 1) * rows],
            b0[i * rows : (i + 1) * rows],
            b1[i * rows : (i + 1) * rows],
            heads_per_group=2,
            head_dim=3,
        )
        for i in range(2)
    ]
    assert [a + b for a, b in zip(*halves, strict=True)] == pytest.approx(list(got), rel=1e-10)
    with pytest.raises(ValueError, match="fused QKV"):
        qk_logit_change_sums(x, w0[:-1], w1[:-1], None, None, heads_per_group=2, head_dim=3)


def test_pathway_energy_ratio_by_hand() -> None:
    from slowqk.diagnostics import pathway_energy_ratio

    # FFN writes of RMS 1, 2, 3 into a stream of RMS 1, 2, 4, 5 entering layers 0..3
    got = pathway_energy_ratio({0: 1.0, 1: 2.0, 2: 3.0, 3: 9.0}, {0: 1.0, 1: 2.0, 2: 4.0, 3: 5.0})
    assert got == pytest.approx({0: 0.0, 1: 1 / 4, 2: 5 / 16, 3: 14 / 25})


def test_probe_steps_and_specialization_steps_by_hand() -> None:
    from slowqk.qk.specialization import SpecializationSteps, probe_steps

    assert sorted(probe_steps(50, True, [3])) == [1, 2, 3, 4, 8, 16, 32]
    assert probe_steps(50, False, []) == frozenset()
    spec = SpecializationSteps([0.9, 0.5], upper=[2, 3], lower=[0, 1])
    spec.update(1, {0: 0.99, 1: 0.97, 2: 0.89, 3: 0.95})
    spec.update(2, {0: 0.95, 1: 0.93, 2: 0.7, 3: 0.85})
    assert spec.gap(0.9) is None  # the lower layers have not crossed yet
    spec.update(4, {0: 0.88, 1: 0.6, 2: 0.4, 3: 0.8})
    spec.update(8, {0: 0.45, 1: 0.6, 2: 0.3, 3: 0.7})
    rec = spec.record(4)
    assert rec["steps"]["0.9"] == [4, 4, 1, 2] and rec["steps"]["0.5"] == [8, None, 4, None]
    assert rec["upper_minus_lower"]["0.9"] == 1.5 - 4.0  # the upper layers first, by 2.5 steps
    # at 0.5 layers 1 and 3 never crossed: counted at the last probe (8)
    assert rec["upper_minus_lower"]["0.5"] is None and rec["uncrossed"]["0.5"] == 2
    assert rec["upper_minus_lower_censored"]["0.5"] == (4 + 8) / 2 - (8 + 8) / 2
    assert rec["last_probe"] == 8
    again = SpecializationSteps([0.9, 0.5], upper=[2, 3], lower=[0, 1])
    again.load_state_dict(spec.state_dict())
    assert again.record(4) == rec


@pytest.mark.slow
def test_log_spaced_probes_record_each_layer_s_specialization_step(small_dataset, tmp_path) -> None:
    from multiproc import run_ranks
    from test_release import _overrides, _train

    from slowqk.metrics import read_metrics

    out = tmp_path / "run"
    extra = {
        "diagnostics.interval": 6,
        "diagnostics.log_spaced": "true",
        "diagnostics.steps": "[5]",
        "diagnostics.specialization_thresholds": "[0.999, 0.99]",
        "train.steps": 12,
    }
    run_ranks(_train, 1, _overrides(small_dataset, out, **extra))
    probed = [r["step"] for r in read_metrics(out / "diagnostics.jsonl")]
    assert probed == [1, 2, 4, 5, 7]  # every 6th (1, 7) besides the early and named ones
    spec = json.loads((out / "summary.json").read_text())["specialization"]
    entropy = {r["step"]: r["layers"] for r in read_metrics(out / "diagnostics.jsonl")}
    for t in ("0.999", "0.99"):
        for layer, step in enumerate(spec["steps"][t]):  # the first probe below t, from the records
            below = [s for s in probed if entropy[s][str(layer)]["entropy"] < float(t)]
            assert step == (below[0] if below else None), (t, layer)
