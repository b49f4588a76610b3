"""The benchmark suite runs in its quick smoke mode and writes well-formed results.

This checks the machinery (candidates agree on what they run, the table and JSON are written);
it claims no speed: ratios come from `make bench` on a quiet machine.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_smoke_run(tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("adaptformer", "la_cosine_ce", "tte"):
        payload = json.loads((tmp_path / f"{name}.json").read_text())
        assert payload["smoke"] is True and payload["rows"], name
        row = payload["rows"][0]
        assert {"reference", "compile"} <= set(row["ms"]), name
        assert all(v > 0 for v in row["ms"].values())
        assert "speedup_vs_reference" in row and "speedup_vs_compile" in row
        assert f"## {name}" in out.stdout
    # The input pipeline: every transform case times the reference and the cache on the same
    # images and reports images/s.
    rows = json.loads((tmp_path / "input_pipeline.json").read_text())["rows"]
    assert [r["case"].split(" res=")[0] for r in rows[:3]] == ["train (MDA)", "test", "test TTE (5 crops)"]
    for row in rows[:3]:
        assert {"reference", "cached"} <= set(row["items_per_s"]) and all(v > 0 for v in row["items_per_s"].values())
        assert row["speedup_vs_reference"]["cached"] > 0
    # The command-line case: the PIL path and the default cache, each trained by `liftplus-fast train`.
    assert set(rows[3]["train_images_per_s"]) == {"reference", "cached"} and rows[3]["train_speedup"]["cached"] > 0
    assert any(note.startswith("default cache: format ") for note in rows[3]["notes"])
    assert "## input_pipeline" in out.stdout and "images/s" in out.stdout
    # The AdaptFormer rows carry the accuracy of every candidate against float64: all of them
    # are fp32 in smoke mode, so all must be close.
    row = json.loads((tmp_path / "adaptformer.json").read_text())["rows"][0]
    assert set(row["max_rel_err"]) == set(row["ms"])
    assert all(0 <= e < 1e-4 for e in row["max_rel_err"].values()), row["max_rel_err"]
    assert "rel err" in out.stdout


def test_kink_guard_moves_only_rows_near_the_relu_kink():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_adaptformer as bench
    import torch

    tensors = bench._inputs(2, 32, 4, torch.float32, grad=False)
    a, _m, ln_w, ln_b, down_w, down_b = tensors[:6]
    h = torch.nn.functional.layer_norm(a.reshape(-1, 32), (32,), ln_w, ln_b, 1e-5)
    z = h @ down_w.T + down_b
    # Put row 5's first pre-ReLU value exactly on the kink.
    with torch.no_grad():
        down_b[0] -= z[5, 0]
    guarded = bench._away_from_kink(tensors, margin=1e-4)
    moved = (guarded[0].reshape(-1, 32) != a.reshape(-1, 32)).any(-1)
    assert moved[5] and moved.sum() < moved.numel() // 4
    assert all(torch.equal(g, t) for g, t in zip(guarded[1:], tensors[1:]))


def test_train_step_standalone_smoke_run(tmp_path):
    # The standalone step benchmark (its own main, not run.py's): every candidate timed, the
    # ratios and the bf16 GEMM path it measured with are in the JSON.
    out_file = tmp_path / "train_step.json"
    script = os.path.join(ROOT, "benchmarks", "bench_train_step.py")
    cmd = [sys.executable, script, "--smoke", "--repeats", "1", "--no-memory", "--out", str(out_file)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    payload = json.loads(out_file.read_text())
    assert payload["threads"] == 2 and payload["gemm_flops_per_s"]["fp32"] > 0
    for row in payload["rows"]:
        assert row["fast_bf16_gemms"]["path"] in ("native", "fp32") and row["fast_bf16_gemms"]["why"]
        assert row["s"] and all(t > 0 for t in row["s"].values())
        assert "fast_fp32 / reference_fp32" in row["ratios"]
    assert "fast_bf16 GEMMs:" in out.stdout


def test_every_benchmark_module_imports():
    # A benchmark that no longer imports (a renamed package function, say) would give a GPU
    # lease zero rows; each module is imported in a fresh interpreter, as benchmarks/run.py does.
    folder = os.path.join(ROOT, "benchmarks")
    names = sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py"))
    assert {"bench_triton_gpu", "bench_gpu_step", "common", "run"} <= set(names)
    code = (
        "import importlib, sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
        "for name in sys.argv[3:]:\n    importlib.import_module(name)\nprint('imported', len(sys.argv) - 3)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, ROOT, folder, *names], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"imported {len(names)}"
