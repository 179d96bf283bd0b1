"""Experiment grids (expansion, skipping, sweeps) and the summary statistics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from slowqk.cli import main as reproduce_main
from slowqk.config import RecipeError
from slowqk.experiments import expand, load_grid, run_grid
from slowqk.summary import RunResult, paired_interval, summarize, write_summary


def _grid_file(tmp_path: Path, **extra) -> Path:
    grid = {
        "name": "g",
        "out_dir": str(tmp_path / "out"),
        "seeds": [1, 2],
        "arms": {"control": {"qk.enabled": False}, "slowqk": {"qk.enabled": True}},
        "variants": {
            "gpt": {"recipe": "tiny/gpt"},
            "llama": {"recipe": "tiny/llama", "seeds": [7]},
        },
    }
    grid.update(extra)
    path = tmp_path / "grid.json"  # JSON is YAML
    path.write_text(json.dumps(grid))
    return path


def test_paired_interval_matches_a_hand_computed_example() -> None:
    # differences 0.1, 0.2, 0.3: mean 0.2, sd 0.1, t(0.975, df=2) = 4.302653, se = 0.1 / sqrt(3)
    ci = paired_interval([0.1, 0.2, 0.3])
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # = 0.2484138
    assert (ci.n, ci.mean, ci.std) == (3, pytest.approx(0.2), pytest.approx(0.1))
    assert ci.low == pytest.approx(0.2 - half, abs=1e-9) and ci.high == pytest.approx(
        0.2 + half, abs=1e-9
    )
    assert ci.low == pytest.approx(-0.0484138, abs=1e-7)
    one = paired_interval([0.5])
    assert one.mean == 0.5 and math.isnan(one.low) and math.isnan(one.high)
    with pytest.raises(ValueError, match="no paired runs"):
        paired_interval([])


def test_summary_pairs_by_seed_and_only_common_seeds() -> None:
    def run(arm, seed, loss):
        return RunResult("gpt", arm, seed, Path("."), loss, [(10, loss)])

    results = [
        run("control", 1, 3.0),
        run("control", 2, 3.2),
        run("control", 3, 3.4),
        run("slowqk", 2, 3.1),
        run("slowqk", 3, 3.2),
        run("slowqk", 9, 1.0),
    ]
    s = summarize({"control": "control"}, results)
    (pair,) = s["pairs"]
    assert pair["seeds"] == [2, 3]
    assert pair["val_loss_diff"] == pytest.approx([-0.1, -0.2])
    assert pair["mean"] == pytest.approx(-0.15)
    rows = {r["arm"]: r for r in s["rows"]}
    assert rows["control"]["n"] == 3 and rows["control"]["val_loss_mean"] == pytest.approx(3.2)
    assert rows["control"]["val_loss_std"] == pytest.approx(0.2)


def test_grid_expansion_sweeps_non_control_arms(tmp_path) -> None:
    grid = load_grid(_grid_file(tmp_path), ["train.steps=5", "qk.mult_q=[0.1,0.5]"])
    runs = expand(grid)
    names = sorted({(r.variant, r.arm) for r in runs})
    assert names == [
        ("gpt", "control"),
        ("gpt", "slowqk[mult_q=0.1]"),
        ("gpt", "slowqk[mult_q=0.5]"),
        ("llama", "control"),
        ("llama", "slowqk[mult_q=0.1]"),
        ("llama", "slowqk[mult_q=0.5]"),
    ]
    assert len(runs) == 3 * 2 + 3 * 1  # llama uses its own seed list
    r = next(x for x in runs if x.arm == "slowqk[mult_q=0.5]" and x.seed == 2)
    assert {"train.steps=5", "qk.mult_q=0.5", "qk.enabled=true", "seed=2"} <= set(r.overrides)
    assert r.run_dir == str(tmp_path / "out" / "gpt" / "slowqk[mult_q=0.5]" / "seed2")


@pytest.mark.parametrize(
    "extra, cli, match",
    [
        ({"control": "baseline"}, [], "control arm 'baseline' is not among arms"),
        ({}, ["train.stepz=3"], "run gpt/control/seed1: .*stepz"),
        ({"seeds": []}, [], "key 'seeds'"),
        ({}, ["qk.mult_q=[]"], "sweep 'qk.mult_q' has no values"),
    ],
)
def test_bad_grids_name_the_problem(tmp_path, extra, cli, match) -> None:
    with pytest.raises(RecipeError, match=match):
        expand(load_grid(_grid_file(tmp_path, **extra), cli))


def test_holm_and_bonferroni_match_a_hand_computed_example() -> None:
    from slowqk.summary import adjusted_p_values, paired_p_value

    p = [0.01, 0.04, 0.03, 0.005]
    # Holm: sorted 0.005 (x4), 0.01 (x3), 0.03 (x2), 0.04 (x1), each at least the one before
    assert adjusted_p_values(p, "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert adjusted_p_values(p, "bonferroni") == pytest.approx([0.04, 0.16, 0.12, 0.02])
    assert adjusted_p_values([0.4, 0.6], "holm") == pytest.approx(
        [0.8, 0.8]
    )  # capped by monotonicity
    # differences 0.1, 0.2, 0.3: t = 0.2 / (0.1 / sqrt 3) = 3.4641, df 2 -> two-sided p = 0.074180
    assert paired_p_value([0.1, 0.2, 0.3]) == pytest.approx(0.0741799, abs=1e-6)
    assert paired_p_value([0.2, 0.2]) == 0.0 and math.isnan(paired_p_value([0.2]))


def test_contrasts_pair_any_two_cells_and_correct_within_their_family(tmp_path) -> None:
    def run(variant, arm, seed, loss):
        return RunResult(variant, arm, seed, Path("."), loss, [(10, loss)])

    results = [run("a", "control", k, 3.0 + 0.01 * k) for k in (1, 2, 3, 4)]
    results += [
        run("a", "slow", k, 2.9 + 0.01 * k + 0.001 * (k % 2)) for k in (1, 2, 3, 4)
    ]  # ~ -0.1 every seed
    results += [
        run("b", "other", k, 3.0 + 0.01 * k + 0.02 * (-1) ** k) for k in (2, 3, 4, 5)
    ]  # noise around 0
    grid = {
        "control": "control",
        "correction": "holm",
        "contrasts": [
            {"name": "slow", "arm": "a/slow", "minus": "a/control", "family": "main"},
            {"name": "slow-vs-other", "arm": "a/slow", "minus": "b/other", "family": "main"},
            {"name": "other", "arm": "b/other", "minus": "a/control", "family": "extra"},
            {
                "name": "interaction",
                "arm": "a/slow",
                "minus": "a/control",
                "versus": {"arm": "b/other", "minus": "a/control"},
                "family": "extra2",
            },
        ],
    }
    got = {c["name"]: c for c in summarize(grid, results)["contrasts"]}
    # (slow - control) - (other - control) = slow - other, seed by seed, over the seeds all ran
    assert got["interaction"]["seeds"] == [2, 3, 4]
    assert got["interaction"]["val_loss_diff"] == pytest.approx(
        got["slow-vs-other"]["val_loss_diff"]
    )
    assert got["slow"]["seeds"] == [1, 2, 3, 4] and got["slow-vs-other"]["seeds"] == [2, 3, 4]
    assert got["slow"]["mean"] == pytest.approx(-0.0995)
    assert (
        got["slow"]["p_adjusted"] == pytest.approx(2 * got["slow"]["p"]) and got["slow"]["survives"]
    )
    assert got["other"]["family_size"] == 1 and got["other"]["p_adjusted"] == got["other"]["p"]
    assert not got["other"]["survives"]
    # the Bonferroni interval of a family of 2 is the 97.5% one: wider than the 95% one
    lo, hi = got["slow"]["ci_adjusted"]
    assert lo < got["slow"]["ci95"][0] and hi > got["slow"]["ci95"][1]
    from slowqk.summary import format_markdown, plot_contrasts

    summary = summarize(grid, results)
    text = format_markdown(dict(summary, provenance=None))
    assert "| main | slow | a/slow - a/control | 4 | -0.0995" in text
    assert plot_contrasts(summary, tmp_path / "contrasts.png").stat().st_size > 1000


def test_variants_without_control_only_listed_and_bad_contrasts(tmp_path, capsys) -> None:
    variants = {
        "gpt": {"recipe": "tiny/gpt", "arms": []},
        "more": {"recipe": "tiny/gpt", "control": False, "arms": ["slowqk"], "seeds": [1]},
    }
    contrasts = [{"name": "x", "arm": "more/slowqk", "minus": "gpt/control"}]
    grid = load_grid(_grid_file(tmp_path, variants=variants, contrasts=contrasts))
    assert sorted((r.variant, r.arm, r.seed) for r in expand(grid)) == [
        ("gpt", "control", 1),
        ("gpt", "control", 2),
        ("more", "slowqk", 1),
    ]
    assert [r.variant for r in expand(grid, ["more"])] == ["more"]
    with pytest.raises(RecipeError, match=r"--only \['gpu'\]"):
        expand(grid, ["gpu"])
    assert run_grid(grid, dry_run=True, only=["more"]) == 0
    assert "3 runs, 0 finished, 1 to run (variants more)" in capsys.readouterr().out
    bad = [{"name": "x", "arm": "more/control", "minus": "gpt/control"}]  # `more` runs no control
    with pytest.raises(RecipeError, match=r"contrasts.0.arm': 'more/control' is no variant/arm"):
        load_grid(_grid_file(tmp_path, variants=variants, contrasts=bad))
    with pytest.raises(RecipeError, match="used twice"):
        load_grid(_grid_file(tmp_path, variants=variants, contrasts=contrasts * 2))


def test_the_specificity_grid_is_what_its_comments_say() -> None:
    from collections import Counter

    from conftest import REPO

    grid = load_grid(REPO / "recipes" / "study" / "specificity.yaml")
    runs = expand(grid)
    assert len(runs) == 75
    per_cell = Counter((r.variant, r.arm) for r in runs)
    for arm in ("control", "slowdown", "lower-qk", "upper-v"):
        assert per_cell[("gpt", arm)] == 8  # the three main contrasts
    assert all(
        n >= 5
        for cell, n in per_cell.items()
        if not cell[0].startswith("warmup") or cell[0] == "warmup10"
    )
    families = Counter(c.family for c in grid.contrasts)
    assert families == {"confirmatory": 8, "descriptive": 3} and grid.correction == "holm"


def test_a_grid_reads_one_dataset_unless_it_says_otherwise(tmp_path, capsys) -> None:
    variants = {
        "gpt": {"recipe": "tiny/gpt"},
        "big": {"recipe": "tiny/gpt", "overrides": {"data.tokenizer_vocab_size": 1024}},
    }
    path = _grid_file(tmp_path, variants=variants)
    for command in ("run", "submit"):  # refused before anything runs or is submitted
        assert reproduce_main(["experiment", command, str(path), "--dry-run"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "runs read different data" in err, err
        assert "gpt/control/seed1 has data.tokenizer_vocab_size=2048" in err
        assert "big/control/seed1 has data.tokenizer_vocab_size=1024" in err
    assert not (tmp_path / "out").exists()
    path = _grid_file(tmp_path, variants=variants, one_dataset=False)  # a grid comparing data
    assert reproduce_main(["experiment", "run", str(path), "--dry-run"]) == 0


def test_a_grid_directory_written_by_another_grid_is_refused(tmp_path, capsys) -> None:
    from slowqk.experiments import write_grid_record

    first = load_grid(_grid_file(tmp_path))
    write_grid_record(first, expand(first))
    other = _grid_file(tmp_path, seeds=[1, 2, 3])  # same out_dir, another grid
    for command in ("run", "submit"):
        assert reproduce_main(["experiment", command, str(other), "--dry-run"]) == 2
        err = capsys.readouterr().err.strip()
        assert "grid.json: written by another grid (key 'seeds': [1, 2] there, [1, 2, 3]" in err
    same = _grid_file(tmp_path)  # the grid that wrote it goes on
    assert reproduce_main(["experiment", "run", str(same), "--dry-run"]) == 0
    # so does one that reads or lays out the same runs otherwise (contrasts, layout)
    relaid = _grid_file(
        tmp_path,
        layout={"nodes": 2},
        contrasts=[{"name": "c", "arm": "gpt/slowqk", "minus": "gpt/control"}],
    )
    assert reproduce_main(["experiment", "run", str(relaid), "--dry-run"]) == 0


@pytest.mark.slow
def test_grid_runs_skips_finished_runs_and_summarizes(tmp_path, capsys, monkeypatch) -> None:
    from conftest import SHARED

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "".join(
            (SHARED / "data" / "tinyshakespeare" / "input.txt").read_text().splitlines(True)[:2000]
        )
    )
    small = {
        "train.steps": 4,
        "train.eval_interval": 2,
        "train.eval_iters": 1,
        "model.num_layers": 2,
        "model.hidden_size": 32,
        "model.seq_length": 32,
        "data.corpus": str(corpus),
        "data.tokenizer_vocab_size": 384,
        "diagnostics.interval": 2,
        "train.tensorboard": False,
    }
    arms = {
        "control": {"qk.enabled": False},
        "slowqk": {"qk.enabled": True},
        "adaptive": {
            "qk.enabled": True,
            "qk.release": "adaptive",
            "qk.unit": "steps",
            "qk.ramp": 1,
            "qk.adaptive.min_hold": 1,
            "qk.adaptive.max_hold": 2,
        },
        "upper_v": {
            "lr_groups": [
                {"params": ["v"], "layers": {"top": 1}, "mult": 0.25, "unit": "steps", "hold": 2}
            ]
        },
    }
    path = _grid_file(
        tmp_path, overrides=small, variants={"gpt": {"recipe": "tiny/gpt"}}, arms=arms
    )
    grid = load_grid(path)
    assert run_grid(grid, jobs=2) == 0
    out = tmp_path / "out"
    for arm in ("control", "slowqk", "adaptive"):
        for seed in (1, 2):
            run = out / "gpt" / arm / f"seed{seed}"
            assert json.loads((run / "summary.json").read_text())["steps"] == 4
            assert (run / "recipe.yaml").is_file() and (run / "diagnostics.jsonl").is_file()
    assert len(list((out / "data").iterdir())) == 1  # the corpus was prepared once for all runs
    # and no run prepared data of its own (training only reads the grid's dataset)
    assert not list(out.glob("gpt/*/seed*/data/stage.json"))
    capsys.readouterr()
    assert run_grid(load_grid(path), jobs=2) == 0
    assert "8 finished, 0 to run" in capsys.readouterr().out

    table, files = write_summary(out)
    assert "| gpt | slowqk | 2 |" in table
    # each arm's learning-rate groups
    assert "| gpt | control | - | 2 |" in table and "| gpt | slowqk | qk | 2 |" in table
    assert "| gpt | upper_v | v@1 x0.25 (hold 2, ramp 0) | 2 |" in table
    names = {f.name for f in files}
    assert {
        "summary.md",
        "loss_curves.png",
        "paired_differences.png",
        "entropy_gpt.png",
        "lambda.png",
    } <= names
    assert all(f.stat().st_size > 1000 for f in files if f.suffix == ".png")
    pair = next(
        p
        for p in json.loads((out / "summary" / "summary.json").read_text())["pairs"]
        if p["arm"] == "slowqk"
    )
    assert pair["seeds"] == [1, 2] and pair["ci95"][0] <= pair["mean"] <= pair["ci95"][1]
    assert 0.0 < pair["upper_entropy"]["control"] <= 1.0 and "Final attention entropy" in table
    # release steps beside the losses: fixed 4% of 4 steps = 0; adaptive by max_hold 2 at the latest
    rows = {r["arm"]: r for r in json.loads((out / "summary" / "summary.json").read_text())["rows"]}
    assert (
        rows["slowqk"]["release"]["steps"] == [0, 0]
        and rows["slowqk"]["release"]["rule"] == "fixed"
    )
    assert rows["adaptive"]["release"]["rule"] == "adaptive" and all(
        1 <= s <= 2 for s in rows["adaptive"]["release"]["steps"]
    )
    assert "release step" in table and "| gpt | adaptive | 2 |" in table and "adaptive: " in table
    assert "commit " in table and " thread" in table  # what the runs were made with

    # one listed run re-run from scratch: bitwise equal; a tampered record is caught
    assert reproduce_main(["experiment", "reproduce", str(out), "gpt/adaptive/seed1"]) == 0
    report = capsys.readouterr().out
    assert "bitwise equality expected" in report and "reproduces bitwise" in report, report
    metrics = out / "gpt" / "adaptive" / "seed1" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    first = json.loads(lines[0])
    first["loss"] = math.nextafter(first["loss"], math.inf)  # one ulp
    metrics.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    assert reproduce_main(["experiment", "reproduce", str(out), "gpt/adaptive/seed1"]) == 1
    report = capsys.readouterr().out
    assert f"does NOT reproduce bitwise: step {first['step']}: loss" in report, report
    # another vector path (forced here, as another CPU generation would pick it): not bitwise,
    # said so, and compared within the stated tolerance
    metrics.write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    assert reproduce_main(["experiment", "reproduce", str(out), "gpt/adaptive/seed1"]) == 0
    report = capsys.readouterr().out
    assert "bitwise equality is not to be expected" in report, report
    assert "ATEN_CPU_CAPABILITY" in report and "reproduces within tolerance" in report, report
    # recorded by another commit whose arithmetic is the same: said, and every bit checked
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    summary_file = out / "gpt" / "adaptive" / "seed1" / "summary.json"
    recorded = json.loads(summary_file.read_text())
    recorded["provenance"]["commit"] = "0" * 40
    summary_file.write_text(json.dumps(recorded))
    assert reproduce_main(["experiment", "reproduce", str(out), "gpt/adaptive/seed1"]) == 0
    report = capsys.readouterr().out
    assert "commit: 0000000000" in report and "in fact bit for bit" in report, report


def test_every_figure_names_the_commit_of_its_runs() -> None:
    from slowqk.summary import commits_stamp

    one = {"provenance": {"records": [{"commit": "cd9bedc76fe4", "dirty": False}]}}
    assert commits_stamp(one) == "runs of commit cd9bedc"
    mixed = {
        "provenance": {
            "records": [{"commit": "cd9bedc76fe4"}, {"commit": "1234567ab", "dirty": True}]
        }
    }
    assert commits_stamp(mixed) == "runs of commit 1234567 (uncommitted changes), cd9bedc"
    assert commits_stamp({"provenance": {"records": []}}) == "runs without a code record"


def test_a_grid_runs_seed_by_seed_into_the_folder_asked_for(tmp_path, capsys) -> None:
    path = _grid_file(tmp_path, seeds=[3, 1], variants={"gpt": {"recipe": "tiny/gpt"}})
    out = tmp_path / "elsewhere"
    assert reproduce_main(["experiment", "run", str(path), "--dry-run", "--out-dir", str(out)]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "slowqk train" in x]
    order = [(x.split("seed=")[1].split()[0], "qk.enabled=true" in x) for x in lines]
    # both arms of the first seed before the next seed: a time limit leaves complete pairs
    assert order == [("3", False), ("3", True), ("1", False), ("1", True)]
    assert all(f"out_dir={out}/gpt/" in x for x in lines)
