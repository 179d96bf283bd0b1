import sys
from pathlib import Path

# tests import their helpers (multiproc, megatron_harness, reference_model) by module name
sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
