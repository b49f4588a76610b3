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
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--smoke",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("adaptformer", "la_cosine_ce", "tte"):
        payload = json.loads((tmp_path / f"{name}.json").read_text())
        assert payload["smoke"] is True and payload["rows"], name
        row = payload["rows"][0]
        assert {"reference", "compile"} <= set(row["ms"]), name
        assert all(v > 0 for v in row["ms"].values())
        assert "speedup_vs_reference" in row and "speedup_vs_compile" in row
        assert f"## {name}" in out.stdout
