"""One writer or many readers per run folder: a live run's folder is refused to a second train or
test, a run being tested is refused to training but not to another test, and the lock ends with
its holder, SIGKILL included."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import liftplus_fast as lf
from liftplus_fast.cli import main
from liftplus_fast.errors import RunInUseError
from liftplus_fast.run_folder import claim_test_folder, new_test_folder
from liftplus_fast.run_lock import LOCK_NAME, lock_run_folder, read_holder
from tests.data.tiny_run import FP32, tiny_argv

from .conftest import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")

# A holder that locks the folder, forks a child that outlives it (as DataLoader workers may
# for a moment), says it is ready and waits to be killed.
HOLDER = """
import os, sys, time
from liftplus_fast.run_lock import lock_run_folder
lock = lock_run_folder(sys.argv[1], command="holder script", shared=sys.argv[2:] == ["shared"])
if os.fork() == 0:
    time.sleep(60)
    os._exit(0)
print("locked", flush=True)
time.sleep(60)
"""


def start_holder(folder, *mode):
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), *mode],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked", proc.stderr.read()
    return proc


def end_holder(proc, children):
    """Kill a holder and the children it forked."""
    proc.kill()
    proc.wait(timeout=30)
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def child_pids(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_locked_folder_is_refused_naming_the_holder_until_it_is_killed(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = start_holder(folder)
    child = child_pids(holder.pid)
    try:
        with pytest.raises(RunInUseError) as err:
            lock_run_folder(str(folder))
        msg = str(err.value)
        for part in (f"pid {holder.pid}", f"host {socket.gethostname()}", "command 'holder script'", "started 20"):
            assert part in msg, msg
        assert err.value.holder["pid"] == holder.pid and isinstance(err.value, OSError)
        holder.send_signal(signal.SIGKILL)  # no chance to clean up
        holder.wait(timeout=10)
        assert child and os.path.exists(f"/proc/{child[0]}")  # its forked child lives on...
        assert read_holder(str(folder))["pid"] == holder.pid  # ...and the dead holder's note stays
        with lock_run_folder(str(folder), command="next") as lock:  # ...yet the lock is free at once
            assert read_holder(str(folder)) == lock.holder and lock.holder["pid"] == os.getpid()
        assert not (folder / LOCK_NAME).exists()  # a released lock leaves no file
    finally:
        end_holder(holder, child)


def test_one_process_cannot_lock_a_folder_twice(tmp_path):
    with lock_run_folder(str(tmp_path)):
        with pytest.raises(RunInUseError, match=rf"in use by this process \(pid {os.getpid()}"):
            lock_run_folder(str(tmp_path / "." / ""))  # the same folder by another spelling
        assert (tmp_path / LOCK_NAME).exists()  # the refused attempt did not drop the lock
        script = f"from liftplus_fast.run_lock import lock_run_folder; lock_run_folder({str(tmp_path)!r})"
        probe = subprocess.run(
            [sys.executable, "-c", script],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert probe.returncode != 0 and "RunInUseError" in probe.stderr
    lock_run_folder(str(tmp_path)).release()


def test_a_second_train_or_test_into_a_live_run_is_refused_even_with_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    live = subprocess.Popen(
        [sys.executable, "-m", "liftplus_fast", *tiny_argv(out, num_epochs=200, **FP32)],
        env=ENV,
        cwd=str(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: (out / "checkpoint.pth.tar").exists() or live.poll() is not None, 240, "the first epoch")
        assert live.poll() is None, live.stderr.read()
        for argv in (tiny_argv(out, "--overwrite", **FP32), tiny_argv(out, "--resume", **FP32), tiny_argv(out, **FP32)):
            assert main(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"is in use by a live run: pid {live.pid} on host" in err[0], err
            assert "liftplus_fast train" in err[0] and "num_epochs 200" in err[0]
        # test_only into the live folder (its own tuner, or another one's), in Python as well
        with pytest.raises(RunInUseError, match=f"pid {live.pid}"):
            lf.fast_train(method="lift+", output_dir=str(out), test_only=True, **TINY)
        with pytest.raises(RunInUseError, match=f"pid {live.pid}"):
            lf.fast_train(method="lift+", output_dir=str(out), test_only=True, model_dir=str(out), **TINY)
        assert live.poll() is None  # the live run was not disturbed
    finally:
        live.kill()
        live.wait(timeout=30)
    # Killed mid-run: the folder is free again.
    assert main(tiny_argv(out, "--overwrite", **FP32)) == 0
    assert not (out / LOCK_NAME).exists()


def test_readers_share_a_folder_and_keep_writers_out(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    reader = start_holder(folder, "shared")
    children = child_pids(reader.pid)
    try:
        with pytest.raises(RunInUseError) as err:  # a writer is refused, naming the reader
            lock_run_folder(str(folder))
        msg = str(err.value)
        assert f"is being read by a live command: pid {reader.pid}" in msg and "command 'holder script'" in msg, msg
        second = lock_run_folder(str(folder), command="second reader", shared=True)  # a reader is not
        assert read_holder(str(folder))["command"] == "second reader"
        second.release()  # not the last reader: the file stays, with no stale description
        assert (folder / LOCK_NAME).exists() and "pid" not in read_holder(str(folder))
        with pytest.raises(RunInUseError, match="is being read by a live command: another process"):
            lock_run_folder(str(folder))
        reader.send_signal(signal.SIGKILL)
        reader.wait(timeout=10)
        with lock_run_folder(str(folder), command="writer"):  # the last reader gone: writers may come
            assert read_holder(str(folder))["mode"] == "write"
        with lock_run_folder(str(folder), shared=True):
            pass
        assert not (folder / LOCK_NAME).exists()  # the last reader out removes the file
    finally:
        end_holder(reader, children)


def test_a_writer_keeps_readers_out(tmp_path):
    writer = start_holder(tmp_path)
    children = child_pids(writer.pid)
    try:
        with pytest.raises(RunInUseError, match=f"is in use by a live run: pid {writer.pid}"):
            lock_run_folder(str(tmp_path), shared=True)
    finally:
        end_holder(writer, children)


def test_tests_started_in_the_same_second_take_their_own_folders(tmp_path):
    names = {new_test_folder(str(tmp_path)) for _ in range(3)}  # nothing created yet: one name
    assert len(names) == 1
    first, second = claim_test_folder(names.pop()), claim_test_folder(new_test_folder(str(tmp_path)))
    assert os.path.isdir(first) and os.path.isdir(second) and second == f"{first}-2"
    other = str(tmp_path / "chosen")
    assert claim_test_folder(other) == other and not os.path.exists(other)  # a folder given: as given


def test_a_run_under_test_is_refused_to_training_but_not_to_another_test(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_argv(out, **FP32)) == 0
    reader = start_holder(out, "shared")  # a test of the run, still going
    children = child_pids(reader.pid)
    try:
        kept = {name: (out / name).read_bytes() for name in ("config.json", "metrics.json")}
        result = lf.fast_train(method="lift+", output_dir=str(out), test_only=True, **TINY)
        assert os.path.dirname(result.output_dir) == str(out) and os.path.isfile(
            os.path.join(result.output_dir, "metrics.json")
        )
        capsys.readouterr()
        assert main(tiny_argv(out, "--overwrite", **FP32)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        # (the in-process test described itself while it ran and withdrew that when it ended)
        assert len(err) == 1 and "is being read by a live command: another process" in err[0], err
        assert kept == {name: (out / name).read_bytes() for name in kept}
    finally:
        end_holder(reader, children)
