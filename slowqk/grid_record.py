"""A grid directory's record, ``grid.json``: the grid as run and every run's recipe, overrides and
folder (written by ``experiment run`` / ``submit``, read by ``summarize``, ``status`` and
``reproduce``)."""

from __future__ import annotations

import json
from pathlib import Path

RECORD = "grid.json"


def read_record(grid_dir: str | Path) -> dict:
    """The record of ``grid_dir``; one line naming the file where there is none."""
    path = Path(grid_dir) / RECORD
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not a grid directory (run `slowqk experiment run` or `submit` first)"
        )
    return json.loads(path.read_text())
