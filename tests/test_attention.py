"""Attention backends: torch SDPA inside megatron-core's layer spec equals megatron-core's local
attention (forward and backward, MHA / GQA / TP=2, five optimizer steps), keeps dropout, and every
block mix trains in bf16 (the distributed optimizer sharded over DP=2)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from multiproc import run_ranks

MHA = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 16}
GQA = {
    **MHA,
    "num_query_groups": 2,
    "ffn": "swiglu",
    "norm": "rmsnorm",
    "bias": False,
    "position": "rope",
}


def _recipe(model: dict, backend: str, **sections):
    from megatron_harness import tiny_recipe

    return tiny_recipe(model={**model, "attention_backend": backend}, **sections)


def _forward_backward_worker(rank: int, world: int, model: dict) -> dict:
    """Logits and parameter gradients of the same weights through each backend."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from megatron_harness import VOCAB

    from slowqk.distributed import init_distributed, shutdown
    from slowqk.models import build_gpt_model, build_transformer_config

    out = {}
    ids = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).expand_as(ids)
    reference = None
    for backend in ("local", "sdpa"):
        recipe = _recipe(model, backend, parallel={"tensor": world})
        init_distributed(recipe.parallel, recipe.seed)
        net = build_gpt_model(
            recipe.model, build_transformer_config(recipe.model, tensor_parallel=world), VOCAB
        )
        if reference is not None:
            net.load_state_dict(reference.state_dict())
        reference = reference or net
        kinds = {type(m.self_attention.core_attention).__name__ for m in net.decoder.layers}
        logits = gather_from_tensor_model_parallel_region(net(ids, pos, None))
        logits.float().pow(2).mean().backward()
        out[backend] = {
            "kinds": kinds,
            "logits": logits.detach(),
            "grads": {n: p.grad.detach().clone() for n, p in net.named_parameters()},
        }
    shutdown()
    return out


@pytest.mark.parametrize(
    "world,model", [(1, MHA), (1, GQA), (2, GQA)], ids=["mha", "gqa", "gqa-tp2"]
)
def test_sdpa_equals_local_forward_and_backward(world: int, model: dict) -> None:
    for res in run_ranks(_forward_backward_worker, world, model):
        assert res["local"]["kinds"] == {"DotProductAttention"}
        assert res["sdpa"]["kinds"] == {"SDPAttention"}
        torch.testing.assert_close(
            res["sdpa"]["logits"], res["local"]["logits"], rtol=1e-5, atol=1e-5
        )
        assert res["sdpa"]["grads"].keys() == res["local"]["grads"].keys()
        for name, g in res["local"]["grads"].items():
            torch.testing.assert_close(
                res["sdpa"]["grads"][name], g, rtol=1e-5, atol=1e-5, msg=name
            )


def _train(model: dict, backend: str, precision: str, steps: int) -> list[float]:
    """Losses of ``steps`` megatron-core steps (AdamW, distributed optimizer, Q/K slowdown)."""
    from megatron.core import parallel_state
    from megatron_harness import VOCAB, build_stack, train_step

    recipe = _recipe(
        model,
        backend,
        parallel={"distributed_optimizer": True},
        train={"precision": precision},
        qk={"enabled": True, "unit": "steps", "hold": 2, "ramp": 2},
    )
    _, chunks, opt, sched, qk = build_stack(recipe)
    dp, dp_rank = (
        parallel_state.get_data_parallel_world_size(),
        parallel_state.get_data_parallel_rank(),
    )
    losses = []
    for step in range(steps):
        ids = torch.randint(
            0, VOCAB, (2 * dp, 17), generator=torch.Generator().manual_seed(step % 2)
        )
        losses.append(
            train_step(chunks, opt, sched, qk, step, ids[2 * dp_rank : 2 * dp_rank + 2])[0]
        )
    return losses


def _backends_worker(rank: int, world: int, model: dict) -> tuple[list[float], list[float]]:
    """Five steps with each backend in one process (every build starts from the same seed)."""
    from slowqk.distributed import shutdown

    losses = _train(model, "local", "fp32", 5), _train(model, "sdpa", "fp32", 5)
    shutdown()
    return losses


@pytest.mark.parametrize("model", [MHA, GQA], ids=["mha", "gqa"])
def test_sdpa_trains_like_local(model: dict) -> None:
    """Five steps of AdamW with the Q/K slowdown (distributed optimizer): the same losses."""
    local, sdpa = run_ranks(_backends_worker, 1, model)[0]
    print("local", local, "\nsdpa ", sdpa)
    assert local[-1] < local[0]  # it trains
    assert max(abs(a - b) for a, b in zip(local, sdpa, strict=True)) <= 1e-4


def _dropout_worker(rank: int, world: int) -> dict:
    from megatron_harness import VOCAB

    from slowqk.distributed import init_distributed, shutdown
    from slowqk.models import build_gpt_model, build_transformer_config

    recipe = _recipe({**GQA, "attention_dropout": 0.5}, "sdpa")
    init_distributed(recipe.parallel, recipe.seed)
    net = build_gpt_model(recipe.model, build_transformer_config(recipe.model), VOCAB)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16).expand_as(ids)
    train_a, train_b = net(ids, pos, None), net(ids, pos, None)
    net.eval()
    eval_a, eval_b = net(ids, pos, None), net(ids, pos, None)
    shutdown()
    return {
        "train_differs": not torch.equal(train_a, train_b),
        "eval_same": torch.equal(eval_a, eval_b),
        "train_vs_eval": (train_a - eval_a).abs().max().item(),
    }


def test_sdpa_applies_attention_dropout_in_training_only() -> None:
    res = run_ranks(_dropout_worker, 1)[0]
    assert res["train_differs"] and res["train_vs_eval"] > 1e-3
    assert res["eval_same"]


def test_unknown_or_unavailable_backend_is_one_clear_error() -> None:
    from slowqk.config import RecipeError, load_recipe
    from slowqk.models import resolve_attention_backend

    with pytest.raises(RecipeError, match="model.attention_backend"):
        load_recipe("tiny/gpt", ["model.attention_backend=flash"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="model.attention_backend=te needs Transformer Engine"):
            resolve_attention_backend("te")
        assert resolve_attention_backend("auto") == "sdpa"


# every block mix: ffn x norm x bias x position, GQA on the swiglu half
MIXES = [
    {
        "ffn": ffn,
        "norm": norm,
        "bias": bias,
        "position": position,
        "num_query_groups": 2 if ffn == "swiglu" else None,
    }
    for ffn, norm, bias, position in itertools.product(
        ("gelu", "swiglu"), ("layernorm", "rmsnorm"), (True, False), ("learned", "rope")
    )
]
GPT_STYLE, LLAMA_STYLE = MIXES[0], MIXES[-1]
# (tensor, pipeline, mix) on two ranks: every mix at DP=2 (optimizer state sharded), then TP=2, PP=2
LAYOUTS = [(1, 1, m) for m in MIXES] + [
    (t, p, m) for t, p in ((2, 1), (1, 2)) for m in (GPT_STYLE, LLAMA_STYLE)
]


def _bf16_worker(rank: int, world: int, dataset: str, out_dir: str) -> list[dict]:
    """Three steps of the real training loop per layout, bf16 and fp32 from the same initial
    weights."""
    from megatron.core import parallel_state

    from slowqk.config import load_recipe
    from slowqk.distributed import shutdown
    from slowqk.train import Trainer

    out = []
    for i, (tp, pp, mix) in enumerate(LAYOUTS):
        losses, dtypes = {}, {}
        # the fp32 twin for the two named blocks at every layout; the other mixes only in bf16
        for precision in ("bf16", "fp32") if mix in (GPT_STYLE, LLAMA_STYLE) else ("bf16",):
            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()  # the next layout may differ
            overrides = {
                **{f"model.{k}": v for k, v in mix.items()},
                "model.num_layers": 4,
                "model.hidden_size": 64,
                "model.num_attention_heads": 4,
                "model.seq_length": 32,
                "parallel.tensor": tp,
                "parallel.pipeline": pp,
                "parallel.distributed_optimizer": True,
                "train.precision": precision,
                "train.micro_batch_size": 2,
                "train.global_batch_size": 8,
                "train.steps": 3,
                "train.tensorboard": False,
                "train.progress_bar": False,
                "optimizer.warmup_steps": 0,
                "data.corpus": None,
                "data.dataset": dataset,
                "out_dir": f"{out_dir}/{i}-{precision}",
                "qk.enabled": True,
                "qk.unit": "steps",
                "qk.hold": 1,
                "qk.ramp": 1,
            }
            trainer = Trainer(
                load_recipe(
                    "tiny/gpt", [f"{k}={'null' if v is None else v}" for k, v in overrides.items()]
                ),
                quiet=True,
            )
            losses[precision] = [trainer.train_step()["loss"] for _ in range(3)]
            dtypes[precision] = {p.dtype for p in trainer.chunks[0].module.parameters()}
            trainer.metrics.close()
        out.append({"layout": (tp, pp, mix), "losses": losses, "dtypes": dtypes})

    shutdown()
    return out


def test_every_block_mix_trains_in_bf16(small_dataset, tmp_path) -> None:
    """The training loop in bf16 for 16 block mixes at DP=2 with the distributed optimizer, and the
    GPT and LLaMA blocks at TP=2 and PP=2: every parameter bf16, losses finite and falling; for the
    GPT and LLaMA blocks within bf16 rounding (2%) of the fp32 run from the same initial weights."""
    for res in run_ranks(_bf16_worker, 2, small_dataset, str(tmp_path))[0]:
        tp, pp, mix = res["layout"]
        name = f"tp{tp}/pp{pp}/" + "/".join(
            str(mix[k]) for k in ("ffn", "norm", "bias", "position")
        )
        bf16 = res["losses"]["bf16"]
        assert res["dtypes"]["bf16"] == {torch.bfloat16}, name
        assert all(map(math.isfinite, bf16)) and bf16[-1] < bf16[0], (name, bf16)
        if "fp32" in res["losses"]:
            fp32 = res["losses"]["fp32"]
            assert res["dtypes"]["fp32"] == {torch.float32}, name
            assert max(abs(a - b) / b for a, b in zip(bf16, fp32, strict=True)) < 0.02, (
                name,
                bf16,
                fp32,
            )


def test_probe_records_explicit_attention_in_front_of_any_backend() -> None:
    """What a probe does on a fused backend (TE's class cannot be built on CPU): while recording,
    the backend's forward is bypassed for the explicit computation; otherwise it runs untouched."""
    from slowqk.attention import explicit_attention
    from slowqk.probe import ProbeMixin, probed

    class FusedKernel(
        torch.nn.Module
    ):  # stands in for TEDotProductAttention: keeps no probabilities
        softmax_scale = 0.5

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, *args, **kwargs):
            return torch.zeros(query.shape[0], query.shape[1], query.shape[2] * query.shape[3])

    from megatron.core.transformer.enums import AttnMaskType

    core = probed(FusedKernel)()
    core.attn_mask_type = AttnMaskType.causal
    assert isinstance(core, ProbeMixin) and probed(FusedKernel) is type(core)
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(5, 2, 4, 8, generator=g),
        torch.randn(5, 2, 2, 8, generator=g),
        torch.randn(5, 2, 2, 8, generator=g),
    )
    assert not core(q, k, v, None).any()  # not recording: the backend's own forward
    core.record = True
    out = core(q, k, v, None)
    expected, probs = explicit_attention(q, k, v, None, causal=True, scale=0.5)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(core.probs, probs)
    assert core.probs.shape == (2, 4, 5, 5) and core.probs[..., 0, 1:].abs().max() == 0  # causal
    torch.testing.assert_close(core.probs.sum(-1), torch.ones(2, 4, 5))


def _bf16_accuracy_worker(rank: int, world: int, model: dict, seq: int) -> dict:
    """Max |logits - fp32 reference| of local and SDPA attention run in bf16 on the same weights."""
    from megatron_harness import VOCAB

    from slowqk.distributed import init_distributed, shutdown
    from slowqk.models import build_gpt_model, build_transformer_config, wrap_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = {**model, "seq_length": seq}
    ids = torch.randint(0, VOCAB, (2, seq), generator=torch.Generator().manual_seed(0)).to(device)
    pos = torch.arange(seq, device=device).expand_as(ids)
    init_distributed(_recipe(model, "local").parallel, 1234)
    reference = build_gpt_model(
        _recipe(model, "local").model,
        build_transformer_config(_recipe(model, "local").model),
        VOCAB,
    ).to(device)
    exact = reference(ids, pos, None).float()
    errors = {}
    for backend in ("local", "sdpa"):
        recipe = _recipe(model, backend, train={"precision": "bf16"})
        cfg = build_transformer_config(recipe.model, precision="bf16")
        net = build_gpt_model(recipe.model, cfg, VOCAB).to(device)
        net.load_state_dict(reference.state_dict())
        errors[backend] = (
            (wrap_precision(net, cfg)(ids, pos, None).float() - exact).abs().max().item()
        )
    shutdown()
    return {"errors": errors, "scale": exact.abs().max().item()}


def test_sdpa_in_bf16_is_as_accurate_as_local() -> None:
    """bf16 cannot be compared to 1e-5: both backends round Q, K, V and the context to 8 mantissa
    bits, in different orders. The claim that holds is relative: against the fp32 model on the same
    weights, SDPA in bf16 is no less accurate than megatron-core's local attention in bf16 (within
    1.5x, plus a bf16 ulp of the logits' scale), and both are within 5% of that scale."""
    res = run_ranks(_bf16_accuracy_worker, 1, GQA, 64)[0]
    err, scale = res["errors"], res["scale"]
    print(res)
    assert err["sdpa"] <= 1.5 * err["local"] + scale * 2**-8
    assert max(err.values()) < 0.05 * scale
