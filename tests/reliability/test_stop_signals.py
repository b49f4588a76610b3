"""SIGINT and SIGTERM, sent for real: the work stops at a safe point, keeps its last checkpoint
(or cache chunks), prints one line saying how to continue, and exits with 128 + the signal."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from liftplus_fast.checkpoint import load_checkpoint
from liftplus_fast.cli import main
from liftplus_fast.data import cache_build
from liftplus_fast.data.cache_store import CacheOptions
from liftplus_fast.data.list_datasets import ImageNetLT
from liftplus_fast.errors import RunStoppedError
from liftplus_fast.evaluate import evaluate
from liftplus_fast.run_lock import LOCK_NAME
from liftplus_fast.stop_signals import handle_stop_signals, requested
from tests.data.tiny_run import FP32, tiny_argv

from .conftest import make_list_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


def start(argv, cwd):
    return subprocess.Popen(
        [sys.executable, "-m", "liftplus_fast", *argv],
        cwd=str(cwd),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_checkpoint(proc, out, timeout=240):
    deadline = time.monotonic() + timeout
    while not (out / "checkpoint.pth.tar").exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)


def finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_training_after_a_step_and_the_printed_command_resumes(tmp_path, sig):
    out = tmp_path / "run"
    proc = start(tiny_argv(out, num_epochs=4, batch_size=32, **FP32), tmp_path)
    wait_for_checkpoint(proc, out)
    proc.send_signal(sig)
    code, err = finish(proc)
    name = signal.Signals(sig).name
    assert code == 128 + sig, err
    assert not any("Traceback" in line for line in err), err
    last = err[-1]
    assert last.startswith(f"liftplus-fast: stopped by {name} at epoch "), err
    assert "the checkpoint of epoch" in last and "resume with: liftplus-fast train --resume -d digits_lt" in last
    kept = load_checkpoint(str(out))
    assert json.loads((out / "run.json").read_text())["status"] == "stopped"
    assert 1 <= kept["epoch"] < 4 and f"epoch {kept['epoch']} in" in last
    assert sorted(os.listdir(out)) == [
        "checkpoint.pth.tar",
        "config.json",
        "log.txt",
        "run.json",
        "tensorboard",
    ]  # no lock, no temp
    # The one line names the command that continues the run.
    command = last.split("resume with: ")[1].split()
    assert command[:2] == ["liftplus-fast", "train"] and command.count("--resume") == 1
    resumed = subprocess.run(
        [sys.executable, "-m", "liftplus_fast", *command[1:]],
        cwd=str(tmp_path),
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out}/checkpoint.pth.tar after epoch {kept['epoch']}" in (out / "log.txt").read_text()
    assert load_checkpoint(str(out))["epoch"] == 4 and (out / "metrics.json").exists()


def test_a_second_ctrl_c_ends_the_run_at_once(tmp_path):
    out = tmp_path / "run"
    # One optimiser step per epoch (12 micro-batches): the first Ctrl-C waits for its end.
    proc = start(tiny_argv(out, num_epochs=6, batch_size=384, accum_step=12, **FP32), tmp_path)
    wait_for_checkpoint(proc, out)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)  # the first is handled (recorded) before the second arrives
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    code, err = finish(proc)
    assert time.monotonic() - sent < 5
    assert code == 130 and err[-1] == "liftplus-fast: SIGINT again: stopped at once", err
    assert not any("Traceback" in line for line in err)
    assert load_checkpoint(str(out))["epoch"] >= 1  # the last checkpoint is whole
    assert not [n for n in os.listdir(out) if n.startswith(".") and n != LOCK_NAME]  # no temporary file


class SignallingLoader:
    """Test batches that send ``sig`` to this process while batch ``at`` is being loaded."""

    def __init__(self, n, at, sig):
        g = torch.Generator().manual_seed(0)
        self.batches = [
            (torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)
        ]
        self.at, self.sig, self.served = at, sig, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i == self.at:
                os.kill(os.getpid(), self.sig)
            self.served += 1
            yield batch


def test_evaluation_stops_between_batches(tiny_model):
    loader = SignallingLoader(6, at=2, sig=signal.SIGTERM)
    with handle_stop_signals():
        with pytest.raises(RunStoppedError, match="stopped by SIGTERM during evaluation") as err:
            evaluate(tiny_model, loader, [5, 3, 1], progress=False)
        assert requested() == signal.SIGTERM
    assert err.value.signum == signal.SIGTERM
    assert loader.served == 3  # the batch being loaded when the signal came was the last one
    assert requested() is None and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


@pytest.fixture(scope="module")
def tiny_model():
    from liftplus_fast.config import make_config
    from liftplus_fast.model import build_lift_model, load_clip

    torch.manual_seed(0)
    clip, tok = load_clip("tiny_vit")
    cfg = make_config("lift+", {"num_classes": 3, "resolution": 32, "classifier_init": "random"})
    return build_lift_model(clip, cfg, [5, 3, 1], ["a", "b", "c"], tokenizer=tok)


_build_chunk = cache_build.build_chunk


def chunk_then_signal(work_dir, chunk, paths, options):
    """The real chunk builder, which then sends SIGINT to the test process after chunk 0 (from a
    building process, when there are workers). Module level: the process pool pickles it."""
    manifest = _build_chunk(work_dir, chunk, paths, options)
    if chunk == 0:
        os.kill(int(os.environ["LPF_TEST_SIGNAL_PID"]), signal.SIGINT)
    return manifest


@pytest.mark.parametrize("workers", [0, 2])
def test_cache_building_stops_between_chunks_and_resumes_from_them(tmp_path, monkeypatch, workers):
    root = make_list_dataset(str(tmp_path / "data"), n_classes=2, n_train=6, n_test=1)
    source = ImageNetLT(root, "train")
    monkeypatch.setenv("LPF_TEST_SIGNAL_PID", str(os.getpid()))
    monkeypatch.setattr(cache_build, "build_chunk", chunk_then_signal)
    cache = str(tmp_path / "cache")
    stopped = r"stopped by SIGINT while building the 'train' cache .*chunks are built and kept"
    with handle_stop_signals():
        with pytest.raises(RunStoppedError, match=stopped):
            cache_build.build_split(source, "imagenet_lt", "train", cache, CacheOptions(), workers, False, chunk_size=2)
    assert not os.path.exists(os.path.join(cache, "train.index.npz"))  # no split that opens
    monkeypatch.setattr(cache_build, "build_chunk", _build_chunk)
    summary = cache_build.build_split(source, "imagenet_lt", "train", cache, CacheOptions(), 0, False, chunk_size=2)
    assert summary["chunks_reused"] >= 1 and summary["chunks_reused"] + summary["chunks_built"] == 6
    assert summary["images"] == 12


def test_a_stopped_cache_command_is_one_line_saying_how_to_continue(tmp_path, monkeypatch, capsys):
    root = make_list_dataset(str(tmp_path / "data"), n_classes=2, n_train=2, n_test=1)
    real = cache_build.build_chunk

    def chunk_then_signal(*args):
        manifest = real(*args)
        os.kill(os.getpid(), signal.SIGINT)
        return manifest

    monkeypatch.setattr(cache_build, "build_chunk", chunk_then_signal)
    argv = ["cache", "-d", "imagenet_lt", "--root", root, "--no-progress", "num_workers", "0"]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    # Log lines of the work may come first (when this process logs to the console); the command
    # itself says one line, the last.
    said = [line for line in err if line.startswith("liftplus-fast:")]
    assert said == err[-1:] and "Traceback" not in "\n".join(err), err
    assert err[-1].startswith("liftplus-fast: stopped by SIGINT while building the 'test' cache"), err
    assert err[-1].endswith(
        "continue with: liftplus-fast cache -d imagenet_lt --root " + root + " --no-progress num_workers 0"
    )


def test_sigterm_to_torchrun_stops_every_process_after_the_same_step(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    proc = subprocess.Popen(
        cmd + ["liftplus_fast"] + tiny_argv(out, num_epochs=6, batch_size=8, **FP32),
        cwd=str(tmp_path),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_checkpoint(proc, out)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it to both processes
    sent = time.monotonic()
    code, err = finish(proc)
    # Had the processes stopped at different steps, one would wait in an all-reduce for the other.
    assert time.monotonic() - sent < 30 and code != 0
    ours = [line for line in err if line.startswith("liftplus-fast:")]
    assert len(ours) == 1, err  # rank 0 reports, once
    assert ours[0].startswith("liftplus-fast: stopped by SIGTERM at epoch ")
    assert ours[0].endswith("is kept; resume with the same torchrun command and --resume")
    assert not any("Traceback" in line for line in err if line.startswith("[rank"))  # none from the workers
    assert load_checkpoint(str(out))["epoch"] >= 1
