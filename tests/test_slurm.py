"""SLURM for real: a one-machine cluster (munged + slurmctld + slurmd on localhost, CPU only) in a
temporary directory; the tiny recipe submitted with 2 tasks through launch/slurm/slowqk.sbatch."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol")


def _find(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_munge(root: Path) -> Path:
    """munged with a fresh key under ``root/munge``; its socket (every daemon and client uses it:
    a Unix socket is reachable from any network namespace)."""
    (root / "munge").chmod(0o700)
    key, sock = root / "munge" / "munge.key", root / "munge" / "munge.socket"
    subprocess.run([_find("mungekey"), "--create", "--keyfile", str(key), "--force"], check=True)
    key.chmod(0o600)
    subprocess.run(
        [
            _find("munged"),
            "--force",
            "--key-file",
            str(key),
            "--socket",
            str(sock),
            "--pid-file",
            str(root / "munge" / "munged.pid"),
            "--log-file",
            str(root / "munge" / "munged.log"),
            "--seed-file",
            str(root / "munge" / "seed"),
        ],
        check=True,
    )
    return sock


def write_slurm_conf(
    root: Path,
    sock: Path,
    controller: str,
    nodes: str,
    ctl_port: int,
    node_port: int,
    extra: str = "",
) -> Path:
    """``root/slurm.conf`` for a throwaway cluster: every daemon's files under ``root`` (per node
    name, so several slurmd can share it), ``nodes`` the NodeName lines."""
    conf = root / "slurm.conf"
    # cred_expire also sets how long a requeued job waits before it may start again (120 s by
    # default); 20 s is still far longer than a step launch takes on one machine
    conf.write_text(f"""ClusterName=slowqktest
SlurmctldHost={controller}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock},cred_expire=20
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldPort={ctl_port}
SlurmdPort={node_port}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MpiDefault=none
{extra}{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
    return conf


def require_slurm() -> None:
    """Skip, saying why, where the throwaway clusters cannot run."""
    missing = [d for d in DAEMONS if _find(d) is None]
    if missing:
        pytest.skip(
            f"Slurm/munge not installed ({', '.join(missing)} missing; apt-get install slurm-wlm "
            "munge)"
        )
    if os.geteuid() != 0:
        pytest.skip("the throwaway Slurm cluster runs its daemons as root")


def stop_daemons(pidfiles) -> None:
    for pidfile in pidfiles:
        if pidfile.is_file():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pidfile.read_text().split()[0]), 15)


def wait_idle(env: dict, nodes: int, log: Path, timeout: float = 60) -> None:
    """Until ``nodes`` nodes are idle; skip with the controller's log if they never are."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True
        ).stdout
        if out.split().count("idle") >= nodes:
            return
        time.sleep(1)
    pytest.skip(f"Slurm did not come up in {timeout:g} s: {log.read_text()[-800:]}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_slurm()
    root = tmp_path_factory.mktemp("slurm")
    for d in ("state", "spool", "log", "munge"):
        (root / d).mkdir()
    sock = start_munge(root)
    host = socket.gethostname().split(".")[0]
    nodes = f"NodeName={host} CPUs={os.cpu_count()} RealMemory=4000 State=UNKNOWN"
    conf = write_slurm_conf(root, sock, host, nodes, _free_port(), _free_port())
    env = {**os.environ, "SLURM_CONF": str(conf)}
    try:
        subprocess.run([_find("slurmctld"), "-f", str(conf)], check=True, env=env)
        subprocess.run([_find("slurmd"), "-f", str(conf)], check=True, env=env)
        wait_idle(env, 1, root / "log" / "slurmctld.log")
        yield {"env": env, "root": root}
    finally:
        stop_daemons(
            (root / f"slurmd-{host}.pid", root / "slurmctld.pid", root / "munge" / "munged.pid")
        )


def slurm_overrides(steps: int, dataset: str, extra: tuple[str, ...] = ()) -> list[str]:
    """The recipe overrides of the submitted runs."""
    return [
        f"train.steps={steps}",
        "data.corpus=null",
        f"data.dataset={dataset}",
        "model.num_layers=2",
        "model.hidden_size=64",
        "model.seq_length=64",
        "train.save_interval=10",
        "train.eval_interval=50",
        "train.eval_iters=1",
        "train.tensorboard=false",
        *extra,
    ]


def _submit(
    cluster,
    workdir: Path,
    job_name: str,
    steps: int,
    dataset: str,
    nodes: int = 1,
    tasks_per_node: int = 2,
    extra: tuple[str, ...] = (),
    env_extra: dict[str, str] | None = None,
    flags: tuple[str, ...] = (),
) -> int:
    env = {**cluster["env"], "SLOWQK_PYTHON": sys.executable, "SLOWQK_REPO": str(REPO)}
    env.update(env_extra or {})
    cmd = [
        sys.executable,
        "-m",
        "slowqk.cli",
        "submit",
        "tiny/gpt",
        "--nodes",
        str(nodes),
        "--tasks-per-node",
        str(tasks_per_node),
        "--cpus-per-task",
        "1",
        "--job-name",
        job_name,
        "--time",
        "15",
        *flags,
        *slurm_overrides(steps, dataset, extra),
    ]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.strip().split()[-1])  # "Submitted batch job N"


def _job_state(cluster, job: int) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", str(job)], env=cluster["env"], capture_output=True, text=True
    ).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _wait(cluster, job: int, timeout: float = 600) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = _job_state(cluster, job)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            return info
        time.sleep(2)
    raise AssertionError(f"job {job} still {info.get('JobState')} after {timeout} s")


def _stop_once_checkpointed(cluster, job: int, run: Path, log: Path) -> tuple[dict, str]:
    """Once the job has a checkpoint, what Slurm's --signal=USR1@N does before the time limit
    (every process of the step gets SIGUSR1); then wait for the job to end. (state, job log)"""
    deadline = time.time() + 300
    while not (run / "checkpoints" / "latest").is_file():  # let it get going
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(1)
    subprocess.run(["scancel", "--signal=USR1", str(job)], env=cluster["env"], check=True)
    info = _wait(cluster, job)
    return info, log.read_text()


def test_sbatch_job_trains_with_two_tasks(cluster, small_dataset, tmp_path) -> None:
    job = _submit(cluster, tmp_path, "sq", 20, small_dataset)
    info = _wait(cluster, job)
    run = tmp_path / "runs" / f"sq-{job}"
    log = (tmp_path / "logs" / f"sq-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log
    assert f"job {job} (restart 0): 2 ranks" in log
    assert (run / "logs" / "rank0.log").is_file() and (run / "logs" / "rank1.log").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000020"
    assert json.loads((run / "summary.json").read_text())["steps"] == 20


def test_preempted_job_checkpoints_requeues_and_resumes(cluster, small_dataset, tmp_path) -> None:
    job = _submit(cluster, tmp_path, "pre", 100, small_dataset)
    run = tmp_path / "runs" / f"pre-{job}"
    info, log = _stop_once_checkpointed(cluster, job, run, tmp_path / "logs" / f"pre-{job}.out")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log)
    assert (
        "ranks checkpointed on a stop signal; requeueing" in log and f"job {job} (restart 1)" in log
    )
    rank0 = (run / "logs" / "rank0.log").read_text()
    assert "stop signal received; checkpoint saved at step" in rank0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 100 and summary["resumed"] is True
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 100  # no step logged twice after the resume


def test_a_job_in_the_image_trains_is_requeued_and_resumes(
    cluster, cpu_image, small_dataset, tmp_path
) -> None:
    """The CPU image through sbatch: without pyxis each task starts the image with podman; a
    stop signal checkpoints, the job requeues and the ranks resume in the container."""
    job = _submit(
        cluster,
        tmp_path,
        "img",
        40,
        small_dataset,
        env_extra={
            "CONTAINERS_CONF": cpu_image["env"]["CONTAINERS_CONF"],
            "SLOWQK_CONTAINER_MOUNTS": str(Path(small_dataset).parent),
        },
        flags=("--container-image", cpu_image["tag"]),
    )
    run = tmp_path / "runs" / f"img-{job}"
    info, log = _stop_once_checkpointed(cluster, job, run, tmp_path / "logs" / f"img-{job}.out")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log)
    assert f"ranks in the image {cpu_image['tag']} (podman)" in log
    assert "requeueing" in log and f"job {job} (restart 1)" in log
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["resumed"] is True
    # the image's slowqk, an installed package with no git checkout, not the host's
    assert summary["provenance"]["commit"] is None, summary["provenance"]
