import os
import sys
from pathlib import Path

# tests import their helpers (multiproc, megatron_harness, reference_model) by module name
sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parent.parent
# ../shared beside the checkout (as in CI), or wherever SLOWQK_SHARED_DIR points
SHARED = Path(os.environ.get("SLOWQK_SHARED_DIR", REPO.parent / "shared"))
