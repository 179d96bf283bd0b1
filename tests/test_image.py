"""The CPU image, built from this checkout with podman and run as users run it: the entrypoint,
training as the image's unprivileged user with the data read-only and the runs writable, a
two-process data-parallel run through ``slowqk launch``, ``export-hf``, nothing written outside
the runs mount, and the versions inside the image checked against the pins.

Skipped, with the reason, where podman is missing or cannot run containers here.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import REPO, SHARED

CORPUS = SHARED / "data" / "tinyshakespeare" / "input.txt"
STEPS = 20

# directories podman itself touches in every container: the mount points of hosts, hostname and
# resolv.conf (/tmp is a tmpfs: what is written there never reaches the image)
TRANSIENT_DIRS = {"/etc", "/run", "/tmp"}

pytestmark = pytest.mark.slow


def _podman(env, *args, check=True, timeout=900) -> subprocess.CompletedProcess:
    done = subprocess.run(
        ["podman", *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and done.returncode:
        what = " ".join(args)
        raise AssertionError(f"podman {what}: rc {done.returncode}\n{done.stderr[-3000:]}")
    return done


@pytest.fixture(scope="module")
def image(cpu_image, tmp_path_factory) -> dict:
    data = tmp_path_factory.mktemp("data")
    (data / "corpus.txt").write_text("".join(CORPUS.read_text().splitlines(True)[:3000]))
    data.chmod(0o755)  # readable by the image's user
    (data / "corpus.txt").chmod(0o644)
    return {**cpu_image, "data": data}


def _runs_dir(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o777)  # the image's user (uid 1000) writes here
    return runs


def _run(image: dict, runs: Path, *args: str):
    """``launch/docker_run.sh`` with podman: the data read-only, the runs writable; returns the
    process and what the container changed outside its mounts."""
    name = f"slowqk-test-{uuid.uuid4().hex[:8]}"
    runner = REPO / "launch" / "docker_run.sh"
    done = subprocess.run(
        [
            "bash",
            str(runner),
            "--engine",
            "podman",
            "--image",
            image["tag"],
            "--data",
            str(image["data"]),
            "--runs",
            str(runs),
            "--name",
            name,
            "--keep",
            "--",
            *args,
        ],
        env=image["env"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    diff = json.loads(_podman(image["env"], "diff", "--format", "json", name).stdout or "{}")
    _podman(image["env"], "rm", name)
    # anything added or deleted is left behind; a changed directory with nothing added in it
    # only had podman's own mount points (hosts, hostname, resolv.conf: /etc, /run)
    changed = diff.get("added", []) + diff.get("deleted", [])
    changed += [c for c in diff.get("changed", []) if c not in TRANSIENT_DIRS]
    return done, changed


def _train_args(out: str, steps: int = STEPS) -> list[str]:
    return [
        f"out_dir={out}",
        "data.corpus=/workspace/data/corpus.txt",
        "data.tokenizer_vocab_size=384",
        "model.num_layers=2",
        f"train.steps={steps}",
        "train.eval_interval=10",
        "train.save_interval=10",
        "train.progress_bar=false",
        "train.tensorboard=false",
    ]


def test_the_entrypoint_is_slowqk(image) -> None:
    done = _podman(image["env"], "run", "--rm", image["tag"])  # CMD: --help
    assert done.stdout.startswith("usage: slowqk"), done.stdout[:300]


def test_versions_inside_the_image_are_the_pins(image) -> None:
    text = (REPO / "docker" / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
    pins = {
        "megatron-core": "MEGATRON_CORE_VERSION",
        "deepspeed": "DEEPSPEED_VERSION",
        "lm-eval": "LM_EVAL_VERSION",
        "transformers": "TRANSFORMERS_VERSION",
        "transformer-engine": "TRANSFORMER_ENGINE_VERSION",
    }
    check = [f"{name}=={args[arg]}" for name, arg in pins.items()]
    done = _podman(
        image["env"],
        "run",
        "--rm",
        "--entrypoint",
        "python",
        image["tag"],
        "/opt/slowqk/docker/check_image.py",
        "--variant",
        "cpu",
        *check,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"torch {args['TORCH_VERSION']}" in done.stdout, done.stdout
    for name, arg in pins.items():
        if name != "transformer-engine":
            assert f"{name} {args[arg]} (pin {args[arg]}" in done.stdout, done.stdout
    # the build refuses what would replace the base's torch, naming the package
    swap = _podman(
        image["env"],
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "pip",
        image["tag"],
        "install",
        "--no-index",
        "--dry-run",
        "torch==2.0.0",
        check=False,
    )
    assert swap.returncode != 0 and "torch" in swap.stderr, swap.stderr[-1000:]


def test_trains_as_its_user_and_writes_only_the_runs_mount(image, tmp_path) -> None:
    runs = _runs_dir(tmp_path)
    done, changed = _run(image, runs, "train", "tiny/gpt", *_train_args("/workspace/runs/one"))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((runs / "one" / "summary.json").read_text())
    assert summary["steps"] == STEPS
    owners = {p.stat().st_uid for p in (runs / "one").rglob("*")}
    assert owners == {1000}, owners  # written by the image's user, not root
    assert changed == [], f"written outside the runs mount: {changed}"
    # the same run on the host, same machine and wheels: the same validation loss, bitwise
    host = subprocess.run(
        [
            str(REPO / ".venv" / "bin" / "python"),
            "-m",
            "slowqk.cli",
            "train",
            "tiny/gpt",
            *_train_args(str(tmp_path / "host")),
            f"data.corpus={image['data'] / 'corpus.txt'}",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert host.returncode == 0, host.stderr[-3000:]
    theirs = json.loads((tmp_path / "host" / "summary.json").read_text())
    assert summary["final_val_loss"] == theirs["final_val_loss"]


def test_data_parallel_launch_then_export_hf(image, tmp_path) -> None:
    runs = _runs_dir(tmp_path)
    done, changed = _run(
        image,
        runs,
        "launch",
        "tiny/gpt",
        "--nproc",
        "2",
        *_train_args("/workspace/runs/dp", steps=10),
        "train.global_batch_size=16",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world 2 = TP 1 x PP 1 x DP 2" in done.stderr, done.stderr[-2000:]
    assert json.loads((runs / "dp" / "summary.json").read_text())["steps"] == 10
    assert changed == [], f"written outside the runs mount: {changed}"
    done, changed = _run(image, runs, "export-hf", "/workspace/runs/dp", "/workspace/runs/hf")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (runs / "hf" / "config.json").is_file()
    assert list((runs / "hf").glob("*.safetensors"))
    assert changed == [], f"written outside the runs mount: {changed}"
