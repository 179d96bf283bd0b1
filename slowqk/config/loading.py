"""Loading a recipe: YAML files with ``base:`` inheritance, ``key.sub=value`` overrides, and
validation whose every error names the key, the value it got, what is allowed and where the value
came from (the file or the override), raised as :class:`RecipeError` so the CLI prints one line."""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from slowqk.config.checks import recipe_problems
from slowqk.config.schema import Recipe, RecipeError

# A wheel ships the recipes inside the package (slowqk/recipes); a checkout has them at the top
# level.
_PACKAGE = Path(__file__).resolve().parent.parent
RECIPES_DIR = (
    _PACKAGE / "recipes" if (_PACKAGE / "recipes").is_dir() else _PACKAGE.parent / "recipes"
)


SHARED = "${shared}"  # in a recipe or override: the shared data folder


def shared_dir() -> Path:
    """The shared data folder: ``SLOWQK_SHARED_DIR``, else ``shared/`` beside the checkout."""
    default = _PACKAGE.parent.parent / "shared"
    return Path(os.environ.get("SLOWQK_SHARED_DIR", default)).resolve()


def _expand_shared(value: Any) -> Any:
    """``${shared}`` replaced in every string of a recipe (so a bundled corpus is found from
    any directory); other relative paths stay relative to the working directory."""
    if isinstance(value, str) and SHARED in value:
        return value.replace(SHARED, str(shared_dir()))
    if isinstance(value, dict):
        return {k: _expand_shared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_shared(v) for v in value]
    return value


def _origin(source: str, overrides: list[str]) -> Callable[[str], str]:
    """Where a key's value came from: the override that set it (or a part of it), else the file."""
    keys = {".".join(parse_override(text)[0]): text for text in overrides}

    def origin(key: str) -> str:
        for k, text in reversed(keys.items()):  # the last override of a key wins, as when applied
            if key == k or key.startswith(k + ".") or k.startswith(key + "."):
                return f"override {text!r}"
        return source

    return origin


def _format_validation_error(err: ValidationError, origin: Callable[[str], str]) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<recipe>"
        shown = repr(key)  # quoted, with newlines and other control characters escaped
        where = origin(key)
        if e["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key {shown}{_suggest(e['loc'])}")
            continue
        msg = (
            e["msg"]
            .removeprefix("Value error, ")
            .removeprefix("Input should be ")
            .replace("\n", " ")
        )
        got = e.get("input")
        if e["type"] == "missing":
            lines.append(f"{where}: missing required key {shown}")
        elif isinstance(got, dict):
            lines.append(f"{where}: key {shown}: {msg}")
        else:
            lines.append(f"{where}: key {shown}: got {got!r}; expected {msg}")
    return "; ".join(lines)  # one line, whatever the number of problems


def _suggest(loc: tuple) -> str:
    """Closest valid key name at the same nesting level, if one is close."""
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            return ""
        if not issubclass(field.annotation, BaseModel):
            return ""
        model = field.annotation
    allowed = sorted(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{hint}; allowed: {', '.join(allowed)}"


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError(f"override {text!r}: empty key component in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise RecipeError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return parts, value


# A recipe reads one data source; what comes with a source (its tokenizer, validation prefixes,
# blend weights) goes with it when a later layer (a child recipe, an override) names another.
DATA_SOURCES = ("dataset", "corpus", "train_prefixes")
DATA_WITH_SOURCE = ("tokenizer", "valid_prefixes", "train_weights")


def replace_data_source(section: dict, named: set[str]) -> dict:
    """``section`` (a recipe's ``data``) without the source keys and their companions that
    ``named`` (the keys a later layer sets) does not name, when ``named`` names a source."""
    if not named & set(DATA_SOURCES):
        return section
    return {
        k: v for k, v in section.items() if k in named or k not in DATA_SOURCES + DATA_WITH_SOURCE
    }


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    named = set()
    for text in overrides:
        parts, value = parse_override(text)
        if len(parts) == 2 and parts[0] == "data" and value not in (None, []):
            named.add(parts[1])
    if named & set(DATA_SOURCES) and isinstance(data.get("data"), dict):
        data["data"] = replace_data_source(data["data"], named)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise RecipeError(
                    f"override {text!r}: '{'.'.join(parts[: i + 1])}' is a value, not a section"
                )
            node = child
        node[parts[-1]] = value
    return data


def resolve_recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    candidates = [path, RECIPES_DIR / path, RECIPES_DIR / f"{name_or_path}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    raise RecipeError(
        f"recipe {name_or_path!r} not found; known recipes: {', '.join(known_recipes())}"
    )


def known_recipes() -> list[str]:
    """Names of the bundled recipes (experiment grids, which sit beside them, are not recipes)."""
    names = []
    for p in sorted(RECIPES_DIR.rglob("*.yaml")):
        data = yaml.safe_load(p.read_text()) or {}
        if isinstance(data, dict) and "arms" not in data:
            names.append(str(p.relative_to(RECIPES_DIR).with_suffix("")))
    return names


def load_recipe_dict(name_or_path: str) -> tuple[dict, str]:
    path = resolve_recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is not None:  # single inheritance: `base: tiny/gpt` then deep-merge this file on top
        parent, _ = load_recipe_dict(str(base))
        data = _deep_merge(parent, data)
    return data, str(path)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    if isinstance(top.get("data"), dict) and isinstance(out.get("data"), dict):
        named = {k for k, v in top["data"].items() if v not in (None, [])}
        out["data"] = replace_data_source(out["data"], named)
    for k, v in top.items():
        out[k] = (
            _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def build_recipe(
    data: dict, source: str = "<recipe>", overrides: list[str] | None = None
) -> Recipe:
    """Validate ``data``; errors name the key and where its value came from (``source`` or the
    override among ``overrides`` that set it)."""
    origin = _origin(source, list(overrides or []))
    try:
        recipe = Recipe.model_validate(_expand_shared(data))
    except ValidationError as err:
        raise RecipeError(_format_validation_error(err, origin)) from None
    problems = recipe_problems(recipe)
    if problems:
        raise RecipeError("; ".join(f"{origin(key)}: key {key!r}: {msg}" for key, msg in problems))
    return recipe


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    data, source = load_recipe_dict(name_or_path)
    data = apply_overrides(data, list(overrides or []))
    return build_recipe(data, source, overrides)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
