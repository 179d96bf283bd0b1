"""Parameters and training FLOP per token of each model of a grid (the depth ladder's table).

    python tools/depth_ladder.py [recipes/study/depth.yaml]

Parameters are counted as megatron-core holds them (slowqk.memory.predict.stage_parameters, one
rank); FLOP per token = 6 N + 12 L d T (the matrix products forward and backward, N their weights
including the output layer, plus attention's scores and weighted sum over context T).
"""

from __future__ import annotations

import sys

from slowqk.config import load_recipe
from slowqk.experiments import expand, load_grid
from slowqk.memory.predict import stage_parameters


def ladder(grid_path: str, vocab: int = 2048) -> list[dict]:
    grid = load_grid(grid_path)
    rows, seen = [], set()
    for run in expand(grid):
        if run.variant in seen:
            continue
        seen.add(run.variant)
        recipe = load_recipe(run.recipe, run.overrides)
        m = recipe.model
        params = stage_parameters(recipe, 0, vocab)[0]  # (name, elements), a name per layer
        total = sum(n for _, n in params)
        embedding = sum(n for k, n in params if k.startswith("embedding."))
        word = sum(n for k, n in params if k == "embedding.word_embeddings.weight")
        matmul = sum(
            n
            for k, n in params
            if k.endswith(".weight") and "norm" not in k and "embedding" not in k
        )
        if not any(k == "output_layer.weight" for k, _ in params):
            matmul += word  # tied: the output layer is the embedding
        flop = 6 * matmul + 12 * m.num_layers * m.hidden_size * m.seq_length
        rows.append(
            {
                "variant": run.variant,
                "layers": m.num_layers,
                "width": m.hidden_size,
                "heads": m.num_attention_heads,
                "parameters": total,
                "without_embeddings": total - embedding,
                "flop_per_token": flop,
            }
        )
    return rows


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "recipes/study/depth.yaml"
    print("variant   layers x width  heads  parameters  w/o embeddings  training FLOP/token")
    for r in ladder(path):
        print(
            f"{r['variant']:<9} {r['layers']:>3} x {r['width']:<6}  {r['heads']:>5}  "
            f"{r['parameters'] / 1e6:>9.2f}M  {r['without_embeddings'] / 1e6:>13.2f}M  "
            f"{r['flop_per_token'] / 1e6:>18.2f}M"
        )


if __name__ == "__main__":
    main()
