"""Command line: ``slowqk train | print-recipe | quickstart | prepare-data``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from slowqk.config import RecipeError, load_recipe, recipe_to_yaml


def _quiet_dependencies() -> None:
    # CPU runs trigger "Apex / Transformer Engine not installed" notices on every import.
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|TE|apex).*")
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("megatron").setLevel(logging.ERROR)


def _cmd_print_recipe(args: argparse.Namespace) -> int:
    sys.stdout.write(recipe_to_yaml(load_recipe(args.recipe, args.overrides)))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import json

    from slowqk.train import train

    recipe = load_recipe(args.recipe, args.overrides)
    summary = train(recipe, resume=not args.no_resume, quiet=args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from slowqk.quickstart import run_quickstart

    return run_quickstart(args.recipe, args.overrides, out=args.out, steps=args.steps)


def _cmd_prepare_data(args: argparse.Namespace) -> int:
    from slowqk.data.corpus import prepare_corpus

    prepared = prepare_corpus(args.corpus, args.out, valid_fraction=args.valid_fraction,
                              vocab_size=args.vocab_size, tokenizer=args.tokenizer)
    for split, entry in prepared.manifest["splits"].items():
        print(f"{split}: {entry['documents']} documents, {entry['tokens']} tokens -> {args.out}/{entry['prefix']}")
    print(f"tokenizer: {prepared.tokenizer_path} (sha256 {prepared.manifest['tokenizer']['sha256'][:12]})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slowqk", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def recipe_args(sp: argparse.ArgumentParser, default: str | None = None) -> None:
        if default is None:
            sp.add_argument("recipe", help="recipe name (e.g. tiny/gpt) or path to a YAML file")
        else:
            sp.add_argument("--recipe", default=default, help=f"recipe (default {default})")
        sp.add_argument("overrides", nargs="*", help="key.sub=value overrides")

    sp = sub.add_parser("print-recipe", help="print the fully resolved recipe")
    recipe_args(sp)
    sp.set_defaults(func=_cmd_print_recipe)

    sp = sub.add_parser("train", help="train a recipe (one process per rank; use torchrun for more)")
    recipe_args(sp)
    sp.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(func=_cmd_train)

    sp = sub.add_parser("quickstart", help="control vs intervention on the tiny recipe; table + plot")
    recipe_args(sp, default="tiny/gpt")
    sp.add_argument("--out", default="runs/quickstart", help="output directory")
    sp.add_argument("--steps", type=int, default=None, help="override train.steps")
    sp.set_defaults(func=_cmd_quickstart)

    sp = sub.add_parser("prepare-data", help="train a tokenizer and write train/valid indexed datasets")
    sp.add_argument("corpus", help="a UTF-8 text file; documents separated by blank lines")
    sp.add_argument("--out", required=True)
    sp.add_argument("--valid-fraction", type=float, default=0.1)
    sp.add_argument("--vocab-size", type=int, default=2048)
    sp.add_argument("--tokenizer", default=None, help="use this sentencepiece model instead of training one")
    sp.set_defaults(func=_cmd_prepare_data)
    return p


def main(argv: list[str] | None = None) -> int:
    _quiet_dependencies()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RecipeError as exc:
        print(f"recipe error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
