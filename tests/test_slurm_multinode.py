"""SLURM across two nodes: each node a network and UTS namespace of its own (own hostname and
address on a bridge), one slurmd per node, slurmctld on the bridge's address, one munged. The tiny
recipe is submitted with ``slowqk submit --nodes 2`` (one task per node, tensor parallel across
the nodes: the rendezvous goes to the first node's hostname over the bridge), and its losses equal
a one-machine run of the same layout."""

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
from conftest import REPO, SHARED
from test_faults import launch
from test_slurm import (
    _find,
    _job_state,
    _submit,
    _wait,
    require_slurm,
    slurm_overrides,
    start_munge,
    stop_daemons,
    wait_idle,
    write_slurm_conf,
)

pytestmark = pytest.mark.slow
NODES = ("sqnode1", "sqnode2")


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise OSError(f"{' '.join(cmd)}: {proc.stderr.strip()}")


@contextlib.contextmanager
def _network(tag: str, subnet: str):
    """A bridge on the host (``subnet.1``) and one namespace per node (``subnet.2``, ``.3``),
    removed whatever happens."""
    bridge, made = f"sqbr{tag}", []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        made.append(("link", bridge))
        _ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i, _ in enumerate(NODES, start=1):
            ns, host_end, node_end = f"sq{tag}n{i}", f"sqh{tag}{i}", f"sqn{tag}{i}"
            _ip("netns", "add", ns)
            made.append(("netns", ns))
            _ip("link", "add", host_end, "type", "veth", "peer", "name", node_end)
            made.append(("link", host_end))
            _ip("link", "set", node_end, "netns", ns)
            _ip("link", "set", host_end, "master", bridge)
            _ip("link", "set", host_end, "up")
            _ip("addr", "add", f"{subnet}.{i + 1}/24", "dev", node_end, ns=ns)
            _ip("link", "set", node_end, "up", ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)
        yield [f"sq{tag}n{i}" for i in range(1, len(NODES) + 1)]
    finally:
        for kind, name in reversed(made):
            with contextlib.suppress(OSError):
                _ip(kind, "del", name) if kind == "netns" else _ip("link", "del", name)


def _free_subnet() -> str:
    """A 10.x.y.0/24 no interface of this machine uses."""
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
    for y in range(200, 250):
        if f" 10.231.{y}." not in used:
            return f"10.231.{y}"
    raise OSError("no free 10.231.y.0/24 subnet")


def _conf(root: Path, sock: Path, subnet: str, port: int) -> Path:
    nodes = "\n".join(
        f"NodeName={n} NodeAddr={subnet}.{i + 2} CPUs=2 RealMemory=4000 State=UNKNOWN"
        for i, n in enumerate(NODES)
    )
    return write_slurm_conf(
        root, sock, f"sqctl({subnet}.1)", nodes, port, port + 1, extra="SlurmdTimeout=5\n"
    )


def _slurmd(node: str, conf: Path) -> list[str]:
    return [_find("slurmd"), "-N", node, "-f", str(conf)]


def _in_node(ns: str, hostname: str, hosts: Path, cmd: list[str], env: dict) -> None:
    """Run ``cmd`` (a daemon that forks) on a node: its network namespace, a UTS namespace with
    its hostname, a mount namespace whose /etc/hosts names every node."""
    script = f'mount --bind "{hosts}" /etc/hosts && hostname "{hostname}" && exec "$@"'
    subprocess.run(
        # nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup fs slurmd reads
        ["nsenter", f"--net=/var/run/netns/{ns}", "unshare", "--uts", "--mount"]
        + ["--propagation", "private"]
        + ["sh", "-c", script, "sh", *cmd],
        check=True,
        env=env,
    )


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    require_slurm()
    if not all(shutil.which(t) for t in ("ip", "unshare", "nsenter")):
        pytest.skip("needs ip (iproute2), unshare and nsenter (util-linux) for the namespaces")
    probe = f"sqprobe{os.getpid() % 10000}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode:
        pytest.skip("network namespaces cannot be made here (ip netns add refused)")
    _ip("netns", "del", probe)
    root = tmp_path_factory.mktemp("slurm2")
    for d in ("state", "spool", "log", "munge"):
        (root / d).mkdir()
    tag, subnet = str(os.getpid() % 10000), _free_subnet()
    hosts = root / "hosts"
    hosts.write_text(
        "127.0.0.1 localhost\n"
        + f"{subnet}.1 sqctl\n"
        + "".join(f"{subnet}.{i + 2} {n}\n" for i, n in enumerate(NODES))
    )
    daemons = [root / "munge" / "munged.pid", root / "slurmctld.pid"]
    daemons += [root / f"slurmd-{n}.pid" for n in NODES]
    with _network(tag, subnet) as namespaces:
        try:
            sock = start_munge(root)
            with socket.socket() as s:  # a port pair free on the bridge's address
                s.bind((f"{subnet}.1", 0))
                port = s.getsockname()[1]
            conf = _conf(root, sock, subnet, port)
            # one thread per rank in both runs: a sum over threads rounds differently
            env = {**os.environ, "SLURM_CONF": str(conf), "OMP_NUM_THREADS": "1"}
            # the controller in the host's network, under the name SlurmctldHost gives it
            subprocess.run(
                ["unshare", "--uts", "sh", "-c", 'hostname sqctl && exec "$@"', "sh"]
                + [_find("slurmctld"), "-f", str(conf)],
                check=True,
                env=env,
            )
            for ns, node in zip(namespaces, NODES, strict=True):
                _in_node(ns, node, hosts, _slurmd(node, conf), env)
            wait_idle(env, len(NODES), root / "log" / "slurmctld.log")
            yield {
                "env": env,
                "root": root,
                "namespaces": namespaces,
                "start_node": lambda i: _in_node(
                    namespaces[i],
                    NODES[i],
                    hosts,
                    [_find("slurmd"), "-N", NODES[i], "-f", str(conf)],
                    env,
                ),
            }
        finally:
            stop_daemons(daemons)
            deadline = time.time() + 30  # the namespaces go once nothing runs in them
            while time.time() < deadline and any(_pids_in(ns) for ns in namespaces):
                time.sleep(0.2)


def _pids_in(ns: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return out.split()


def test_two_nodes_train_tensor_parallel_across_them(two_nodes, small_dataset, tmp_path) -> None:

    steps, extra = 8, ("parallel.tensor=2", "train.log_interval=1")
    job = _submit(two_nodes, tmp_path, "mn", steps, small_dataset, 2, 1, extra)
    info = _wait(two_nodes, job)
    log = (tmp_path / "logs" / f"mn-{job}.out").read_text()
    run = tmp_path / "runs" / f"mn-{job}"
    assert info["JobState"] == "COMPLETED", (info, log, _logs(run))
    assert f"job {job} (restart 0): 2 ranks on sqnode[1-2], master sqnode1:" in log, log
    assert info["NodeList"] == "sqnode[1-2]" and info["NumNodes"] == "2", info
    _same_as_one_machine(run, tmp_path / "local", steps, small_dataset, extra)


def _same_as_one_machine(run: Path, local: Path, steps: int, dataset: str, extra) -> None:
    """The same layout on one machine (two local processes): every step's loss bitwise equal."""
    from slowqk.metrics import read_metrics

    args = [*slurm_overrides(steps, dataset, extra), f"out_dir={local}"]
    assert launch(args, nproc=2) == [0, 0], launch.last[0].stderr_text[-2000:]
    got = {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")}
    want = {r["step"]: r["loss"] for r in read_metrics(local / "metrics.jsonl")}
    assert sorted(got) == list(range(1, steps + 1))
    assert got == want  # the network between the ranks, or a lost node, changes nothing


def _node_state(env: dict, node: str) -> str:
    out = subprocess.run(
        ["sinfo", "-h", "-n", node, "-o", "%T"], env=env, capture_output=True, text=True
    ).stdout
    return out.strip()


def _until(what: str, check, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not check():
        assert time.time() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(0.5)


def test_a_lost_node_requeues_the_job_and_it_finishes_bitwise(
    two_nodes, small_dataset, tmp_path
) -> None:
    """Everything on the second node is killed (-9: its slurmd, the step daemon, the rank) while
    the job trains; the job ends and is requeued; once the node is back it resumes from the newest
    good checkpoint and its losses equal an uninterrupted run's, every step."""

    steps = 300
    extra = ("parallel.tensor=2", "train.log_interval=1", "train.save_interval=20")
    extra += ("train.dist_timeout=60",)
    env = two_nodes["env"]
    job = _submit(two_nodes, tmp_path, "lost", steps, small_dataset, 2, 1, extra)
    run = tmp_path / "runs" / f"lost-{job}"
    latest = run / "checkpoints" / "latest"
    _until(
        "a checkpoint", lambda: latest.is_file() and latest.read_text().strip() >= "iter_0000040"
    )
    second = two_nodes["namespaces"][1]
    killed = _pids_in(second)
    for pid in killed:  # the node is gone: daemon, step daemon, task, rank
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), 9)
    assert killed
    _until("the job requeued", lambda: int(_job_state(two_nodes, job).get("Restarts", "0")) >= 1)
    _until("sqnode2 marked down", lambda: "down" in _node_state(env, NODES[1]))
    # it waits for its nodes (after the killed run's clean-up, however long that takes)
    _until(
        "the job pending for its node", lambda: _job_state(two_nodes, job)["JobState"] == "PENDING"
    )
    two_nodes["start_node"](1)  # the node is back
    info = _wait(two_nodes, job)
    log = (tmp_path / "logs" / f"lost-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", (info, log, _logs(run))
    assert f"job {job} (restart 1)" in log, log
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == steps and summary["resumed"] is True
    local = tmp_path / "local"
    _same_as_one_machine(run, local, steps, small_dataset, extra)
    assert (
        summary["final_val_loss"]
        == json.loads((local / "summary.json").read_text())["final_val_loss"]
    )


def _logs(run: Path) -> str:
    return "\n".join(p.read_text()[-1500:] for p in sorted((run / "logs").glob("*.log")))


# ---- a grid on the cluster: `slowqk experiment submit` / `status` -------------------------------


def _grid_cli(cluster, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**cluster["env"], "SLOWQK_PYTHON": sys.executable, "SLOWQK_REPO": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "slowqk.cli", "experiment", *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
    )


def _grid_file(tmp_path: Path, out: Path, steps: int, **extra) -> Path:
    """2 arms x 2 seeds of the small tiny/gpt, reading a corpus (so the data job has work)."""
    corpus = tmp_path / "corpus.txt"
    if not corpus.is_file():
        lines = (SHARED / "data" / "tinyshakespeare" / "input.txt").read_text().splitlines(True)
        corpus.write_text("".join(lines[:3000]))
    grid = {
        "name": "g2",
        "out_dir": str(out),
        "seeds": [1, 2],
        "arms": {"control": {"qk.enabled": False}, "slowqk": {"qk.enabled": True}},
        "variants": {"gpt": {"recipe": "tiny/gpt"}},
        "overrides": {
            "train.steps": steps,
            "data.corpus": str(corpus),
            "data.tokenizer_vocab_size": 400,
            "model.num_layers": 2,
            "model.hidden_size": 64,
            "model.seq_length": 64,
            "train.save_interval": 20,
            "train.eval_interval": 100,
            "train.eval_iters": 1,
            "train.log_interval": 1,
            "train.tensorboard": False,
            "train.dist_timeout": 60,
        },
        **extra,
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(json.dumps(grid))  # JSON is YAML
    return path


def _queue(env: dict) -> str:
    return subprocess.run(
        ["squeue", "-h", "-r", "-o", "%i %j %T %N"], env=env, capture_output=True, text=True
    ).stdout


def test_a_bad_grid_submission_is_refused_before_anything_is_submitted(two_nodes, tmp_path) -> None:
    env = two_nodes["env"]
    grid = _grid_file(tmp_path, tmp_path / "bad", 5)
    cases = [
        (["--nodes", "3"], "needs 3 nodes (3 nodes x 1 tasks); partition debug has 2"),
        (
            ["--tasks-per-node", "3"],
            "needs 3 CPUs per node (1 nodes x 3 tasks); partition debug has 2",
        ),
        (["--only", "llama"], "--only ['llama']: not among variants ['gpt']"),
        (["--partition", "gpu"], "--partition gpu: no such partition (there are debug)"),
    ]
    for flags, message in cases:
        proc = _grid_cli(two_nodes, tmp_path, "submit", str(grid), *flags)
        err = proc.stderr.strip()
        assert proc.returncode == 2 and len(err.splitlines()) == 1, (flags, err)
        assert message in err, (flags, err)
    unknown_arm = _grid_file(
        tmp_path,
        tmp_path / "bad-arm",
        5,
        variants={"gpt": {"recipe": "tiny/gpt", "arms": ["fast"]}},
    )
    proc = _grid_cli(two_nodes, tmp_path, "submit", str(unknown_arm))
    assert (
        proc.returncode == 2 and "key 'variants.gpt.arms': ['fast'] not among arms" in proc.stderr
    )
    dry = _grid_cli(two_nodes, tmp_path, "submit", str(grid), "--dry-run", "--max-concurrent", "2")
    assert dry.returncode == 0, dry.stderr
    assert "array of 4 (gpt/control/seed1, gpt/slowqk/seed1, gpt/control/seed2" in dry.stdout
    assert "grid_step.sbatch prepare-data" in dry.stdout and "afterany" in dry.stdout, dry.stdout
    assert _queue(env) == ""  # nothing was submitted
    assert not (tmp_path / "bad" / "slurm").exists()


def test_a_grid_runs_as_a_job_array_survives_a_lost_node_and_matches_a_local_run(
    two_nodes, tmp_path
) -> None:
    """A data job, one array of 4 tasks (at most 3 at once), a summary job; one task's node is
    killed while it trains. Every run ends with all its steps, its losses equal the same grid run
    locally with `experiment run` (bitwise), and the summary job's table equals `summarize`'s."""
    from slowqk.metrics import read_metrics

    env, steps = two_nodes["env"], 300
    out = tmp_path / "cluster"
    grid = _grid_file(tmp_path, out, steps)
    proc = _grid_cli(
        two_nodes,
        tmp_path,
        "submit",
        str(grid),
        "--max-concurrent",
        "3",
        "--cpus-per-task",
        "1",
        "--time",
        "15",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "4 runs, 0 finished, 0 queued or running, 4 to submit" in proc.stdout, proc.stdout
    (record,) = [
        json.loads(x) for x in (out / "slurm" / "submissions.jsonl").read_text().splitlines()
    ]
    (array,) = record["arrays"]
    assert sorted(array["runs"]) == [
        f"gpt/{a}/seed{s}" for a in ("control", "slowqk") for s in (1, 2)
    ]

    # a task on the second node, once its run has a checkpoint: the node goes (every process -9)
    def task_on_second_node() -> str | None:
        for line in _queue(env).splitlines():
            job, name, state, node = (line.split() + [""])[:4]
            if name == "g2" and state == "RUNNING" and node == NODES[1]:
                return job
        return None

    _until("a task running on sqnode2", lambda: task_on_second_node() is not None)
    victim = task_on_second_node()
    run_dir = out / "gpt" / array["runs"][int(victim.split("_")[1])].split("/", 1)[1]
    latest = run_dir / "checkpoints" / "latest"
    _until(
        "the task's first checkpoint",
        lambda: latest.is_file() and latest.read_text().strip() >= "iter_0000020",
    )
    status = _grid_cli(two_nodes, tmp_path, "status", str(grid))
    assert status.returncode == 0 and f"running       {victim}" in status.stdout, status.stdout
    for pid in _pids_in(two_nodes["namespaces"][1]):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), 9)
    _until(
        "the task requeued", lambda: int(_job_state(two_nodes, victim).get("Restarts", "0")) >= 1
    )
    _until("sqnode2 marked down", lambda: "down" in _node_state(env, NODES[1]))
    two_nodes["start_node"](1)
    summary_job = int(record["summary_job"])
    info = _wait(two_nodes, summary_job, timeout=900)
    assert info["JobState"] == "COMPLETED", (info, _queue(env))

    status = _grid_cli(two_nodes, tmp_path, "status", str(out))
    assert status.returncode == 0 and "4 finished" in status.stdout, status.stdout
    assert f"finished      {victim}" in status.stdout

    local = tmp_path / "local"
    local_grid = _grid_file(tmp_path, local, steps)
    ran = _grid_cli(two_nodes, tmp_path, "run", str(local_grid), "--jobs", "2")
    assert ran.returncode == 0, ran.stdout[-2000:]
    for name in array["runs"]:
        sub = name.split("/", 1)[1]
        mine, theirs = out / "gpt" / sub, local / "gpt" / sub
        got = {r["step"]: r["loss"] for r in read_metrics(mine / "metrics.jsonl")}
        want = {r["step"]: r["loss"] for r in read_metrics(theirs / "metrics.jsonl")}
        assert sorted(got) == list(range(1, steps + 1)) and got == want, name
        a, b = (json.loads((d / "summary.json").read_text()) for d in (mine, theirs))
        assert a["final_val_loss"] == b["final_val_loss"] and a["steps"] == steps
        assert a["resumed"] is (mine == run_dir), name  # only the lost node's run resumed
    # the summary job's table is `experiment summarize`'s on the local runs
    assert _grid_cli(two_nodes, tmp_path, "summarize", str(local)).returncode == 0
    table = (out / "summary" / "summary.md").read_text()
    assert table == (local / "summary" / "summary.md").read_text()

    again = _grid_cli(two_nodes, tmp_path, "submit", str(grid))
    assert again.returncode == 0 and "4 finished, 0 queued or running, 0 to submit" in again.stdout
    assert len((out / "slurm" / "submissions.jsonl").read_text().splitlines()) == 1


def test_status_shows_a_failed_run_with_the_last_line_of_its_log(two_nodes, tmp_path) -> None:
    out = tmp_path / "fails"
    grid = _grid_file(tmp_path, out, 5, seeds=[1], arms={"control": {}})
    missing = tmp_path / "no-such-checkpoint"
    proc = _grid_cli(two_nodes, tmp_path, "submit", str(grid), f"train.init_from={missing}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (record,) = [
        json.loads(x) for x in (out / "slurm" / "submissions.jsonl").read_text().splitlines()
    ]
    _wait(two_nodes, int(record["summary_job"]))  # after the task, however it ended
    status = _grid_cli(two_nodes, tmp_path, "status", str(out))
    assert status.returncode == 0, status.stderr
    (line,) = [x for x in status.stdout.splitlines() if x.startswith("gpt/control/seed1")]
    task = f"{record['arrays'][0]['job']}_0"
    assert f"failed        {task}" in line and str(missing) in line, status.stdout
    assert status.stdout.strip().endswith("1 failed")
