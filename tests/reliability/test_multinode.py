"""Two machines on one: two network namespaces joined by a veth pair play two hosts of a
``torchrun --nnodes 2`` job (c10d rendezvous, Gloo over the veth, nothing leaves the pair).

The job trains the tuner a one-machine run with the same global batch and process count trains;
a host whose worker is killed mid-epoch ends the job well within ``dist_timeout``, keeping the
last checkpoint, and the job resumes from it: rerun with ``--resume``, or restarted by
``torchrun --max-restarts``. Namespaces need root (CAP_SYS_ADMIN and CAP_NET_ADMIN); without them
the module is skipped, saying why.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch

from liftplus_fast.checkpoint import load_checkpoint
from tests.data.tiny_run import FP32, tiny_argv

from .conftest import make_list_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIST_TIMEOUT = 20  # seconds; the job must end well within it when a worker dies
EPOCHS = 3
RUN_TIMEOUT = 240  # bound on any one launch, so a hung job fails the test instead of the suite


def ip(*args, check=True):
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


class Hosts:
    """Two namespaces ``ns[0]``, ``ns[1]`` with a veth pair ``dev[0]`` - ``dev[1]`` at ``addr[0]``,
    ``addr[1]`` (a private /30)."""

    def __init__(self):
        tag = f"{os.getpid() % 100_000:05d}"
        self.ns = (f"lpftest{tag}a", f"lpftest{tag}b")
        self.dev = (f"lpf{tag}a", f"lpf{tag}b")  # interface names: at most 15 characters
        second, third = 16 + os.getpid() % 16, (os.getpid() // 16) % 256
        self.addr = (f"10.{second}.{third}.1", f"10.{second}.{third}.2")

    def create(self):
        ip("netns", "add", self.ns[0])
        ip("netns", "add", self.ns[1])
        ip("link", "add", self.dev[0], "type", "veth", "peer", "name", self.dev[1])
        for i in (0, 1):
            ip("link", "set", self.dev[i], "netns", self.ns[i])
            ip("-n", self.ns[i], "addr", "add", f"{self.addr[i]}/30", "dev", self.dev[i])
            ip("-n", self.ns[i], "link", "set", "lo", "up")
            ip("-n", self.ns[i], "link", "set", self.dev[i], "up")

    def destroy(self):
        for ns in self.ns:
            pids = ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            ip("netns", "del", ns, check=False)  # takes its end of the veth pair with it

    def tx_bytes(self, i):
        stats = json.loads(ip("-n", self.ns[i], "-s", "-j", "link", "show", "dev", self.dev[i]).stdout)
        return stats[0]["stats64"]["tx"]["bytes"]


@pytest.fixture(scope="module")
def hosts():
    if shutil.which("ip") is None:
        pytest.skip("the ip command (iproute2) is not installed")
    h = Hosts()
    probe = ip("netns", "add", h.ns[0], check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot make network namespaces here ({probe.stderr.strip()}): run as root")
    ip("netns", "del", h.ns[0], check=False)
    try:
        h.create()
        yield h
    finally:
        h.destroy()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    # 96 training images, global batch 8: 12 steps per epoch, time to be killed in the middle of one
    return make_list_dataset(str(tmp_path_factory.mktemp("data")), n_classes=3, n_train=32, n_test=2)


def train_args(root, out, *extra):
    return [
        "-m",
        "liftplus_fast",
        *tiny_argv(
            out,
            *extra,
            dataset="imagenet_lt",
            root=root,
            num_epochs=EPOCHS,
            batch_size=8,
            print_freq=1,
            dist_timeout=DIST_TIMEOUT,
            **FP32,
        ),
    ]


# The runs compared bit for bit are separate jobs, and each job times its own choice of CPU
# implementation (ops/choices.py): under load two jobs can choose differently, so pin them.
PINNED_CHOICES = {"LIFTPLUS_FAST_ATTENTION": "sdpa", "LIFTPLUS_FAST_BIAS_GELU": "fused"}


def env(**extra):
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **PINNED_CHOICES, **extra)


def launch_node(hosts, i, args, rdzv, max_restarts=0, **extra_env):
    """``torchrun`` on host ``i`` (inside its namespace): the returned process is the agent."""
    cmd = [
        "ip",
        "netns",
        "exec",
        hosts.ns[i],
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        f"{hosts.addr[0]}:{rdzv['port']}",
        "--rdzv_id",
        rdzv["id"],
        "--rdzv_conf",
        f"is_host={'true' if i == 0 else 'false'},join_timeout=120",
        "--local-addr",
        hosts.addr[i],
        "--max-restarts",
        str(max_restarts),
        "--monitor-interval",
        "0.5",
        *args,
    ]
    return subprocess.Popen(
        cmd,
        env=env(GLOO_SOCKET_IFNAME=hosts.dev[i], **extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


_port = [29400]


def new_rendezvous():
    _port[0] += 1
    return {"id": uuid.uuid4().hex[:12], "port": _port[0]}


def finish(procs, timeout=RUN_TIMEOUT):
    """Wait for every process (killing all on timeout); ``[(returncode, stdout, stderr)]``."""
    deadline = time.monotonic() + timeout
    out = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append((p.returncode, o, e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def run_two_hosts(hosts, root, out, *extra, max_restarts=0, **extra_env):
    rdzv = new_rendezvous()
    args = train_args(root, out, *extra)
    return [launch_node(hosts, i, args, rdzv, max_restarts, **extra_env) for i in (0, 1)]


def tuner(out):
    return load_checkpoint(str(out))["tuner"]


def assert_same_tuner(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def one_machine(tmp_path_factory, data_root):
    """The reference: the same job on one machine, two processes (same global batch and ranks)."""
    out = tmp_path_factory.mktemp("one") / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        cmd + train_args(data_root, out), env=env(), capture_output=True, text=True, timeout=RUN_TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_two_hosts_train_the_tuner_of_one_machine(hosts, data_root, one_machine, tmp_path):
    out = tmp_path / "run"
    sent = hosts.tx_bytes(1)
    results = finish(run_two_hosts(hosts, data_root, out))
    for code, _, err in results:
        assert code == 0, err[-4000:]
    assert hosts.tx_bytes(1) - sent > 100_000  # the gradients crossed the veth pair
    assert results[0][1].count("* overall accuracy") == 1 and "* overall" not in results[1][1]  # rank 0 reports
    assert "data-parallel over 2 processes (gloo)" in (out / "log.txt").read_text()
    assert_same_tuner(tuner(out), tuner(one_machine))
    saved = json.loads((out / "metrics.json").read_text())["metrics"]
    assert saved == json.loads((one_machine / "metrics.json").read_text())["metrics"]


def wait_for_epoch_2(procs, out, timeout=RUN_TIMEOUT):
    """Until rank 0 logged a step of epoch 2 (the checkpoint of epoch 1 is written)."""
    log = out / "log.txt"
    deadline = time.monotonic() + timeout
    while not (log.exists() and f"epoch [2/{EPOCHS}] batch [" in log.read_text()):
        for p in procs:
            assert p.poll() is None, p.communicate()[1][-4000:]
        assert time.monotonic() < deadline, "epoch 2 never started"
        time.sleep(0.02)


def worker_of(agent):
    with open(f"/proc/{agent.pid}/task/{agent.pid}/children") as f:
        children = [int(p) for p in f.read().split()]
    assert len(children) == 1, children
    return children[0]


def test_a_killed_host_ends_the_job_within_dist_timeout_and_the_job_resumes(hosts, data_root, one_machine, tmp_path):
    out = tmp_path / "run"
    procs = run_two_hosts(hosts, data_root, out)
    wait_for_epoch_2(procs, out)
    os.kill(worker_of(procs[1]), signal.SIGKILL)  # host b's worker dies mid-epoch
    killed = time.monotonic()
    results = finish(procs, timeout=DIST_TIMEOUT + 60)
    ended = time.monotonic() - killed
    assert ended < DIST_TIMEOUT, f"the job took {ended:.1f} s to end"
    assert all(code != 0 for code, _, _ in results)
    kept = load_checkpoint(str(out))["epoch"]
    assert 1 <= kept < EPOCHS  # the last finished epoch's checkpoint, whole
    rank0 = [line for line in results[0][2].splitlines() if line.startswith("liftplus-fast: error:")]
    assert len(rank0) == 1 and "another process of the data-parallel run is gone" in rank0[0], results[0][2][-3000:]
    assert f"the checkpoint of epoch {kept} in {out}/checkpoint.pth.tar is kept" in rank0[0]
    assert "start the job again with --resume" in rank0[0]
    assert not any("Traceback" in line for line in results[0][2].splitlines() if "[rank0]" in line)

    results = finish(run_two_hosts(hosts, data_root, out, "--resume"))
    for code, _, err in results:
        assert code == 0, err[-4000:]
    assert f"resuming from {out}/checkpoint.pth.tar after epoch {kept}" in (out / "log.txt").read_text()
    assert_same_tuner(tuner(out), tuner(one_machine))  # as if never interrupted


def test_torchrun_max_restarts_resumes_the_job_after_a_killed_worker(hosts, data_root, one_machine, tmp_path):
    out = tmp_path / "run"
    # One store per rendezvous round: with the store torchrun shares across rounds by default,
    # the restarted processes read their dead predecessors' addresses (docs/distributed.md).
    procs = run_two_hosts(hosts, data_root, out, max_restarts=1, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    wait_for_epoch_2(procs, out)
    os.kill(worker_of(procs[1]), signal.SIGKILL)
    results = finish(procs)
    for code, _, err in results:
        assert code == 0, err[-4000:]
    log = (out / "log.txt").read_text()
    assert "restarted: resuming the run in" in log and "resuming from" in log
    assert load_checkpoint(str(out))["epoch"] == EPOCHS
    assert_same_tuner(tuner(out), tuner(one_machine))
