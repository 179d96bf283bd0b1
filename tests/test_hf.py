"""Hugging Face export / import, checked by logits against megatron-core's own model, and
lm-eval."""

from __future__ import annotations

import filecmp
import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO
from multiproc import run_cli, run_ranks

pytestmark = pytest.mark.slow
LAYOUTS = {"tp1": {}, "tp2": {"parallel.tensor": 2}, "pp2": {"parallel.pipeline": 2}}


def _train_worker(rank: int, world: int, recipe: str, overrides: list[str]) -> dict:
    from slowqk.config import load_recipe
    from slowqk.train import train

    return train(load_recipe(recipe, overrides), quiet=True)


def _train(root: Path, dataset: str, name: str, recipe: str, world: int, **extra) -> Path:
    base = {
        "out_dir": str(root / name),
        "data.corpus": "null",
        "data.dataset": dataset,
        "model.num_layers": 2,
        "model.hidden_size": 64,
        "model.num_attention_heads": 4,
        "model.seq_length": 32,
        "train.steps": 2,
        "train.micro_batch_size": 2,
        "train.global_batch_size": 4,
        "train.eval_iters": 2,
        "train.save_interval": 2,
        "train.progress_bar": "false",
        "train.tensorboard": "false",
        "optimizer.warmup_steps": 1,
    }
    base.update(extra)
    run_ranks(_train_worker, world, recipe, [f"{k}={v}" for k, v in base.items()])
    return root / name / "checkpoints" / "iter_0000002"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, small_dataset) -> dict[str, Path]:
    """Trained 2-step checkpoints: GPT and LLaMA (GQA) at TP1, TP2, PP2; GPT without biases; LLaMA
    with QK-norm at TP2."""
    root, dataset = tmp_path_factory.mktemp("hf"), small_dataset
    out = {}
    for fam, recipe in (("gpt", "tiny/gpt"), ("llama", "tiny/llama")):
        for layout, extra in LAYOUTS.items():
            out[f"{fam}-{layout}"] = _train(
                root, dataset, f"{fam}-{layout}", recipe, 1 if layout == "tp1" else 2, **extra
            )
    out["gpt-nobias"] = _train(
        root, dataset, "gpt-nobias", "tiny/gpt", 1, **{"model.bias": "false"}
    )
    # the LLaMA block with QK-norm exports as Qwen3
    out["qwen3-tp2"] = _train(
        root, dataset, "qwen3-tp2", "tiny/llama", 2, **{"model.qk_norm": "true"}, **LAYOUTS["tp2"]
    )
    return out


def _megatron_logits(rank: int, world: int, ckpt: str, ids: torch.Tensor) -> torch.Tensor:
    """Logits of megatron-core's model with the checkpoint loaded by megatron-core (TP1,
    resharded)."""
    from slowqk.checkpoint import load_model_weights, read_extra
    from slowqk.config import Recipe
    from slowqk.distributed import init_distributed
    from slowqk.models import build_gpt_model, build_transformer_config, padded_vocab_size

    extra = read_extra(Path(ckpt))
    recipe = Recipe.model_validate(extra["recipe"])
    recipe.parallel.tensor = recipe.parallel.pipeline = 1
    init_distributed(recipe.parallel, 0)
    padded = padded_vocab_size(extra["vocab_size"], recipe.model.make_vocab_size_divisible_by, 1)
    model = build_gpt_model(recipe.model, build_transformer_config(recipe.model), padded)
    load_model_weights(Path(ckpt), [model])
    model.eval()
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
    return logits.float()  # all padded rows: the export keeps them


def _hf_logits(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        str(hf_dir), dtype=torch.float32, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


ARCHITECTURES = {"gpt": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@pytest.mark.parametrize(
    "case",
    [
        "gpt-tp1",
        "gpt-tp2",
        "gpt-pp2",
        "llama-tp1",
        "llama-tp2",
        "llama-pp2",
        "gpt-nobias",
        "qwen3-tp2",
    ],
)
def test_exported_logits_equal_megatron_logits(checkpoints, tmp_path, case) -> None:
    from slowqk.hf.export import export_checkpoint

    ckpt = checkpoints[case]
    out = export_checkpoint(ckpt, tmp_path / "hf", max_shard_size="100KB")  # several shards + index
    assert (out / "model.safetensors.index.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURES[case.split("-")[0]]]
    if not case.startswith("gpt"):
        assert config["num_key_value_heads"] == 2 < config["num_attention_heads"]  # GQA
    vocab = config["vocab_size"]
    assert vocab == 512  # the 400-token vocabulary padded to a multiple of 128
    ids = torch.randint(0, 400, (2, 32), generator=torch.Generator().manual_seed(0))
    ours = run_ranks(_megatron_logits, 1, str(ckpt), ids)[0]
    theirs = _hf_logits(out, ids)
    assert ours.shape == theirs.shape == (2, 32, vocab)
    assert (ours - theirs).abs().max().item() <= 1e-4


def _import(hf_dir: Path, out: Path, recipe: str, tp: int, pp: int) -> subprocess.CompletedProcess:
    return run_cli(
        ["import-hf", str(hf_dir), str(out), "--recipe", recipe, "--tp", str(tp), "--pp", str(pp)],
        cwd=REPO,
    )


@pytest.mark.parametrize(
    "case, recipe, tp, pp",
    [
        ("llama-tp1", "tiny/llama", 2, 1),
        ("gpt-tp1", "tiny/gpt", 1, 2),
        ("qwen3-tp2", "tiny/llama", 1, 2),
    ],
)
def test_import_then_export_is_bitwise_identical(
    checkpoints, tmp_path, case, recipe, tp, pp
) -> None:
    from slowqk.hf.export import export_checkpoint

    first = export_checkpoint(checkpoints[case], tmp_path / "first")
    proc = _import(first, tmp_path / "imported", recipe, tp, pp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = export_checkpoint(tmp_path / "imported", tmp_path / "second")
    assert filecmp.cmp(first / "model.safetensors", second / "model.safetensors", shallow=False)
    mode = (first / "config.json").stat().st_mode & 0o777
    assert (first / "model.safetensors").stat().st_mode & 0o777 == mode  # not safetensors' own 0600
    assert json.loads((first / "config.json").read_text()) == json.loads(
        (second / "config.json").read_text()
    )


def _train_from_import(rank: int, world: int, imported: str, dataset: str, out: str) -> dict:
    from slowqk.config import load_recipe
    from slowqk.train import train

    tok = next(Path(imported, "iter_0000000", "tokenizer").iterdir())
    overrides = [
        f"train.init_from={imported}",
        "data.corpus=null",
        f"data.dataset={dataset}",
        f"data.tokenizer={tok}",
        f"out_dir={out}",
        "train.steps=1",
        "train.eval_iters=1",
        "model.num_layers=2",
        "model.hidden_size=64",
        "model.num_attention_heads=4",
        "model.seq_length=32",
        "model.vocab_size=512",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "train.progress_bar=false",
        "train.tensorboard=false",
        "train.save_interval=1",
        # an update far below fp32 resolution: the weights must come out exactly as loaded
        "optimizer.lr=1e-30",
        "optimizer.min_lr=0",
        "optimizer.weight_decay=0",
        "optimizer.warmup_steps=0",
    ]
    return train(load_recipe("tiny/llama", overrides), quiet=True)


def test_continue_pretraining_from_an_import(checkpoints, small_dataset, tmp_path) -> None:
    from slowqk.hf.export import export_checkpoint

    first = export_checkpoint(checkpoints["llama-tp1"], tmp_path / "first")
    assert _import(first, tmp_path / "imported", "tiny/llama", 1, 1).returncode == 0
    run_ranks(
        _train_from_import, 1, str(tmp_path / "imported"), small_dataset, str(tmp_path / "run")
    )
    again = export_checkpoint(tmp_path / "run", tmp_path / "again")
    assert filecmp.cmp(first / "model.safetensors", again / "model.safetensors", shallow=False)


def test_validation_loss_of_slowqk_and_exported_model_agree(checkpoints, tmp_path) -> None:
    from slowqk.hf.export import export_checkpoint

    ckpt = checkpoints["llama-tp2"]
    hf = export_checkpoint(ckpt, tmp_path / "hf")
    r = run_ranks(_compare_worker, 1, str(ckpt), str(hf))[0]
    assert r["tokens"] == 2 * 4 * 32
    assert r["abs_diff"] <= 1e-4, r


def _compare_worker(rank: int, world: int, ckpt: str, hf: str) -> dict:
    from slowqk.hf.validate import compare_validation

    return compare_validation(ckpt, hf)


@pytest.mark.parametrize(
    "overrides, part",
    [
        ({"model.ffn": "swiglu"}, "model.ffn=swiglu"),
        ({"model.norm": "rmsnorm"}, "model.norm=rmsnorm"),
        ({"model.position": "rope", "model.ffn": "swiglu"}, "model.position=rope"),
        ({"model.qk_norm": "true"}, "model.qk_norm=true"),  # GPT-2 has no QK-norm
        (
            {
                "model.qk_norm": "true",
                "model.ffn": "swiglu",
                "model.norm": "rmsnorm",
                "model.position": "rope",
            },
            "model.bias=true",
        ),  # Qwen3 has no MLP biases
    ],
)
def test_unexpressible_mixes_are_refused_naming_the_part(overrides, part) -> None:
    from slowqk.config import load_recipe
    from slowqk.hf.mapping import UnsupportedArchitecture, rules

    with pytest.raises(UnsupportedArchitecture, match=part.replace(".", r"\.")):
        rules(load_recipe("tiny/gpt", [f"{k}={v}" for k, v in overrides.items()]).model)


def _broken_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bad_checkpoints_give_clear_errors_and_leave_nothing(checkpoints, tmp_path) -> None:
    from slowqk.checkpoint import write_record
    from slowqk.hf.export import export_checkpoint
    from slowqk.hf.reader import CheckpointReadError

    src = checkpoints["gpt-tp2"]
    shard = sorted(src.glob("*.distcp"))[0].name

    missing = _broken_copy(src, tmp_path / "missing")
    (missing / shard).unlink()
    truncated = _broken_copy(src, tmp_path / "truncated")
    data = (truncated / shard).read_bytes()
    (truncated / shard).write_bytes(data[: len(data) // 2])
    # a checkpoint whose tensors belong to another recipe (record rewritten, so only the shapes
    # disagree)
    other = _broken_copy(src, tmp_path / "other")
    common = torch.load(other / "common.pt", weights_only=True)
    common["extra"]["recipe"]["model"]["ffn_hidden_size"] = 128
    torch.save(common, other / "common.pt")
    write_record(other, 2)

    cases = [
        (missing, f"missing file {shard}"),
        (truncated, "bytes, expected"),
        (
            other,
            r"linear_fc1.weight.* has shape \(2, 256, 64\), the checkpoint's recipe implies \(2, "
            r"128, 64\)",
        ),
    ]
    for ckpt, match in cases:
        dest = tmp_path / f"out-{ckpt.name}"
        with pytest.raises(CheckpointReadError, match=match):
            export_checkpoint(ckpt, dest)
        assert not dest.exists() and not dest.with_name(dest.name + ".tmp").exists()


def _lie_about_header(path: Path) -> None:
    """Claim the first tensor is 4x larger than the bytes it has."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [4 * header[name]["shape"][0], *header[name]["shape"][1:]]
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


def test_bad_hf_directories_give_clear_errors_and_leave_nothing(checkpoints, tmp_path) -> None:
    from slowqk.hf.export import export_checkpoint

    good = export_checkpoint(checkpoints["llama-tp1"], tmp_path / "good")
    lie = _broken_copy(good, tmp_path / "lie")
    _lie_about_header(lie / "model.safetensors")
    fewer = _broken_copy(good, tmp_path / "fewer")
    cfg = json.loads((fewer / "config.json").read_text())
    cfg["num_hidden_layers"] = 3  # the config promises a layer the weights do not have
    (fewer / "config.json").write_text(json.dumps(cfg))
    for hf, match in (
        (lie, "model.safetensors: not a readable safetensors file"),
        (fewer, "HF tensor 'model.layers.2.input_layernorm.weight' is missing"),
    ):
        dest = tmp_path / f"imp-{hf.name}"
        proc = _import(hf, dest, "tiny/llama", 1, 1)
        assert proc.returncode != 0
        assert match in proc.stderr, proc.stderr[-2000:]
        assert not dest.exists() or not any(dest.iterdir())


def test_evaluate_command_scores_every_task(checkpoints, tmp_path) -> None:
    from slowqk.hf.export import export_checkpoint

    hf = export_checkpoint(checkpoints["llama-tp1"], tmp_path / "hf")
    out = tmp_path / "eval" / "results.json"
    # RoPE: a window past the 32-token training length so every continuation fits
    proc = run_cli(
        ["evaluate", str(hf), "--limit", "3", "--out", str(out), "--max-length", "320"], cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    expected = {
        "shakespeare_lastword",
        "shakespeare_ppl",
        "lambada_openai_local",
        "hellaswag_local",
        "arc_easy_local",
        "arc_challenge_local",
        "piqa_local",
        "openbookqa_local",
    }
    assert set(record["tasks"]) == expected
    for task, metrics in record["tasks"].items():
        for name, value in metrics.items():
            if name.startswith("acc"):
                assert 0.0 <= value <= 1.0, (task, name, value)
            else:
                assert (
                    1.0 < value < float("inf") or name == "bits_per_byte" and 0.0 < value < 20.0
                ), (task, name, value)
        assert task in record["scores"]
    assert "shakespeare_ppl / word_perplexity" in proc.stdout
    compare = run_cli(["evaluate", "--compare", str(out), str(out)], cwd=REPO)
    assert compare.returncode == 0 and compare.stdout.count("arc_easy_local / acc ") == 1


def _stock_gpt2(like: Path, out: Path, **fields) -> Path:
    """A GPT-2 the project never made: transformers' own class and defaults (activation gelu_new,
    the released config's fields), random weights, at the shapes and with the tokenizer of
    ``like``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    ours = json.loads((like / "config.json").read_text())
    shutil.copytree(like, out)
    for name in ("model.safetensors", "config.json", "slowqk_export.json"):
        (out / name).unlink(missing_ok=True)
    config = GPT2Config(
        vocab_size=ours["vocab_size"],
        n_positions=ours["n_positions"],
        n_embd=ours["n_embd"],
        n_layer=ours["n_layer"],
        n_head=ours["n_head"],
        bos_token_id=ours["bos_token_id"],
        eos_token_id=ours["eos_token_id"],
        **fields,
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(str(out))
    return out


def test_stock_gpt2_with_tanh_gelu_imports_and_matches_transformers(checkpoints, tmp_path) -> None:
    from slowqk.hf.export import export_checkpoint

    ours = export_checkpoint(checkpoints["gpt-tp1"], tmp_path / "ours")
    stock = _stock_gpt2(ours, tmp_path / "stock")
    assert json.loads((stock / "config.json").read_text())["activation_function"] == "gelu_new"
    proc = _import(stock, tmp_path / "imported", "tiny/gpt", 1, 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "imported" / "iter_0000000"
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    megatron = run_ranks(_megatron_logits, 1, str(ckpt), ids)[0]
    theirs = _hf_logits(stock, ids)
    torch.testing.assert_close(megatron[..., : theirs.shape[-1]], theirs, rtol=1e-5, atol=1e-5)
    back = export_checkpoint(ckpt, tmp_path / "back")  # and the activation maps back
    assert json.loads((back / "config.json").read_text())["activation_function"] == "gelu_new"
    assert _hf_logits(back, ids).sub(theirs).abs().max() < 1e-5


def test_what_cannot_be_represented_is_refused_before_any_rank_starts(
    checkpoints, tmp_path, capsys
) -> None:
    from slowqk.hf.export import export_checkpoint

    ours = export_checkpoint(checkpoints["gpt-tp1"], tmp_path / "ours")
    from slowqk.cli import main

    for field, value in (("scale_attn_by_inverse_layer_idx", True), ("scale_attn_weights", False)):
        stock = _stock_gpt2(ours, tmp_path / field, **{field: value})
        capsys.readouterr()
        assert (
            main(["import-hf", str(stock), str(tmp_path / f"out-{field}"), "--recipe", "tiny/gpt"])
            == 2
        )
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"config.json {field}={value}" in err, err
        assert not (tmp_path / f"out-{field}").exists()
    llama = export_checkpoint(checkpoints["llama-tp1"], tmp_path / "llama")
    cfg = json.loads((llama / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = {"type": "linear", "factor": 2.0}  # the older spelling
    (llama / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert (
        main(["import-hf", str(llama), str(tmp_path / "out-rope"), "--recipe", "tiny/llama"]) == 2
    )
    assert "rope type 'linear'" in capsys.readouterr().err


def test_import_refuses_an_existing_destination_and_checks_before_launching(
    checkpoints, tmp_path, capsys
) -> None:
    from slowqk.cli import main
    from slowqk.hf.export import export_checkpoint

    hf = export_checkpoint(checkpoints["gpt-tp1"], tmp_path / "hf")
    dest = tmp_path / "ckpt"
    assert _import(hf, dest, "tiny/gpt", 1, 1).returncode == 0
    before = sorted(p.name for p in dest.iterdir())
    capsys.readouterr()
    assert (
        main(["import-hf", str(hf), str(dest), "--recipe", "tiny/gpt"]) == 2
    )  # refused before any work
    assert "exists; pass --overwrite" in capsys.readouterr().err
    again = run_cli(
        ["import-hf", str(hf), str(dest), "--recipe", "tiny/gpt", "--overwrite"], cwd=REPO
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(p.name for p in dest.iterdir()) == before
    # TP=3 does not divide the vocabulary: one line from the launcher, no rank started
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    cfg = json.loads((hf / "config.json").read_text())
    cfg.update(
        n_head=3, n_embd=63, n_inner=252
    )  # heads that TP=3 divides, so only the vocabulary is wrong
    odd = tmp_path / "odd"
    shutil.copytree(hf, odd)
    (odd / "config.json").write_text(json.dumps(cfg))
    # in-process: the launcher's own check, before it would start torchrun (which would start ranks)
    capsys.readouterr()
    assert (
        main(["import-hf", str(odd), str(tmp_path / "tp3"), "--recipe", "tiny/gpt", "--tp", "3"])
        == 2
    )
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and f"vocab_size {vocab} does not split over tensor parallel size 3" in err
    ), err


def test_any_registry_task_runs_on_local_files(checkpoints, tmp_path) -> None:
    """Two stock lm-eval tasks the project does not bundle (SuperGLUE BoolQ and COPA), on tiny files
    in their datasets' own fields; a task without local data is one line naming the file."""
    from slowqk.hf.export import export_checkpoint

    hf = export_checkpoint(checkpoints["gpt-tp1"], tmp_path / "hf")
    data = tmp_path / "eval"
    data.mkdir()
    boolq = [
        {
            "question": "is the king alive",
            "passage": "The king is dead and the queen mourns.",
            "idx": i,
            "label": 0,
        }
        for i in range(3)
    ]
    copa = [
        {
            "premise": "The man fell.",
            "choice1": "He slipped.",
            "choice2": "He sang.",
            "question": "cause",
            "idx": i,
            "label": 0,
        }
        for i in range(3)
    ]
    for name, rows in (("boolq_validation", boolq), ("copa_validation", copa)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "results.json"
    proc = run_cli(
        [
            "evaluate",
            str(hf),
            "--tasks",
            "boolq,copa",
            "--eval-data",
            str(data),
            "--corpus",
            "",
            "--out",
            str(out),
        ],
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert set(record["tasks"]) == {"boolq_local", "copa_local"}
    assert all(0.0 <= m["acc"] <= 1.0 for m in record["tasks"].values())
    assert record["n_samples"] == {"boolq_local": 3, "copa_local": 3}
    assert "Truncating" not in proc.stderr and "overrides" not in proc.stderr
    # a file in another layout: one line naming the file, the task and the fields, exit 2
    (data / "copa_validation.jsonl").write_text(
        "".join(
            json.dumps({"sentence": "The man fell.", "choice1": "a", "choice2": "b", "label": 0})
            + "\n"
            for _ in range(2)
        )
    )
    proc = run_cli(
        [
            "evaluate",
            str(hf),
            "--tasks",
            "copa",
            "--eval-data",
            str(data),
            "--corpus",
            "",
            "--out",
            str(tmp_path / "bad.json"),
        ],
        cwd=REPO,
    )
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, (
        proc.stderr[-3000:]
    )
    assert str(data / "copa_validation.jsonl") in errors[0] and "task 'copa_local'" in errors[0], (
        errors
    )
    assert "'premise'" in errors[0] or "'question'" in errors[0], errors
    assert not (tmp_path / "bad.json").exists()
    # one row of three without a field the others have: it loads as null, would render "None"
    good = {"premise": "The man fell.", "question": "cause", "choice1": "a", "choice2": "b"}
    good["label"] = 0
    partial = [good, {k: v for k, v in good.items() if k != "premise"}, good]
    (data / "copa_validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in partial))
    argv = ["evaluate", str(hf), "--tasks", "copa", "--eval-data", str(data), "--corpus", ""]
    proc = run_cli([*argv, "--out", str(tmp_path / "bad.json")], cwd=REPO)
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "row 2" in errors[0] and "'premise'" in errors[0], errors
    # lm-eval reads only the first --limit rows: the check reads no further
    proc = run_cli([*argv, "--limit", "1", "--out", str(tmp_path / "one.json")], cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from types import SimpleNamespace

    import lm_eval.tasks

    from slowqk.evaluate import write_registry_task

    # a task without its file: one line naming the file (the registry's entry for GLUE RTE, as
    # indexed)
    rte = Path(lm_eval.tasks.__file__).parent / "glue" / "rte" / "default.yaml"
    registry = SimpleNamespace(task_index={"rte": SimpleNamespace(yaml_path=str(rte))})
    with pytest.raises(
        FileNotFoundError, match=r"task 'rte': no local data; looked for .*rte_validation\.jsonl"
    ):
        write_registry_task(tmp_path / "tasks", data, "rte", registry)
