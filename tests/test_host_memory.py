"""CPU training keeps freed host blocks: a large tensor allocated again reuses the heap's pages
instead of faulting fresh ones in (what glibc's default does the first times round)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, resource, sys
import torch
from slowqk import host_memory

applied = host_memory.keep_freed_blocks() if sys.argv[1] == "keep" else None
faults = []
for mib in (16, 8):  # the second fits in the first's place (an equal size might not: alignment)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(mib * 2**18).fill_(1.0)
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_freed_block_is_reused_without_page_faults() -> None:
    default, kept = _probe("default"), _probe("keep")
    assert kept["applied"] is True
    assert default["faults"][1] > 1000, default  # glibc's default gave the pages back: 2,048 new
    assert kept["faults"][1] < 100, kept  # the first block's pages, from the heap
