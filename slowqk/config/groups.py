"""The learning-rate groups a recipe asks for, in its own terms: labels, the layers a selection
names, and which parts of which layers each group covers (``qk:`` counts as one group)."""

from __future__ import annotations

from slowqk.config.schema import LayerSelection, LRGroupConfig, Recipe
from slowqk.qk.parts import MODEL_PARTS, atoms, layer_elements, model_elements
from slowqk.qk.selection import select_layers


def group_label(group: LRGroupConfig, num_layers: int) -> str:
    """A group's name: its own, or its params and layers (``v@2-3``, ``q+k@0,2``, ``embedding``)."""
    if group.name:
        return group.name
    label = "+".join(group.params)
    layer_parts = [p for p in group.params if p not in ("embedding", "output")]
    if layer_parts and group.layers is not None:
        layers = resolve_layers(group.layers, num_layers)
        if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 1:
            label += f"@{layers[0]}-{layers[-1]}"
        else:
            label += "@" + ",".join(map(str, layers))
    return label


def resolve_layers(sel: LayerSelection | None, num_layers: int) -> list[int]:
    """0-based indices a layer selection names; ``None`` is every layer."""
    if sel is None:
        return list(range(num_layers))

    return select_layers(
        num_layers, top=sel.top, top_fraction=sel.top_fraction, indices=sel.indices
    )


def group_coverage(recipe: Recipe) -> list[tuple[str, str, dict[int | None, set[str]]]]:
    """``(key, label, {layer or None: atoms})`` for ``qk`` (when enabled) and every ``lr_groups``
    entry whose layers are valid; ``None`` is the model (embedding, output)."""
    m = recipe.model
    gated = m.ffn == "swiglu"
    out = []
    entries: list[tuple[str, str, list[str], LayerSelection | None]] = []
    if recipe.qk.enabled:
        entries.append(("qk", "qk", ["q", "k"], recipe.qk.layers))
    for i, g in enumerate(recipe.lr_groups):
        try:
            label = group_label(g, m.num_layers)
        except ValueError:
            continue  # reported with the entry's layers
        entries.append((f"lr_groups.{i}", label, list(g.params), g.layers))
    for key, label, parts, sel in entries:
        try:
            layers = resolve_layers(sel, m.num_layers)
        except ValueError:
            continue  # reported with the section's layers
        cover: dict[int | None, set[str]] = {}
        for part in parts:
            for layer in [None] if part in MODEL_PARTS else layers:
                cover.setdefault(layer, set()).update(atoms(part, gated))
        out.append((key, label, cover))
    return out


def element_counts(recipe: Recipe, vocab_rows: int) -> dict[str, dict[int | None, int]]:
    """``{group label: {layer (None = the model): elements}}`` for ``qk`` and every ``lr_groups``
    entry (over all TP ranks; a tied last stage's copy of the embedding not counted again)."""
    m = recipe.model
    out = {}
    for _key, label, cover in group_coverage(recipe):
        out[label] = {
            layer: sum(
                model_elements(a, m, vocab_rows) if layer is None else layer_elements(a, m)
                for a in atoms_
            )
            for layer, atoms_ in sorted(cover.items(), key=_layer_order)
        }
    return out


def _layer_order(item) -> tuple[bool, int]:
    return item[0] is None, item[0] or 0
