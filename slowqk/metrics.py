"""Metrics to a JSONL file and TensorBoard (rank 0 only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsWriter:
    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool = True) -> None:
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - closed in close()
        if tensorboard:
            # deferred: torch is slow to import, and only this path needs it
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    @property
    def tensorboard(self):
        """The TensorBoard SummaryWriter (None when off or on a non-writing rank)."""
        return self._tb

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, int | float):
                    self._tb.add_scalar(k, v, step)
                elif isinstance(v, dict):  # e.g. qk_release: its numbers as qk_release/<field>
                    for sub, x in v.items():
                        if isinstance(x, int | float) and not isinstance(x, bool):
                            self._tb.add_scalar(f"{k}/{sub}", x, step)

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (a resume repeats them); keeps logging after."""
        if not self.enabled:
            return
        self._jsonl.close()
        path = Path(self._jsonl.name)
        truncate_after(path, step)
        self._jsonl = open(path, "a", buffering=1)  # noqa: SIM115 - closed in close()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def truncate_after(path: Path, step: int) -> None:
    """Drop a JSONL log's records of steps after ``step`` (a resume repeats them), atomically."""
    if not path.is_file():
        return
    keep = [
        ln
        for ln in path.read_text().splitlines()
        if ln.strip() and json.loads(ln).get("step", 0) <= step
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    tmp.replace(path)
