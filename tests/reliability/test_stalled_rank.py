"""A stalled process ends a data-parallel job with an error after ``dist_timeout`` seconds."""

import datetime
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

import liftplus_fast as lf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORKER = textwrap.dedent("""
    import os, signal, sys, time, torch
    from liftplus_fast.distributed import all_reduce_sum, explain_timeout, init_distributed
    ctx = init_distributed(torch.device("cpu"), timeout=float(sys.argv[1]))
    if ctx.rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)   # a stalled process: alive, silent
    t0 = time.perf_counter()
    try:
        all_reduce_sum(torch.ones(1))
    except RuntimeError as exc:
        print(f"collective failed after {time.perf_counter() - t0:.1f}s: {explain_timeout(exc, 3)}", flush=True)
        # Leave without interpreter teardown: with the peer stalled, gloo's threads are still
        # waiting, and destroying them at exit sometimes aborts (SIGABRT instead of code 3).
        os._exit(3)
    print("collective finished")
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stalled_rank_ends_the_collective_after_the_timeout(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            PYTHONPATH=ROOT,
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), "3"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    try:
        out, err = procs[0].communicate(timeout=120)
    finally:
        procs[1].send_signal(signal.SIGKILL)  # SIGKILL also ends a stopped process
        procs[1].wait()
        if procs[0].poll() is None:
            procs[0].kill()
    assert procs[0].returncode == 3, (out, err)
    waited = float(out.split("after ")[1].split("s:")[0])
    assert 2.0 <= waited < 60.0, out
    assert "a collective waited longer than dist_timeout (3 s) for another process, which is stalled or gone" in out
    assert "\n" not in out.strip()


def test_dist_timeout_reaches_the_process_group(monkeypatch):
    seen = {}

    def fake_init(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")  # the option's path ends at the process group

    monkeypatch.setattr(torch.distributed, "init_process_group", fake_init)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="stop here"):
        lf.fast_train(
            dataset="digits_lt",
            backbone="tiny_vit",
            pretrained=None,
            output_dir=None,
            dist_timeout=42,
            device="cpu",
            progress=False,
        )
    assert seen["timeout"] == datetime.timedelta(seconds=42) and seen["backend"] == "gloo"


def test_other_errors_pass_through_explain_timeout():
    from liftplus_fast.distributed import CollectiveTimeoutError, explain_timeout

    other = RuntimeError("Connection reset by peer")
    assert explain_timeout(other, 5) is other
    assert explain_timeout(ValueError("timed out"), 5).__class__ is ValueError
    nccl = RuntimeError("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(...) ran for 600000 ms")
    assert "dist_timeout (600 s)" in str(explain_timeout(nccl, 600))
    assert isinstance(explain_timeout(nccl, 600), CollectiveTimeoutError)
