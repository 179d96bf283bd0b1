"""Model-building helpers that need no process group."""

from __future__ import annotations

import pytest

from slowqk.config import load_recipe
from slowqk.models import padded_vocab_size


@pytest.mark.parametrize(
    "vocab, tp, want",
    [
        (384, 1, 384),
        (384, 2, 384),
        (400, 1, 512),
        (400, 2, 512),
        (400, 8, 512),
        (400, 3, 768),
        (512, 256, 512),
    ],
)
def test_vocab_padding_is_the_same_for_tp_sizes_that_divide_the_multiple(vocab, tp, want) -> None:
    got = padded_vocab_size(vocab, 128, tp)
    assert got == want and got % tp == 0 and got >= vocab


def test_architecture_ignores_what_does_not_change_the_weights() -> None:
    from slowqk.config import architecture

    base = load_recipe("tiny/llama").model
    longer = load_recipe(
        "tiny/llama", ["model.seq_length=512", "model.ffn_hidden_size=" + str(base.ffn_size)]
    ).model
    assert architecture(base) == architecture(longer)  # RoPE: no weights depend on the length
    gpt = load_recipe("tiny/gpt").model
    assert architecture(gpt) != architecture(load_recipe("tiny/gpt", ["model.seq_length=64"]).model)
    assert architecture(base) != architecture(
        load_recipe("tiny/llama", ["model.num_query_groups=4"]).model
    )
