"""Downstream evaluation of an exported model with lm-evaluation-harness, fully offline.

Tasks come from local task YAMLs over local JSONL, generated into ``<out>/tasks``:

- ``<name>_local`` for each standard set found in the eval data directory (files named
  ``<task>_<split>.jsonl`` in lm-eval's field layout: lambada_openai, hellaswag, arc_easy,
  arc_challenge, piqa, openbookqa), and for any other task of lm-eval's registry asked for by
  name (``--tasks boolq,copa``) whose file is there. Each YAML ``include``s lm-eval's own task
  definition and only points it at the local file, so prompts and metrics are the stock ones.
- ``shakespeare_lastword`` (LAMBADA's definition over held-out Shakespeare passages, the last word
  to predict) and ``shakespeare_ppl`` (rolling log-likelihood perplexity), both from the
  validation part of the bundled corpus, i.e. text the tiny recipes never train on.

Any other task directory can be added with ``include_path``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import subprocess
import traceback
from pathlib import Path
from typing import Any

import yaml

from slowqk.data.corpus import split_corpus

STOCK = {  # task -> (lm-eval task yaml relative to lm_eval/tasks, split the local file holds)
    "lambada_openai": ("lambada/lambada_openai.yaml", "test"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation"),
    "arc_easy": ("arc/arc_easy.yaml", "test"),
    "arc_challenge": ("arc/arc_challenge.yaml", "test"),
    "piqa": ("piqa/piqa.yaml", "validation"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "test"),
}
SHAKESPEARE = ("shakespeare_lastword", "shakespeare_ppl")
PRIMARY = ("acc_norm", "acc", "word_perplexity", "perplexity")

log = logging.getLogger(__name__)


def _lm_eval_tasks_dir() -> Path:
    # deferred: lm_eval is an optional extra, imported only where used
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def shakespeare_documents(
    corpus: Path, valid_fraction: float = 0.1, min_words: int = 8
) -> list[str]:
    """Held-out passages: the validation documents of :func:`slowqk.data.corpus.split_corpus`."""
    _, valid = split_corpus(corpus.read_text(encoding="utf-8"), valid_fraction)
    return [d for d in valid if len(d.split()) >= min_words]


def _local_spec(stock_yaml: Path, task: str, split: str, data: Path) -> dict:
    """lm-eval's own definition of ``task``, pointed at one local JSONL file for ``split``."""
    return {
        "include": str(stock_yaml),
        "task": f"{task}_local",
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(data.resolve())}},
        "training_split": None,
        "validation_split": split if split == "validation" else None,
        "test_split": split if split == "test" else None,
        "fewshot_split": None,
    }


def write_registry_task(task_dir: Path, eval_data: Path | None, task: str, registry) -> str:
    """Any task of lm-eval's registry (a ``TaskManager``) over ``<eval_data>/<task>_<split>.jsonl``
    (the split it evaluates: its test split, else its validation split). Returns
    ``<task>_local``."""
    # deferred: lm_eval is an optional extra, imported only where used
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = registry.task_index.get(task)
    if entry is None or not getattr(entry, "yaml_path", None):
        raise ValueError(f"task {task!r}: not a task of lm-eval's registry (nor a local one)")
    config = load_yaml(entry.yaml_path, resolve_func=False)
    split = config.get("test_split") or config.get("validation_split")
    if not split:
        raise ValueError(f"task {task!r}: its definition names no test or validation split")
    data = (eval_data or Path("<no --eval-data>")) / f"{task}_{split}.jsonl"
    if eval_data is None or not data.is_file():
        raise FileNotFoundError(
            f"task {task!r}: no local data; looked for {data} (its {split} split, "
            "rows in the dataset's own fields, one JSON object per line)"
        )
    task_dir.mkdir(parents=True, exist_ok=True)
    spec = _local_spec(Path(entry.yaml_path), task, split, data)
    (task_dir / f"{task}_local.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return f"{task}_local"


def write_tasks(task_dir: Path, eval_data: Path | None, corpus: Path | None) -> list[str]:
    """Write task YAMLs (and the Shakespeare JSONL) into ``task_dir``; returns the task names."""
    task_dir.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    if eval_data is not None:
        if not eval_data.is_dir():
            raise FileNotFoundError(f"eval data directory not found: {eval_data}")
        stock_dir = _lm_eval_tasks_dir()
        for task, (rel, split) in STOCK.items():
            data = eval_data / f"{task}_{split}.jsonl"
            if not data.is_file():
                continue
            spec = _local_spec(stock_dir / rel, task, split, data)
            (task_dir / f"{task}_local.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
            names.append(f"{task}_local")
    if corpus is not None:
        if not corpus.is_file():
            raise FileNotFoundError(f"corpus not found: {corpus}")
        docs = shakespeare_documents(corpus)
        last = task_dir / "shakespeare_lastword.jsonl"
        # LAMBADA layout: the target is the passage's last word, no punctuation
        with open(last, "w") as f:
            for d in docs:
                text = re.sub(r"\W+$", "", " ".join(d.split()))
                f.write(json.dumps({"text": text}) + "\n")
        rolling = task_dir / "shakespeare_ppl.jsonl"
        with open(rolling, "w") as f:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
        (task_dir / "shakespeare_lastword.yaml").write_text(
            yaml.safe_dump(
                {
                    "include": str(_lm_eval_tasks_dir() / STOCK["lambada_openai"][0]),
                    "task": "shakespeare_lastword",
                    "dataset_path": "json",
                    "dataset_name": None,
                    "dataset_kwargs": {"data_files": {"test": str(last.resolve())}},
                    "test_split": "test",
                },
                sort_keys=False,
            )
        )
        (task_dir / "shakespeare_ppl.yaml").write_text(
            yaml.safe_dump(
                {
                    "task": "shakespeare_ppl",
                    "dataset_path": "json",
                    "dataset_name": None,
                    "dataset_kwargs": {"data_files": {"test": str(rolling.resolve())}},
                    "test_split": "test",
                    "output_type": "loglikelihood_rolling",
                    "doc_to_text": "",
                    "doc_to_target": "{{text}}",
                    "metric_list": [
                        {"metric": m}
                        for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")
                    ],
                    "metadata": {"version": 1.0},
                },
                sort_keys=False,
            )
        )
        names += list(SHAKESPEARE)
    return names


class TaskDataError(ValueError):
    """A local task file does not hold the fields its task reads."""


def _leaf_tasks(obj) -> list:
    """The task objects of ``get_task_dict``'s (possibly nested) result."""
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _leaf_tasks(v)]
    return [] if obj is None else [obj]


def _missing_field(exc: BaseException) -> str | None:
    """The field a template or a task function looked for: KeyError, or jinja's UndefinedError."""
    if isinstance(exc, KeyError) and exc.args:
        key = exc.args[0]  # a row's key, not lm-eval's sentence about an unknown task
        return key if isinstance(key, str) and not re.search(r"\s", key) else None
    found = re.search(r"'dict object' has no attribute '([^']+)'|'([^']+)' is undefined", str(exc))
    return (found.group(1) or found.group(2)) if found else None


def _template_fields(config) -> set[str]:
    """The fields the task's Jinja templates name (only meaningful without ``process_docs``)."""
    # deferred: jinja2 is an optional extra, imported only where used
    import jinja2
    from jinja2 import meta

    names: set[str] = set()
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        template = getattr(config, key, None)
        if isinstance(template, str) and "{" in template:
            names |= meta.find_undeclared_variables(jinja2.Environment().parse(template))
    return names


def _data_files(task_manager, name: str) -> str:
    """The local file(s) a task's YAML points at, for messages."""
    # deferred: lm_eval is an optional extra, imported only where used
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = task_manager.task_index.get(name)
    try:
        config = load_yaml(entry.yaml_path, resolve_func=False) if entry is not None else {}
    except Exception:  # only for the message: the run itself reports an unreadable YAML
        config = {}
    files = (config.get("dataset_kwargs") or {}).get("data_files") or {}
    return (
        ", ".join(map(str, files.values() if isinstance(files, dict) else [files]))
        or f"the data of {name}"
    )


def _first_row(task_manager, name: str) -> dict | None:
    """The first row of a task's local JSONL file, if it has one that reads."""
    first = _data_files(task_manager, name).split(", ")[0]
    try:
        with open(first, encoding="utf-8") as f:
            row = json.loads(f.readline())
        return row if isinstance(row, dict) else None
    except (OSError, ValueError):
        return None


def _render_rows(task, limit: int | None) -> None:
    """What lm-eval does with each of the rows it will read: text, target and (multiple choice)
    the choices. A field the templates name that a row holds as null (JSON rows with fewer keys
    than others load that way) counts as missing: it would render as "None"."""
    docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
    named = set() if getattr(task.config, "process_docs", None) else _template_fields(task.config)
    for row, doc in enumerate(docs or []):
        if limit is not None and row >= limit:
            break
        try:
            nulls = sorted(f for f in named if f in doc and doc[f] is None)
            if nulls:
                raise KeyError(nulls[0])
            task.doc_to_text(doc)
            task.doc_to_target(doc)
            if task.OUTPUT_TYPE == "multiple_choice":
                task.doc_to_choice(doc)
        except Exception as exc:
            exc.slowqk_row, exc.slowqk_task = (row + 1, doc), task
            raise


def check_task_data(task_manager, chosen: list[str], limit: int | None = None) -> None:
    """Build each chosen task and render the rows lm-eval will read (the first ``limit``) the
    way it will, before it runs: a file without the task's fields is one
    :class:`TaskDataError` naming the file, the task and the fields."""
    # deferred: lm_eval is an optional extra, imported only where used
    from lm_eval.tasks import get_task_dict

    for name in chosen:
        try:
            for task in _leaf_tasks(get_task_dict([name], task_manager)):
                _render_rows(task, limit)
        except Exception as exc:
            row, doc = getattr(exc, "slowqk_row", (None, _first_row(task_manager, name)))
            field = _missing_field(exc)
            # a task function that met a null field (a key other rows have) fails on None
            nulls = {k for k, v in doc.items() if v is None} if row and doc else set()
            if field is None and not nulls:
                raise
            fields = {field} - {None} | nulls
            config = getattr(getattr(exc, "slowqk_task", None), "config", None)
            if doc is not None and config is not None and not getattr(config, "process_docs", None):
                fields |= _template_fields(config) - set(doc)
            which = f"row {row} lacks" if row else "its rows lack"
            held = sorted(str(k) for k, v in (doc or {}).items() if v is not None)
            has = f" (the row has {', '.join(held)})" if doc is not None else ""
            raise TaskDataError(
                f"{_data_files(task_manager, name)}: task {name!r}: {which} the field(s) "
                f"{', '.join(repr(f) for f in sorted(fields))} it reads{has}"
            ) from None


def _primary(metrics: dict[str, float]) -> tuple[str, float] | None:
    for name in PRIMARY:
        if name in metrics:
            return name, metrics[name]
    return None


def _failed_line(exc: BaseException) -> str:
    """The source line that raised ``exc`` (an ``assert`` carries no message)."""
    tb = traceback.extract_tb(exc.__traceback__)
    return tb[-1].line or "" if tb else ""


@contextlib.contextmanager
def _quiet_git_probe():
    """lm-eval records the working directory's git commit, letting git print "fatal: not a git
    repository" to the terminal outside a checkout: the same probe, with git's stderr kept."""
    import lm_eval.evaluator as evaluator  # deferred: lm_eval is an optional extra

    def probe() -> str | None:
        try:
            proc = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True)
        except FileNotFoundError:
            return None
        return proc.stdout.strip() or None

    original = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = probe
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def evaluate(
    model_dir: str | Path,
    out: str | Path,
    *,
    tasks: list[str] | None = None,
    eval_data: str | Path | None = None,
    corpus: str | Path | None = None,
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Run lm-eval on ``model_dir`` (a Hugging Face directory) and write ``out`` (JSON)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # deferred: lm_eval is an optional extra, imported only where used
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # deferred: transformers is an optional extra
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its "Loading weights" bar would sit among our lines

    model_dir, out = Path(model_dir), Path(out)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    task_dir = out.parent / (out.stem + "_tasks")
    eval_dir = Path(eval_data) if eval_data else None
    lm_eval_log = logging.getLogger(
        "lm_eval"
    )  # task-override notices, per-example "Truncating ..."
    level = lm_eval_log.level
    lm_eval_log.setLevel(logging.ERROR)
    try:
        available = write_tasks(task_dir, eval_dir, Path(corpus) if corpus else None)
        extra = [str(include_path)] if include_path else []
        registry = None  # lm-eval's task index (and the user's directory): built once, when needed
        chosen = []
        for t in tasks or available:
            if t in available or f"{t}_local" in available:
                chosen.append(t if t in available else f"{t}_local")
                continue
            registry = registry or TaskManager(include_path=extra or None)
            if extra and str(getattr(registry.task_index.get(t), "yaml_path", "")).startswith(
                str(include_path)
            ):
                chosen.append(t)  # from the user's own task directory
            else:
                chosen.append(write_registry_task(task_dir, eval_dir, t, registry))
        manager = TaskManager(include_path=[str(task_dir), *extra])
        check_task_data(manager, chosen, limit)
        lm = HFLM(
            pretrained=str(model_dir),
            dtype="float32",
            max_length=max_length,
            batch_size=batch_size,
            device="cpu",
        )
        raw: dict[str, dict] = {"results": {}, "n-samples": {}}
        skipped = {}
        for task in chosen:  # one by one: a task whose answers do not fit is skipped, not fatal
            try:
                with _quiet_git_probe():
                    one = simple_evaluate(
                        model=lm, tasks=[task], task_manager=manager, limit=limit, log_samples=False
                    )
            except AssertionError as exc:  # lm-eval's check that an answer fits the context
                if "max_length" not in _failed_line(exc):
                    raise
                skipped[task] = (
                    f"an answer is longer than the model's context of {lm.max_length} tokens"
                )
                continue
            for key in raw:
                raw[key].update(one.get(key, {}))
    finally:
        lm_eval_log.setLevel(level)
    if not raw["results"]:
        raise ValueError(
            f"{model_dir}: no task could be scored ({'; '.join(skipped.values())}); set "
            "--max-length or choose other --tasks"
        )
    for task, why in skipped.items():
        log.warning(
            "%s: skipped: %s (--max-length N sets a longer one; a model with learned positions "
            "cannot go past its own)",
            task,
            why,
        )
    results: dict[str, dict[str, float]] = {}
    for task, metrics in raw["results"].items():
        clean = {}
        for key, value in metrics.items():
            name, _, _filter = key.partition(",")
            if (
                isinstance(value, int | float)
                and not name.endswith("_stderr")
                and name not in ("alias", "sample_len")
            ):
                clean[name] = float(value)
        results[task] = clean
    scores = {t: p[1] for t, m in results.items() if (p := _primary(m))}
    record = {
        "model": str(model_dir),
        "limit": limit,
        "tasks": results,
        "scores": scores,
        "skipped": skipped,
        "primary_metric": {t: p[0] for t, m in results.items() if (p := _primary(m))},
        "n_samples": {
            t: v.get("effective", v.get("original")) for t, v in raw.get("n-samples", {}).items()
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out)
    return record


def _column_label(path: str) -> str:
    """A results file by what it scored: ``run/hf/eval_results.json`` -> ``run/hf``."""
    p = Path(path)
    return (
        str(Path(p.parent.parent.name) / p.parent.name) if p.name == "eval_results.json" else p.stem
    )


def format_results(records: dict[str, dict]) -> str:
    """Side-by-side table of one or more result files (columns: runs; rows: task/metric)."""
    rows = sorted({(t, m) for r in records.values() for t, ms in r["tasks"].items() for m in ms})
    names = list(records)
    width = max([len("task / metric")] + [len(f"{t} / {m}") for t, m in rows])
    head = f"{'task / metric':<{width}}" + "".join(f"{_column_label(n)[-18:]:>20}" for n in names)
    lines = [head, "-" * len(head)]
    for t, m in rows:
        cells = []
        for n in names:
            v = records[n]["tasks"].get(t, {}).get(m)
            missing = v is None or (isinstance(v, float) and math.isnan(v))
            cells.append(f"{'-' if missing else f'{v:.4f}':>20}")
        lines.append(f"{t + ' / ' + m:<{width}}" + "".join(cells))
    return "\n".join(lines)
