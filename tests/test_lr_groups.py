"""Learning-rate groups from a recipe: refusals, what print-recipe counts, and that the ``qk:``
section is the same mechanism (bitwise equal to the same two groups written as ``lr_groups``).
Exactness against separate param groups: test_lr_group_exactness.py, test_lr_group_rows.py."""

from __future__ import annotations

import json

import pytest
from conftest import small_run_overrides
from multiproc import run_cli, run_ranks

from slowqk.config import RecipeError, load_recipe

LLAMA = ["model.ffn=swiglu", "model.norm=rmsnorm", "model.bias=false", "model.position=rope"]


@pytest.mark.parametrize(
    "groups, extra, message",
    [
        (
            "[{params: [vv], mult: 0.5}]",
            [],
            "key 'lr_groups.0.params.0': got 'vv'; expected 'q', 'k'",
        ),
        (
            "[{params: [gate], mult: 0.5}]",
            [],
            "key 'lr_groups.0.params': got 'gate'; model.ffn=gelu has no gated FFN",
        ),
        (
            "[{params: v, layers: {indices: [7]}, mult: 0.5}]",
            [],
            "key 'lr_groups.0.layers': layer indices [7] out of range",
        ),
        (
            "[{params: v, layers: {top: 9}, mult: 0.5}]",
            [],
            "key 'lr_groups.0.layers': top=9 must be between 1",
        ),
        (
            "[{params: v, mult: -1}]",
            [],
            "key 'lr_groups.0.mult': got -1; expected greater than or equal to 0",
        ),
        (
            "[{params: [fc1, v], layers: {top: 2}, mult: 0.5}, {params: [o, v], layers: {indices: "
            "[1, 2]}, mult: 2}]",
            [],
            "key 'lr_groups.1': 'o+v@1-2' overlaps lr_groups.0 ('fc1+v@2-3') on v@2",
        ),
        (
            "[{params: [q], layers: {top: 1}, mult: 0.5}]",
            ["qk.enabled=true"],
            "key 'lr_groups.0': 'q@3' overlaps qk ('qk') on q@3",
        ),
        (
            "[{params: [gate], mult: 0.5}, {params: [fc1], layers: {indices: [0]}, mult: 2}]",
            LLAMA,
            "key 'lr_groups.1': 'fc1@0' overlaps lr_groups.0 ('gate') on gate@0",
        ),
        (
            "[{params: [fc1, up], mult: 0.5}]",
            LLAMA,
            "key 'lr_groups.0.params': got ['fc1', 'up']; each element once",
        ),
        (
            "[{params: output, mult: 0.5}]",
            [],
            "key 'lr_groups.0.params': got 'output'; with model.tie_embeddings=true",
        ),
        (
            "[{params: v, mult: 0.5, ramp: 0.1}]",
            [],
            "key 'lr_groups.0.ramp': got 0.1 without a hold",
        ),
        (
            "[{params: v, mult: 0.5, hold: 0.9, ramp: 0.2}]",
            [],
            "key 'lr_groups.0.hold': hold + ramp = 0.9 + 0.2",
        ),
        (
            "[{params: v, mult: 0.5, unit: steps, hold: 2.5}]",
            [],
            "key 'lr_groups.0.hold': got 2.5; a length in steps",
        ),
        (
            "[{params: v, mult: 0.5}, {params: o, mult: 2, name: v}]",
            [],
            "key 'lr_groups.1.name': 'v' is also the name",
        ),
    ],
)
def test_bad_groups_are_refused_naming_the_entry_and_key(groups, extra, message) -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe("tiny/gpt", [*extra, f"lr_groups={groups}"])
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_bad_group_is_one_line_and_exit_2_on_the_command_line(tmp_path) -> None:
    proc = run_cli(
        ["print-recipe", "tiny/gpt", "lr_groups=[{params: [gate], mult: 0.5}]"], cwd=tmp_path
    )
    assert (
        proc.returncode == 2
        and "Traceback" not in proc.stderr
        and len(proc.stderr.strip().splitlines()) == 1
    )
    assert "lr_groups.0.params" in proc.stderr


def test_print_recipe_counts_each_groups_elements_per_layer() -> None:
    from slowqk.cli import _group_elements_comment

    groups = (
        "[{params: [v, o], layers: {top: 2}, mult: 0.25},"
        " {params: [gate, norm], layers: {indices: [0]}, mult: 2}]"
    )
    recipe = load_recipe("tiny/llama", ["qk.enabled=true", f"lr_groups={groups}"])
    text = _group_elements_comment(recipe)
    h, f = recipe.model.hidden_size, recipe.model.ffn_size
    kv = (recipe.model.num_query_groups or recipe.model.num_attention_heads) * (
        h // recipe.model.num_attention_heads
    )
    assert f"#   qk: layer 2: {h * h + kv * h:,}, layer 3: {h * h + kv * h:,}" in text
    assert f"#   v+o@2-3: layer 2: {kv * h + h * h:,}," in text
    assert f"#   gate+norm@0: layer 0: {f * h + 2 * h:,} (total" in text  # RMSNorm: weights only


def _train(rank: int, world: int, overrides: list[str]) -> dict:
    from slowqk.train import train

    return train(load_recipe("tiny/gpt", overrides), quiet=True)


def test_qk_section_trains_bitwise_as_the_same_two_groups(small_dataset, tmp_path) -> None:
    """``qk:`` (mult_q 0.25, mult_k 0.5, hold 2, ramp 2 steps) and ``lr_groups`` entries for the
    same
    rows on the same schedule: every step's loss, grad norm and multiplier equal; records and
    summaries name the groups."""
    from slowqk.metrics import read_metrics
    from slowqk.summary import groups_cell

    fixed = {"qk.release": "fixed", "qk.hold": 2, "qk.mult_k": 0.5, "model.num_query_groups": 2}
    qk = small_run_overrides(small_dataset, tmp_path / "qk", **fixed)
    groups = (
        "[{params: q, layers: {top_fraction: 0.5}, mult: 0.25, unit: steps, hold: 2, ramp: 2, "
        "name: Q}, {params: k, layers: {top_fraction: 0.5}, mult: 0.5, unit: steps, hold: 2, ramp: "
        "2, name: K}]"
    )
    as_groups = small_run_overrides(
        small_dataset, tmp_path / "groups", **fixed, **{"qk.enabled": "false", "lr_groups": groups}
    )
    summaries = {
        name: run_ranks(_train, 2, o)[0] for name, o in (("qk", qk), ("groups", as_groups))
    }
    recs = {name: read_metrics(tmp_path / name / "metrics.jsonl") for name in summaries}
    assert [(r["loss"], r["grad_norm"]) for r in recs["qk"]] == [
        (r["loss"], r["grad_norm"]) for r in recs["groups"]
    ]
    assert (
        [r["mult_q"] for r in recs["qk"]]
        == [r["lr_mult"]["Q"] for r in recs["groups"]]
        == [0.25, 0.25, 0.5, 0.75, 1.0, 1.0]
    )
    assert [r["mult_k"] for r in recs["qk"]] == [r["lr_mult"]["K"] for r in recs["groups"]]
    assert "lr_mult" not in recs["qk"][0] and recs["groups"][0]["mult_q"] == 1.0
    assert summaries["groups"]["lr_groups"][0] == {
        "name": "Q",
        "params": ["q"],
        "layers": [1],
        "mult": 0.25,
        "rule": "schedule",
        "hold_steps": 2,
        "ramp_steps": 2,
        "shape": "linear",
    }
    assert summaries["groups"]["lr_groups_seconds"] > 0
    written = json.loads((tmp_path / "groups" / "summary.json").read_text())
    assert groups_cell(written) == "Q x0.25 (hold 2, ramp 2); K x0.5 (hold 2, ramp 2)"
