import os
import sys
from pathlib import Path

import pytest

import slowqk  # noqa: F401 - first: its import-time shims must precede megatron-core's import

# tests import their helpers (multiproc, megatron_harness, reference_model) by module name
sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parent.parent
# ../shared beside the checkout (as in CI), or wherever SLOWQK_SHARED_DIR points
SHARED = Path(os.environ.get("SLOWQK_SHARED_DIR", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> str:
    """Sharded dataset (400-token tokenizer inside) from the first 3000 lines of tiny Shakespeare,
    shared by the multi-process tests (they only read it; caches go to each run directory)."""
    from slowqk.data.corpus import prepare_corpus

    root = tmp_path_factory.mktemp("small_dataset")
    small = root / "corpus.txt"
    small.write_text(
        "".join(
            (SHARED / "data" / "tinyshakespeare" / "input.txt").read_text().splitlines(True)[:3000]
        )
    )
    return str(prepare_corpus(small, root / "prepared", vocab_size=400).dataset_dir)


CPU_IMAGE = "localhost/slowqk:cpu-test"


@pytest.fixture(scope="session")
def cpu_image() -> dict:
    """The CPU image built from this checkout with podman (docker/build_cpu_image.sh; layers
    cached between runs); skips with the reason where podman is missing or cannot run here."""
    import shutil
    import subprocess

    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (apt-get install podman runc mmdebstrap)")
    env = {**os.environ, "CONTAINERS_CONF": str(REPO / "docker" / "containers.conf")}
    probe = subprocess.run(
        ["podman", "run", "--rm", "--help"], env=env, capture_output=True, text=True
    )
    if probe.returncode:
        pytest.skip(f"podman cannot run here: {probe.stderr.strip()[:200]}")
    build = subprocess.run(
        ["bash", str(REPO / "docker" / "build_cpu_image.sh"), CPU_IMAGE],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if build.returncode and "namespace" in build.stderr.lower():
        pytest.skip(f"user namespaces refused: {build.stderr.strip()[-200:]}")
    assert build.returncode == 0, build.stderr[-3000:]
    print(build.stdout.strip())  # the image's size and build time
    return {"env": env, "tag": CPU_IMAGE, "report": build.stdout.strip()}


def small_run_overrides(dataset: str, out: Path, **extra) -> list[str]:
    """``key=value`` overrides of tiny/gpt for a 2-layer run on ``dataset`` with the adaptive Q/K
    release (``extra`` replaces or adds keys)."""
    base = {
        "out_dir": str(out),
        "data.corpus": "null",
        "data.dataset": dataset,
        "model.num_layers": 2,
        "model.hidden_size": 64,
        "model.num_attention_heads": 4,
        "model.seq_length": 32,
        "train.steps": 6,
        "train.micro_batch_size": 2,
        "train.global_batch_size": 8,
        "train.log_interval": 1,
        "train.eval_interval": 3,
        "train.eval_iters": 1,
        "train.tensorboard": "false",
        "train.progress_bar": "false",
        "optimizer.warmup_steps": 2,
        "qk.enabled": "true",
        "qk.unit": "steps",
        "qk.ramp": 2,
        "qk.release": "adaptive",
        "qk.adaptive.min_hold": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def two_layer_overrides(dataset: str, out: Path | str, steps: int, **extra) -> list[str]:
    """``key=value`` overrides of tiny/gpt for a plain 2-layer run (2 micro-batches of 4 x 32, no
    Q/K slowdown, no TensorBoard or progress bar) on ``dataset``; ``extra`` replaces or adds
    keys."""
    base = {
        "model.num_layers": 2,
        "model.hidden_size": 64,
        "model.seq_length": 32,
        "data.corpus": "null",
        "data.dataset": dataset,
        "out_dir": str(out),
        "train.steps": steps,
        "train.micro_batch_size": 4,
        "train.global_batch_size": 8,
        "train.tensorboard": "false",
        "train.progress_bar": "false",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


# The longest files first: with two xdist workers taking whole files in collection order, a long
# file picked up last would run alone at the end.
LONGEST_FIRST = [
    "test_hf.py",
    "test_faults.py",
    "test_slurm_multinode.py",
    "test_slurm.py",
    "test_diagnostics.py",
    "test_deepspeed.py",
    "test_training.py",
    "test_attention.py",
    "test_release.py",
]


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order inside each file stays as written


# ----------------------------------------------------------------------------- fault-case table
# Fault tests record what they injected and what happened; `pytest --fault-table
# docs/fault-cases.md`
# writes the table (so the document is produced by the suite, never by hand).

_FAULT_ROWS: list[dict] = []


def pytest_addoption(parser):
    parser.addoption(
        "--fault-table", default=None, help="write the fault-case table (Markdown) here"
    )


@pytest.fixture
def fault_record(request):
    def record(case: str, injected: str, expected: str, observed: str) -> None:
        _FAULT_ROWS.append(
            {
                "test": request.node.name,
                "case": case,
                "injected": injected,
                "expected": expected,
                "observed": observed,
            }
        )

    return record


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--fault-table")
    if not path or not _FAULT_ROWS:
        return
    failed = {
        r.nodeid.split("::")[-1]
        for r in session.config.pluginmanager.get_plugin("terminalreporter").stats.get("failed", [])
    }
    lines = [
        "# Fault cases",
        "",
        "Generated by `pytest tests/test_faults.py tests/test_damage_property.py --fault-table "
        "docs/fault-cases.md`; do not edit by hand.",
        "",
        "| case | injected | expected | observed | result |",
        "|---|---|---|---|---|",
    ]
    for r in _FAULT_ROWS:
        result = "FAIL" if r["test"] in failed else "pass"
        lines.append(
            f"| {r['case']} | {r['injected']} | {r['expected']} | {r['observed']} | {result} |"
        )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")
