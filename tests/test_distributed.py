"""Data-parallel training under torchrun (two CPU processes, Gloo)."""

import json
import os
import subprocess
import sys

import pytest
import torch

import liftplus_fast as lf
from liftplus_fast import distributed as D
from tests.data.tiny_run import FP32, tiny_argv

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def torchrun(*args, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_single_process_context_is_inert(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = D.init_distributed(torch.device("cpu"))
    assert not ctx.enabled and ctx.is_main and ctx.world_size == 1
    g = torch.ones(3)
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = g.clone()
    ctx.average_gradients([p])
    assert torch.equal(p.grad, g)
    assert ctx.micro_batch(128, 2) == 64


def test_batch_split_error_names_batch_size():
    ctx = D.DistContext(rank=0, world_size=3)
    with pytest.raises(ValueError, match=r"batch_size \(64\).*accum_step \(2\).*processes \(3\)"):
        ctx.micro_batch(64, 2)
    assert ctx.micro_batch(96, 2) == 16


def test_bad_world_size_env_is_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        D.init_distributed(torch.device("cpu"))


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    torchrun(os.path.join(HERE, "dist_worker.py"), str(out), cwd=str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_averaged_half_batch_gradients_equal_full_batch(worker_results):
    for res in worker_results:
        assert res["grad_norm"] > 1e-3  # a gradient that could be wrong
        assert res["grad_err"] <= 1e-5, res["grad_err"]


def test_broadcast_makes_tuners_identical(worker_results):
    a, b = (r["broadcast_tuner"] for r in worker_results)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_evaluation_equals_whole_test_set(worker_results):
    for res in worker_results:
        sharded, whole = res["eval_sharded"], res["eval_whole"]
        assert sharded["num_samples"] == whole["num_samples"] > 0
        assert sharded["per_class"] == whole["per_class"]
        assert sharded["overall"] == pytest.approx(whole["overall"])


def test_fast_train_gives_every_process_the_same_tuner_and_metrics(worker_results):
    a, b = worker_results
    assert all(torch.equal(a["train_tuner"][k], b["train_tuner"][k]) for k in a["train_tuner"])
    assert a["train_metrics"] == b["train_metrics"]
    # Each epoch covers the training set once over both processes (DistributedSampler pads < 2).
    n_train = len(lf.build_dataset("digits_lt", "./data", "train"))
    assert n_train <= a["train_images"] <= n_train + 1
    # fast_train leaves a process group it did not create open for its owner.
    assert a["group_alive"] and b["group_alive"]


def test_every_process_takes_rank_0s_measured_choices(worker_results):
    rank0, rank1 = (r["choices"] for r in worker_results)
    assert rank0["half_gemm"] == rank1["half_gemm"] == {"option": "fp32", "why": "rank 0"}
    assert rank0 == rank1 and {"attention_bf16", "attention_fp32", "layer_norm_bf16"} <= set(rank0)


def test_torchrun_cli_trains_writes_once_and_reloads(tmp_path):
    out = tmp_path / "run"
    argv = tiny_argv(out, method="lift+", num_epochs=2, batch_size=32, **FP32)
    proc = torchrun("-m", "liftplus_fast", *argv, cwd=str(tmp_path))
    # Only rank 0 reports.
    assert proc.stdout.count("* overall accuracy") == 1
    log = (out / "log.txt").read_text()
    assert "data-parallel over 2 processes (gloo)" in log
    saved = json.loads((out / "metrics.json").read_text())
    ckpt = torch.load(out / "checkpoint.pth.tar", weights_only=False)
    assert ckpt["epoch"] == 2 and len(ckpt["torch_rng_ranks"]) == 2
    # A single process evaluating the saved tuner gets the distributed run's numbers.
    again = lf.fast_train(
        dataset="digits_lt",
        backbone="tiny_vit",
        pretrained=None,
        method="lift+",
        resolution=32,
        num_workers=0,
        prec_test="fp32",
        test_only=True,
        model_dir=str(out),
        progress=False,
        root=str(tmp_path / "data"),
    )
    assert again.metrics["per_class"] == saved["metrics"]["per_class"]
    assert saved["metrics"]["num_samples"] == again.metrics["num_samples"]


def test_resume_restores_each_process_random_state():
    import logging

    from liftplus_fast.train_loop import logger, restore_rng

    states = []
    for seed in (11, 22):
        torch.manual_seed(seed)
        states.append(torch.get_rng_state())
    ckpt = {"torch_rng": states[0], "torch_rng_ranks": states}
    torch.manual_seed(0)
    restore_rng(ckpt, D.DistContext(rank=1, world_size=2))
    assert torch.equal(torch.get_rng_state(), states[1])
    restore_rng(ckpt, D.DistContext())  # a single process resumes rank 0's stream
    assert torch.equal(torch.get_rng_state(), states[0])
    torch.manual_seed(0)
    before = torch.get_rng_state()
    seen = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)  # fast_train turns propagation off, so caplog cannot be relied on
    try:
        restore_rng(ckpt, D.DistContext(rank=0, world_size=4))
    finally:
        logger.removeHandler(handler)
    assert any("another process count" in m for m in seen)
    assert torch.equal(torch.get_rng_state(), before)
