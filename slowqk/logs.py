"""The command line's log: slowqk's own lines on stderr in one format, with the rank in front when
several ranks run. Level: ``--log-level`` (passed on to child processes through
``SLOWQK_LOG_LEVEL``), else INFO on rank 0 and WARNING on the other ranks (which would repeat
rank 0's lines); ``--quiet`` keeps only warnings."""

from __future__ import annotations

import logging
import os
import sys

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ENV = "SLOWQK_LOG_LEVEL"


def configure_logging(level: str | None = None, quiet: bool = False) -> str:
    """Set up the ``slowqk`` logger for this process; the level it got."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    inherited = os.environ.get(ENV, "").upper()  # a parent's --log-level
    level = (
        level
        or (inherited if inherited in LEVELS else None)
        or ("WARNING" if quiet or rank != 0 else "INFO")
    )
    prefix = f"[rank {rank}] " if world > 1 else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(message)s", "%Y-%m-%d %H:%M:%S")
    )
    logger = logging.getLogger("slowqk")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False  # the root logger's handlers (if a caller set any) do not repeat it
    return level
