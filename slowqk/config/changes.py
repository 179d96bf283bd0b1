"""Which recipe changes a resume may take: the fields that do not alter what is computed, and the
``key: old -> new`` list of those that do."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class RecipeChangedError(ValueError):
    """A resume refused: the recipe or layout changed in a way the checkpoint cannot take."""


# Recipe fields that may change when a run resumes: they do not alter what is computed.
RESUME_SAFE_PREFIXES = (
    "name",
    "out_dir",
    "parallel.",
    "train.log_interval",
    "train.eval_interval",
    "train.eval_iters",
    "train.eval_at_start",
    "train.stop_check_interval",
    "train.save_interval",
    "train.keep_last",
    "train.keep_every",
    "train.progress_bar",
    "train.tensorboard",
    "train.on_nonfinite",
    "train.max_consecutive_skips",
    "diagnostics.",
    "model.attention_backend",
    "train.fused_kernels",  # the same math through other kernels
    "train.compile",
    "train.recompute.",  # the same arithmetic, other activations kept
    "data.verify",
    "train.dist_timeout",
)


# Paths compared by where they lead: a corpus named `../shared/...` then and `/abs/shared/...` now
# (as `${shared}` expands) is the same input.
PATH_KEYS = ("data.corpus", "data.tokenizer", "data.dataset")


def _same_place(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same_place, a, b))
    if isinstance(a, str) and isinstance(b, str):
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# Keys of list entries added since, with the default that computes what older code did
ADDED_ENTRY_KEYS = {"lr_groups": {"rule": "schedule"}}


def _with_added_defaults(recipe: dict) -> dict:
    out = dict(recipe)
    for section, defaults in ADDED_ENTRY_KEYS.items():
        if isinstance(out.get(section), list):
            out[section] = [{**defaults, **entry} for entry in out[section]]
    return out


def run_altering_changes(saved: dict, current: dict) -> list[str]:
    """``key: old -> new`` for each change between two recipe dumps that alters the run."""
    a, b = _flatten(_with_added_defaults(saved)), _flatten(current)
    changes = []
    for key in sorted(a.keys() | b.keys()):
        if key not in a and b[key] in (
            [],
            False,
        ):  # added since, at its off default (lr_groups, qk_norm)
            continue
        if key in PATH_KEYS and _same_place(a.get(key), b.get(key)):
            continue
        if a.get(key) != b.get(key) and not key.startswith(RESUME_SAFE_PREFIXES):
            changes.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return changes
