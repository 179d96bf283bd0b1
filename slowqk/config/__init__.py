"""Recipes: the schema (:mod:`~slowqk.config.schema`), loading with overrides
(:mod:`~slowqk.config.loading`), the checks across fields (:mod:`~slowqk.config.checks`), the
learning-rate groups a recipe names (:mod:`~slowqk.config.groups`) and the changes a resume may
take (:mod:`~slowqk.config.changes`). What the rest of the package uses is re-exported here."""

from slowqk.config.changes import (
    RESUME_SAFE_PREFIXES,
    RecipeChangedError,
    run_altering_changes,
)
from slowqk.config.checks import recipe_problems
from slowqk.config.groups import element_counts, group_coverage, group_label, resolve_layers
from slowqk.config.layout import RecomputeConfig
from slowqk.config.loading import (
    RECIPES_DIR,
    apply_overrides,
    build_recipe,
    known_recipes,
    load_recipe,
    load_recipe_dict,
    parse_override,
    recipe_to_yaml,
    resolve_recipe_path,
    shared_dir,
)
from slowqk.config.schema import (
    AdaptiveReleaseConfig,
    DataConfig,
    DiagnosticsConfig,
    LayerSelection,
    LRGroupConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    PartName,
    QKConfig,
    Recipe,
    RecipeError,
    StrictSection,
    TrainConfig,
    architecture,
    padded_vocab_size,
)

__all__ = [
    "RECIPES_DIR",
    "RESUME_SAFE_PREFIXES",
    "AdaptiveReleaseConfig",
    "DataConfig",
    "DiagnosticsConfig",
    "LRGroupConfig",
    "LayerSelection",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "PartName",
    "QKConfig",
    "Recipe",
    "RecomputeConfig",
    "RecipeChangedError",
    "RecipeError",
    "StrictSection",
    "TrainConfig",
    "apply_overrides",
    "architecture",
    "build_recipe",
    "element_counts",
    "group_coverage",
    "group_label",
    "known_recipes",
    "load_recipe",
    "load_recipe_dict",
    "padded_vocab_size",
    "parse_override",
    "recipe_problems",
    "recipe_to_yaml",
    "resolve_layers",
    "resolve_recipe_path",
    "shared_dir",
    "run_altering_changes",
]
