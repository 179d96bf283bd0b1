"""The ``slowqk`` command line; ``slowqk --help`` lists the commands, ``slowqk COMMAND --help`` each
one's options."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import warnings
from itertools import islice
from pathlib import Path

from slowqk.config import RecipeError, load_recipe, recipe_to_yaml, shared_dir
from slowqk.logs import ENV as LOG_ENV
from slowqk.logs import LEVELS, configure_logging


def _default_shared(rel: str) -> str:
    """A path under the shared data folder, if it is there."""
    path = shared_dir() / rel
    return str(path) if path.exists() else ""


def _quiet_dependencies() -> None:
    # CPU runs trigger "Apex / Transformer Engine not installed" notices on every import.
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|TE|apex).*")
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("megatron").setLevel(logging.ERROR)


def _cmd_print_recipe(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    if args.memory:
        return _print_memory(recipe, args.gpus, args.device_gb)
    sys.stdout.write(recipe_to_yaml(recipe.model_copy(update={"out_dir": str(recipe.run_dir)})))
    sys.stdout.write(_group_elements_comment(recipe))
    return 0


def _print_memory(recipe, gpus: int | None, device_gb: float) -> int:
    # deferred: subcommands import what they use, so the CLI starts fast
    from slowqk.distributed import LayoutError
    from slowqk.launch import check_world
    from slowqk.memory.report import format_report

    par = recipe.parallel
    if par.engine != "megatron":
        raise RecipeError("print-recipe --memory: parallel.engine=megatron only (got deepspeed)")
    gpus = gpus or par.tensor * par.pipeline
    try:
        check_world(recipe, gpus, what="--gpus")
    except LayoutError as exc:
        raise RecipeError(f"print-recipe --memory --gpus {gpus}: {exc}") from None
    vocab = recipe.declared_vocab_size
    sys.stdout.write(format_report(recipe, gpus, vocab, device_gb))
    return 0


def _group_elements_comment(recipe) -> str:
    """The elements each learning-rate group covers in each layer, as YAML comments."""
    # deferred: subcommands import what they use, so the CLI starts fast
    from slowqk.config import element_counts, padded_vocab_size

    m = recipe.model
    vocab = recipe.declared_vocab_size
    counts = element_counts(
        recipe, padded_vocab_size(vocab, m.make_vocab_size_divisible_by, recipe.parallel.tensor)
    )
    if not counts:
        return ""
    lines = [
        f"# learning-rate groups: elements covered (all TP ranks; vocabulary {vocab}"
        f"{'' if m.vocab_size else ' = data.tokenizer_vocab_size'}, padded)"
    ]
    for label, per_layer in counts.items():
        cells = ", ".join(
            f"layer {k}: {v:,}" if k is not None else f"model: {v:,}" for k, v in per_layer.items()
        )
        lines.append(f"#   {label}: {cells} (total {sum(per_layer.values()):,})")
    return "\n".join(lines) + "\n"


def _cmd_train(args: argparse.Namespace) -> int:

    # deferred: subcommands import what they use, so the CLI starts fast
    from slowqk.checkpoint import CheckpointError
    from slowqk.distributed import PeerTimeout
    from slowqk.train import (
        EXIT_NONFINITE,
        EXIT_PEER_TIMEOUT,
        EXIT_PREEMPTED,
        NonFiniteError,
        Preempted,
        train,
    )

    recipe = load_recipe(args.recipe, args.overrides)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        summary = train(
            recipe,
            resume=not args.no_resume,
            quiet=args.quiet,
            allow_recipe_change=args.allow_recipe_change,
        )
    except Preempted as exc:
        if rank0:
            print(f"stopped: {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    except NonFiniteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NONFINITE
    except PeerTimeout as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_TIMEOUT)  # exit handlers would wait on the peer that does not answer
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if rank0:
        print(json.dumps(summary))
    return 0


def _cmd_launch(args: argparse.Namespace) -> int:
    # deferred: subcommands import what they use, so the CLI starts fast
    from slowqk.distributed import LayoutError
    from slowqk.launch import run

    overrides = list(args.overrides)
    if args.tp is not None:
        overrides.append(f"parallel.tensor={args.tp}")
    if args.pp is not None:
        overrides.append(f"parallel.pipeline={args.pp}")
    try:
        return run(
            args.recipe,
            overrides,
            args.nproc,
            args.dry_run,
            ["--no-resume"] if args.no_resume else [],
        )
    except LayoutError as exc:
        print(f"layout error: {exc}", file=sys.stderr)
        return 2


def _cmd_quickstart(args: argparse.Namespace) -> int:
    # deferred: subcommands import what they use, so the CLI starts fast
    from slowqk.quickstart import run_quickstart

    return run_quickstart(args.recipe, args.overrides, out=args.out, steps=args.steps)


def _print_manifest(root: str, manifest: dict) -> None:
    for split, info in manifest["splits"].items():
        print(
            f"{split}: {info['documents']} documents, {info['tokens']} tokens, "
            f"{len(info['shards'])} shards"
        )
    skipped = manifest.get("skipped", {})
    if skipped.get("total"):
        print(f"skipped {skipped['total']} bad records: {skipped['by_reason']}")
        for line in skipped["examples"][:5]:
            print(f"  {line}")
    print(f"dataset: {root} (tokenizer sha256 {manifest['tokenizer']['sha256'][:12]})")


def _is_corpus_file(source: str) -> bool:
    return Path(source).is_file() and Path(source).suffix not in (".yaml", ".yml")


def _cmd_prepare_data(args: argparse.Namespace) -> int:
    # deferred: subcommands import what they use, so the CLI starts fast
    from slowqk.data.corpus import prepare_corpus
    from slowqk.data.shard import load_manifest
    from slowqk.data.stage import needs_stage, prepare_stage, stage_dir

    if _is_corpus_file(args.source):
        if args.out is None or args.overrides:
            raise ValueError(
                f"prepare-data {args.source}: a corpus file takes --out DIR and no key=value "
                "overrides (those are for a recipe)"
            )
        prepared = prepare_corpus(
            args.source,
            args.out,
            valid_fraction=args.valid_fraction,
            vocab_size=args.vocab_size,
            tokenizer=args.tokenizer,
            progress=True,
        )
        _print_manifest(str(prepared.dataset_dir), prepared.manifest)
        return 0
    recipe = load_recipe(args.source, args.overrides)  # the recipe's data section: its stage
    if not needs_stage(recipe.data):
        print(f"{recipe.name}: data.dataset / data.train_prefixes are prepared data already")
        return 0
    where = Path(args.out) if args.out else stage_dir(recipe)
    dataset = prepare_stage(recipe.data, where, progress=True)
    _print_manifest(str(dataset), load_manifest(dataset))
    return 0


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:

    # deferred: subcommands import what they use, so the CLI starts fast
    from slowqk.data.sources import iter_documents
    from slowqk.data.tokenizer import train_sentencepiece
    from slowqk.hashing import file_sha256

    def sample():
        budget = args.sample_bytes
        for path in args.inputs:
            for text in iter_documents(path, args.text_field, skip_bad_lines=args.skip_bad_lines):
                yield text
                budget -= len(text.encode("utf-8"))
                if budget <= 0:
                    return

    specials = [t for t in (args.special_tokens or "").split(",") if t]
    texts = list(islice(sample(), args.sample_docs))
    path = train_sentencepiece(texts, args.out, args.vocab_size, args.model_type, specials)
    print(
        f"tokenizer: {path} ({args.model_type}, vocab {args.vocab_size}, trained on {len(texts)} "
        f"documents, sha256 {file_sha256(path)[:12]})"
    )
    return 0


def _cmd_data_shard(args: argparse.Namespace) -> int:
    # deferred: subcommands import what they use, so the CLI starts fast
    from slowqk.data.shard import ShardOptions, build_shards, parse_split

    options = ShardOptions(
        text_field=args.text_field,
        docs_per_shard=args.docs_per_shard,
        split=parse_split(args.split),
        valid_files=tuple(args.valid_files),
        test_files=tuple(args.test_files),
        seed=args.seed,
        skip_bad_lines=args.skip_bad_lines,
    )
    inputs = [*args.inputs, *args.valid_files, *args.test_files]
    manifest = build_shards(
        inputs,
        args.out,
        args.tokenizer,
        options,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    _print_manifest(args.out, manifest)
    return 0


def _cmd_data_verify(args: argparse.Namespace) -> int:
    # deferred: subcommands import what they use, so the CLI starts fast
    from slowqk.data.verify import verify_dataset

    totals = verify_dataset(args.dataset)
    for split, t in totals.items():
        print(f"{split}: {t['documents']} documents, {t['tokens']} tokens: ok")
    print(f"{args.dataset}: verified against its manifest")
    return 0


def _cmd_data_inspect(args: argparse.Namespace) -> int:
    # deferred: subcommands import what they use, so the CLI starts fast
    from slowqk.data.verify import inspect_dataset

    print(inspect_dataset(args.dataset, args.split, args.docs))
    return 0


def _cmd_experiment_run(args: argparse.Namespace) -> int:
    # deferred: subcommands import what they use, so the CLI starts fast
    from slowqk.experiments import load_grid, run_grid

    only = [v for v in (args.only or "").split(",") if v] or None
    grid = load_grid(args.grid, args.overrides)
    if args.out_dir:
        grid = grid.model_copy(update={"out_dir": args.out_dir})
    return run_grid(grid, jobs=args.jobs, dry_run=args.dry_run, only=only)


def _cmd_experiment_summarize(args: argparse.Namespace) -> int:
    # deferred: subcommands import what they use, so the CLI starts fast
    from slowqk.summary import write_summary

    table, files = write_summary(args.grid_dir, args.out)
    print(table)
    print("\n".join(f"wrote {f}" for f in files))
    return 0


def _cmd_experiment_reproduce(args: argparse.Namespace) -> int:
    # deferred: subcommands import what they use, so the CLI starts fast
    from slowqk.experiments import reproduce

    bitwise, report = reproduce(args.grid_dir, args.run, args.out)
    print(report)
    return 0 if bitwise else 1


def _cmd_export_hf(args: argparse.Namespace) -> int:
    # deferred: subcommands import what they use, so the CLI starts fast
    from slowqk.hf.export import export_checkpoint

    out = export_checkpoint(
        args.checkpoint,
        args.out,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
    )
    print(f"exported {args.checkpoint} -> {out}")
    if args.check_val:
        # deferred: subcommands import what they use, so the CLI starts fast
        from slowqk.hf.validate import compare_validation

        r = compare_validation(args.checkpoint, out)
        print(
            f"validation loss on {r['tokens']} tokens: slowqk {r['slowqk']:.6f} (ppl "
            f"{r['slowqk_ppl']:.4f}), "
            f"exported HF model {r['hf']:.6f} (ppl {r['hf_ppl']:.4f}), |diff| {r['abs_diff']:.2e}"
        )
        if args.dtype == "float32" and r["abs_diff"] > 1e-4:
            print("error: the exported model disagrees with the checkpoint", file=sys.stderr)
            return 1
    return 0


def _cmd_import_hf(args: argparse.Namespace) -> int:

    # deferred: subcommands import what they use, so the CLI starts fast
    from slowqk.hf.importer import check_import, import_rank, recipe_for

    recipe = recipe_for(
        Path(args.hf_dir), load_recipe(args.recipe, args.overrides), args.tp, args.pp
    )
    world = args.tp * args.pp
    if world > 1 and "WORLD_SIZE" not in os.environ:  # one process per rank, through torchrun
        check_import(
            args.hf_dir, recipe, args.out, args.overwrite
        )  # one line here, not one per rank
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={world}",
            "-m",
            "slowqk.cli",
            "import-hf",
            args.hf_dir,
            args.out,
            "--recipe",
            args.recipe,
            "--tp",
            str(args.tp),
            "--pp",
            str(args.pp),
            *(["--overwrite"] if args.overwrite else []),
            *args.overrides,
        ]
        return subprocess.run(cmd).returncode
    path = import_rank(args.hf_dir, recipe, args.out, args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"imported {args.hf_dir} -> {path} (TP={args.tp}, PP={args.pp}); continue with "
            f"train.init_from={args.out}"
        )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:

    # deferred: subcommands import what they use, so the CLI starts fast
    from slowqk.evaluate import evaluate, format_results

    if args.compare:
        records = {p: json.loads(Path(p).read_text()) for p in args.compare}
        print(format_results(records))
        return 0
    if not args.model:
        print("error: give a model directory (or --compare RESULT.json ...)", file=sys.stderr)
        return 2
    out = args.out or str(Path(args.model) / "eval_results.json")
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    record = evaluate(
        args.model,
        out,
        tasks=tasks,
        eval_data=args.eval_data or None,
        corpus=args.corpus or None,
        include_path=args.include_path,
        limit=args.limit,
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    print(format_results({out: record}))
    print(f"results: {out}")
    return 0


def _slurm_job(args: argparse.Namespace):
    # deferred: subcommands import what they use, so the CLI starts fast
    from slowqk.slurm import SlurmJob

    return SlurmJob(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task,
        time=args.time,
        partition=args.partition,
        account=args.account,
        job_name=args.job_name,
        signal_seconds=args.signal_seconds,
        container_image=args.container_image,
    )


def _cmd_experiment_submit(args: argparse.Namespace) -> int:
    # deferred: subcommands import what they use, so the CLI starts fast
    from slowqk.distributed import LayoutError
    from slowqk.experiments import load_grid
    from slowqk.grid_slurm import SlurmUnavailable, submit_grid

    only = [v for v in (args.only or "").split(",") if v] or None
    try:
        return submit_grid(
            load_grid(args.grid, args.overrides),
            _slurm_job(args),
            max_concurrent=args.max_concurrent,
            only=only,
            dry_run=args.dry_run,
        )
    except LayoutError as exc:
        print(f"layout error: {exc}", file=sys.stderr)
        return 2
    except SlurmUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _cmd_experiment_status(args: argparse.Namespace) -> int:
    # deferred: subcommands import what they use, so the CLI starts fast
    from slowqk.grid_slurm import SlurmUnavailable, print_status

    try:
        return print_status(args.grid)
    except SlurmUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _cmd_experiment_prepare_data(args: argparse.Namespace) -> int:
    # deferred: subcommands import what they use, so the CLI starts fast
    from slowqk.experiments import prepare_recorded_grid_data

    for dataset in prepare_recorded_grid_data(args.grid_dir):
        print(f"dataset: {dataset}")
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    # deferred: subcommands import what they use, so the CLI starts fast
    from slowqk.distributed import LayoutError
    from slowqk.slurm import submit

    job = _slurm_job(args)
    try:
        return submit(args.recipe, args.overrides, job, dry_run=args.dry_run)
    except LayoutError as exc:
        print(f"layout error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="slowqk",
        description="Pretrain GPT- and LLaMA-style decoders on megatron-core, with the upper "
        "layers' W_Q/W_K learning rate slowed early in training; diagnostics, experiments, "
        "Hugging Face export.",
        epilog="Recipes: `slowqk print-recipe NAME` (e.g. tiny/gpt, llama-350m). Overrides: "
        "key.sub=value.",
    )
    p.add_argument(
        "--log-level",
        choices=LEVELS,
        help="slowqk's log lines on stderr (default INFO on rank 0, WARNING on the others; "
        "--quiet: WARNING); may also follow the command",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def recipe_args(sp: argparse.ArgumentParser, default: str | None = None) -> None:
        if default is None:
            sp.add_argument("recipe", help="recipe name (e.g. tiny/gpt) or path to a YAML file")
        else:
            sp.add_argument("--recipe", default=default, help=f"recipe (default {default})")
        sp.add_argument("overrides", nargs="*", help="key.sub=value overrides")

    def slurm_job_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--nodes", type=int, default=1)
        sp.add_argument(
            "--gpus-per-node",
            type=int,
            default=0,
            help="GPUs per node (one rank each); 0 = CPU ranks",
        )
        sp.add_argument(
            "--tasks-per-node", type=int, default=None, help="ranks per node (default: one per GPU)"
        )
        sp.add_argument("--cpus-per-task", type=int, default=None)
        sp.add_argument("--time", default=None, help="time limit, e.g. 24:00:00")
        sp.add_argument("--partition", default=None)
        sp.add_argument("--account", default=None)
        sp.add_argument("--job-name", default=None, help="default: the recipe's name")
        sp.add_argument(
            "--signal-seconds",
            type=int,
            default=180,
            help="SIGUSR1 this long before the time limit",
        )
        sp.add_argument(
            "--container-image", default=None, help="run the ranks in this image (pyxis/enroot)"
        )

    sp = sub.add_parser("print-recipe", help="print the fully resolved recipe")
    recipe_args(sp)
    sp.add_argument(
        "--memory",
        action="store_true",
        help="print instead the predicted memory per GPU (parameters, gradients, optimizer "
        "state, activations) for each pipeline stage",
    )
    sp.add_argument(
        "--gpus", type=int, help="with --memory: GPUs of the run (default TP x PP: one replica)"
    )
    sp.add_argument(
        "--device-gb", type=float, default=80.0, help="with --memory: GB per GPU (default 80)"
    )
    sp.set_defaults(func=_cmd_print_recipe)

    sp = sub.add_parser(
        "train", help="train a recipe (one process per rank; use torchrun for more)"
    )
    recipe_args(sp)
    sp.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    sp.add_argument("--quiet", action="store_true", help="no progress bar and no INFO lines")
    sp.add_argument(
        "--allow-recipe-change",
        action="store_true",
        help="resume even if the recipe changed in fields that alter the run (logged)",
    )
    sp.set_defaults(func=_cmd_train)

    sp = sub.add_parser(
        "launch", help="train with torchrun on this machine (N processes, TP x PP x DP)"
    )
    recipe_args(sp)
    sp.add_argument("--nproc", type=int, required=True, help="processes (= GPUs) on this machine")
    sp.add_argument("--tp", type=int, default=None, help="tensor parallel size (else the recipe's)")
    sp.add_argument(
        "--pp", type=int, default=None, help="pipeline parallel size (else the recipe's)"
    )
    sp.add_argument("--dry-run", action="store_true", help="print the command and exit")
    sp.add_argument("--no-resume", action="store_true")
    sp.set_defaults(func=_cmd_launch)

    ex = sub.add_parser(
        "experiment", help="grids of arms x variants x seeds, and their summary"
    ).add_subparsers(dest="tool", required=True)
    ep = ex.add_parser(
        "run", help="run every unfinished run of a grid file (see slowqk.experiments)"
    )
    ep.add_argument("grid", help="grid YAML (e.g. recipes/study/grid.yaml)")
    ep.add_argument(
        "overrides", nargs="*", help="key=value for every run; key=[a,b] adds a sweep axis"
    )
    ep.add_argument("--jobs", type=int, default=1, help="runs at a time (local processes)")
    ep.add_argument(
        "--out-dir", default=None, help="the grid's directory (default: the grid file's out_dir)"
    )
    ep.add_argument("--dry-run", action="store_true", help="list the runs to do and exit")
    ep.add_argument(
        "--only", metavar="VARIANT[,VARIANT]", help="run only these variants (a grid in phases)"
    )
    ep.set_defaults(func=_cmd_experiment_run)
    es = ex.add_parser(
        "summarize", help="table with paired 95%% CIs and plots for a grid directory"
    )
    es.add_argument("grid_dir")
    es.add_argument("--out", default=None, help="output directory (default <grid_dir>/summary)")
    es.set_defaults(func=_cmd_experiment_summarize)
    es = ex.add_parser(
        "submit",
        help="submit a grid to SLURM: a data job, one job array over the unfinished runs, a "
        "summary job after it (see slowqk.grid_slurm)",
    )
    es.add_argument("grid", help="grid YAML")
    es.add_argument("overrides", nargs="*", help="key=value for every run (as experiment run)")
    es.add_argument(
        "--max-concurrent", type=int, default=None, help="array tasks running at once (%%N)"
    )
    es.add_argument("--only", metavar="VARIANT[,VARIANT]", help="submit only these variants' runs")
    slurm_job_args(es)
    es.add_argument("--dry-run", action="store_true", help="print the sbatch commands and exit")
    es.set_defaults(func=_cmd_experiment_submit)
    es = ex.add_parser(
        "status", help="each run of a submitted grid: pending / running / finished / failed"
    )
    es.add_argument("grid", help="grid YAML or grid directory")
    es.set_defaults(func=_cmd_experiment_status)
    es = ex.add_parser(
        "prepare-data", help="the data stage of a grid directory (a submitted grid's data job)"
    )
    es.add_argument("grid_dir")
    es.set_defaults(func=_cmd_experiment_prepare_data)
    er = ex.add_parser(
        "reproduce",
        help="re-run one run of a grid and say whether it reproduces bitwise (exit 1 if not)",
    )
    er.add_argument("grid_dir")
    er.add_argument("run", help="variant/arm/seedK, e.g. gpt/control/seed1")
    er.add_argument(
        "--out", default=None, help="where to re-run (default <grid_dir>/reproduce/<run>)"
    )
    er.set_defaults(func=_cmd_experiment_reproduce)

    sp = sub.add_parser(
        "submit", help="submit a recipe to SLURM (launch/slurm/slowqk.sbatch), layout checked"
    )
    recipe_args(sp)
    slurm_job_args(sp)
    sp.add_argument("--dry-run", action="store_true", help="print the sbatch command and exit")
    sp.set_defaults(func=_cmd_submit)

    sp = sub.add_parser("export-hf", help="checkpoint (any TP/PP) -> Hugging Face model directory")
    sp.add_argument(
        "checkpoint", help="a checkpoint directory, or a run directory (its latest checkpoint)"
    )
    sp.add_argument("out")
    sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    sp.add_argument("--max-shard-size", default="2GB", help="safetensors shard size, e.g. 500MB")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    sp.add_argument(
        "--check-val",
        action="store_true",
        help="also compute the validation loss with SlowQK and with the exported model (needs the "
        "run's data)",
    )
    sp.set_defaults(func=_cmd_export_hf)

    sp = sub.add_parser(
        "import-hf", help="Hugging Face GPT-2/LLaMA directory -> weights-only checkpoint at TP x PP"
    )
    sp.add_argument("hf_dir")
    sp.add_argument("out", help="checkpoint root to create (iter_0000000 + latest)")
    sp.add_argument(
        "--recipe", required=True, help="recipe whose non-architecture settings to record"
    )
    sp.add_argument("--tp", type=int, default=1)
    sp.add_argument("--pp", type=int, default=1)
    sp.add_argument(
        "--overwrite", action="store_true", help="replace an existing checkpoint root at OUT"
    )
    sp.add_argument("overrides", nargs="*", help="key.sub=value recipe overrides")
    sp.set_defaults(func=_cmd_import_hf)

    sp = sub.add_parser(
        "evaluate", help="lm-evaluation-harness on an exported model, offline, local tasks"
    )
    sp.add_argument("model", nargs="?", help="Hugging Face model directory (from export-hf)")
    sp.add_argument(
        "--tasks", default=None, help="comma-separated task names (default: every local task)"
    )
    sp.add_argument(
        "--eval-data",
        default=os.environ.get("SLOWQK_EVAL_DATA", _default_shared("data/eval")),
        help="directory of <task>_<split>.jsonl files in lm-eval's layout ('' for none; env "
        "SLOWQK_EVAL_DATA)",
    )
    sp.add_argument(
        "--corpus",
        default=_default_shared("data/tinyshakespeare/input.txt"),
        help="corpus whose validation part makes the shakespeare_* tasks ('' for none)",
    )
    sp.add_argument("--include-path", default=None, help="an extra directory of lm-eval task YAMLs")
    sp.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    sp.add_argument("--batch-size", type=int, default=8)
    sp.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="context window for lm-eval (default: the model's; RoPE models may go beyond their "
        "training length)",
    )
    sp.add_argument("--out", default=None, help="results JSON (default <model>/eval_results.json)")
    sp.add_argument(
        "--compare",
        nargs="+",
        default=None,
        metavar="RESULT",
        help="print result files side by side",
    )
    sp.set_defaults(func=_cmd_evaluate)

    sp = sub.add_parser(
        "quickstart", help="control vs intervention on the tiny recipe; table + plot"
    )
    recipe_args(sp, default="tiny/gpt")
    sp.add_argument("--out", default="runs/quickstart", help="output directory")
    sp.add_argument("--steps", type=int, default=None, help="override train.steps")
    sp.set_defaults(func=_cmd_quickstart)

    sp = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(
        dest="tool", required=True
    )
    tp = sp.add_parser("train", help="train a SentencePiece tokenizer on a sample of local corpora")
    tp.add_argument(
        "inputs", nargs="+", help=".jsonl/.json/.txt/.parquet files or saved dataset directories"
    )
    tp.add_argument("--out", required=True, help="output .model file")
    tp.add_argument("--vocab-size", type=int, default=32000)
    tp.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    tp.add_argument("--special-tokens", default="", help="comma-separated extra symbols")
    tp.add_argument("--text-field", default="text")
    tp.add_argument(
        "--sample-docs",
        type=int,
        default=1_000_000,
        help="at most this many documents (first in input order)",
    )
    tp.add_argument("--sample-bytes", type=int, default=1 << 30, help="and at most this many bytes")
    tp.add_argument("--skip-bad-lines", action="store_true")
    tp.set_defaults(func=_cmd_tokenizer_train)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="tool", required=True)
    dp = data.add_parser(
        "shard", help="tokenize inputs into sharded megatron-core indexed datasets"
    )
    dp.add_argument(
        "inputs", nargs="+", help=".jsonl/.json/.txt/.parquet files or saved dataset directories"
    )
    dp.add_argument("--out", required=True)
    dp.add_argument(
        "--tokenizer", required=True, help="SentencePiece .model or Hugging Face tokenizer.json"
    )
    dp.add_argument("--workers", type=int, default=1)
    dp.add_argument("--docs-per-shard", type=int, default=100_000)
    dp.add_argument(
        "--split", default="1,0,0", help="train,valid,test proportions by document, e.g. 98,1,1"
    )
    dp.add_argument("--valid-files", nargs="*", default=[], help="held-out inputs for validation")
    dp.add_argument("--test-files", nargs="*", default=[], help="held-out inputs for test")
    dp.add_argument("--text-field", default="text")
    dp.add_argument("--seed", type=int, default=1234, help="seeds the document-to-split assignment")
    dp.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="count and skip invalid JSON lines instead of failing",
    )
    dp.add_argument("--overwrite", action="store_true", help="replace a different dataset at --out")
    dp.add_argument("--quiet", action="store_true")
    dp.set_defaults(func=_cmd_data_shard)
    vp = data.add_parser("verify", help="re-read a dataset and check it against its manifest")
    vp.add_argument("dataset")
    vp.set_defaults(func=_cmd_data_verify)
    ip = data.add_parser("inspect", help="decoded documents and statistics of a dataset")
    ip.add_argument("dataset")
    ip.add_argument("--split", default="train")
    ip.add_argument("--docs", type=int, default=3)
    ip.set_defaults(func=_cmd_data_inspect)

    sp = sub.add_parser(
        "prepare-data",
        help="the data stage: a recipe's corpus (or a text file) -> tokenizer + train/valid "
        "shards + manifest",
        description="SOURCE a recipe (its data.corpus, prepared where `slowqk train` reads it, "
        "or in --out) or a UTF-8 text file (documents separated by blank lines; --out needed). "
        "`slowqk train` runs this stage itself first; run it alone to prepare data once before "
        "many jobs read it.",
    )
    sp.add_argument("source", help="recipe name or YAML (e.g. tiny/gpt), or a text corpus file")
    sp.add_argument("overrides", nargs="*", help="key.sub=value overrides of the recipe")
    sp.add_argument("--out", default=None, help="where to prepare (default: the recipe's)")
    sp.add_argument("--valid-fraction", type=float, default=0.1, help="corpus file only")
    sp.add_argument("--vocab-size", type=int, default=2048, help="corpus file only")
    sp.add_argument(
        "--tokenizer",
        default=None,
        help="corpus file only: use this sentencepiece model instead of training one",
    )
    sp.set_defaults(func=_cmd_prepare_data)
    return p


def _log_level_option(argv: list[str]) -> tuple[list[str], str | None]:
    """``--log-level X`` taken out of ``argv`` wherever it stands (before or after the command)."""
    out, level, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--log-level" and i + 1 < len(argv):
            level, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--log-level="):
            level = arg.split("=", 1)[1]
        else:
            out.append(arg)
        i += 1
    return out, level


def main(argv: list[str] | None = None) -> int:
    _quiet_dependencies()
    parser = build_parser()
    argv, level = _log_level_option(list(sys.argv[1:] if argv is None else argv))
    if level is not None and level.upper() not in LEVELS:
        parser.error(f"--log-level: got {level!r}; expected one of {', '.join(LEVELS)}")
    if level is not None:
        os.environ[LOG_ENV] = level.upper()  # the ranks and runs this command starts log alike
    args, extra = parser.parse_known_args(argv)
    configure_logging(level.upper() if level else None, quiet=getattr(args, "quiet", False))
    # overrides may also follow options (`... --jobs 2 key=value`)
    if (
        extra
        and hasattr(args, "overrides")
        and all("=" in x and not x.startswith("-") for x in extra)
    ):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except RecipeError as exc:
        print(f"recipe error: {exc}", file=sys.stderr)
        return 2
    except (
        FileNotFoundError,
        FileExistsError,
        PermissionError,
        ValueError,
    ) as exc:  # InputError, VerifyError too
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine, not the input (a folder that cannot be locked, ...)
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
