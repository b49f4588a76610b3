"""The run-time dispatched CPU kernels against a ``-march=native`` build of the same sources.

    python benchmarks/compare_cpu_builds.py                # builds both, 8 rounds
    python benchmarks/compare_cpu_builds.py --rounds 12 --work /tmp/cmp --reuse

Two libraries cannot be loaded into one process (they register the same ops), so the builds are
compared across processes: each round runs one worker process per build, in alternating order
(A B, then B A), and every worker times every kernel case (median of ``--repeats`` calls after
warm-up). One thread by default: the builds differ in instructions, not in threading, and one
thread is far less disturbed by other processes on a shared machine. Per case the table gives
the fastest round of each build and their ratio (dispatched / native; interference only adds
time, so the minimum is the steadiest estimate), and the median and range of the per-round
ratios. Both libraries are built here with the same compiler, flags and CUDA off, one with
LIFTPLUS_FAST_NATIVE_ARCH=1, into ``WORK/<build>/`` (a copy of the Python package next to its
own library), from separate CMake folders.

Cases: the ViT-B/16 shapes of the training step (tokens 197, width 768, MLP 3072, 12 heads),
forward and backward of each CPU kernel, fp32 and bf16 where the kernel runs both.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BUILDS = ("dispatch", "native")


def build(work: str, name: str) -> str:
    """``WORK/<name>/liftplus_fast``: the Python package with its own library."""
    dest = os.path.join(work, name)
    pkg = os.path.join(dest, "liftplus_fast")
    shutil.rmtree(pkg, ignore_errors=True)
    skip = shutil.ignore_patterns("_C*.so", "_build_info.json", "__pycache__")
    shutil.copytree(os.path.join(ROOT, "liftplus_fast"), pkg, ignore=skip)
    env = dict(
        os.environ,
        LIFTPLUS_FAST_CUDA="0",
        LIFTPLUS_FAST_NATIVE_ARCH="1" if name == "native" else "0",
        LIFTPLUS_FAST_BUILD_DIR=os.path.join(work, f"cmake-{name}"),
    )
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", dest]
    cmd += ["--build-temp", os.path.join(work, "tmp")]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return dest


def worker(repeats: int, threads: int, pattern: str) -> None:
    import torch

    sys.path.insert(0, HERE)
    import common

    import liftplus_fast as lf

    torch.set_num_threads(threads)
    ops = torch.ops.liftplus_fast
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    cases = {}
    for dtype in (torch.float32, torch.bfloat16):
        tag = "fp32" if dtype == torch.float32 else "bf16"
        for r in (4, 32):
            n, d = 32 * 197, 768
            a, m, gy = randn(n, d, dtype=dtype), randn(n, d, dtype=dtype), randn(n, d, dtype=dtype)
            p = [1 + 0.1 * randn(d), 0.1 * randn(d), randn(r, d) / d**0.5, 0.1 * randn(r), randn(d, r) / r**0.5]
            p += [0.1 * randn(d), torch.tensor(1.0)]
            saved = ops.adaptformer_fwd(a, m, *p, 1e-5)

            def af_fwd(a=a, m=m, p=p):
                return ops.adaptformer_fwd(a, m, *p, 1e-5)

            def af_bwd(a=a, gy=gy, p=p, saved=saved):
                return ops.adaptformer_bwd(gy, a, *p, *saved[1:])

            cases[f"adaptformer fwd N=6304 r={r} {tag}"] = af_fwd
            cases[f"adaptformer bwd N=6304 r={r} {tag}"] = af_bwd
        for k in (1000, 8142):
            feat, w = randn(128, 768, dtype=dtype), randn(k, 768)
            labels, lp = torch.randint(0, k, (128,), generator=g), torch.log_softmax(randn(k), 0)

            def la(feat=feat, w=w, labels=labels, lp=lp):
                return ops.la_cosine_ce_fwd(feat, w, labels, lp, 25.0, 1.0, False, True)

            cases[f"la_cosine_ce fwd+grad B=128 K={k} {tag}"] = la
        crops, feats = randn(5, 128, 1000, dtype=dtype), randn(5, 128, 768, dtype=dtype)
        cases[f"tte_aggregate C=5 B=128 K=1000 {tag}"] = lambda crops=crops: ops.tte_aggregate(crops, None)
        cases[f"tte_mean_unit_features C=5 B=128 D=768 {tag}"] = lambda f=feats: ops.tte_mean_unit_features(f)
        x, b, gx = randn(8 * 197, 3072, dtype=dtype), 0.1 * randn(3072), randn(8 * 197, 3072, dtype=dtype)
        cases[f"bias_gelu fwd 1576x3072 quick {tag}"] = lambda x=x, b=b: ops.bias_gelu_fwd(x, b, 0)
        cases[f"bias_gelu bwd 1576x3072 quick {tag}"] = lambda x=x, b=b, gx=gx: ops.bias_gelu_bwd(gx, x, b, 0)
    qkv, go = randn(8, 197, 2304, dtype=torch.bfloat16), randn(8, 197, 768, dtype=torch.bfloat16)
    out, lse = ops.attention_fwd(qkv, 12, 0.125, True)
    cases["attention fwd B=8 N=197 H=12 bf16"] = lambda: ops.attention_fwd(qkv, 12, 0.125, True)
    cases["attention bwd B=8 N=197 H=12 bf16"] = lambda: ops.attention_bwd(go, qkv, out, lse, 12, 0.125, True)

    result = {"cpu_capability": lf.backend_info()["cpu_capability"], "ms": {}}
    for name, fn in cases.items():
        if not re.search(pattern, name):
            continue
        times = common.time_interleaved({name: fn}, repeats=repeats, warmup=3)[name]
        result["ms"][name] = 1e3 * statistics.median(times)
    print(json.dumps(result))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=os.path.join(ROOT, "build", "compare-cpu-builds"))
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cases", default="", help="only the cases whose name matches this regular expression")
    p.add_argument("--reuse", action="store_true", help="reuse the builds already in --work")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.repeats, args.threads, args.cases)
        return 0
    work = os.path.abspath(args.work)
    dirs = {}
    for name in BUILDS:
        dest = os.path.join(work, name)
        dirs[name] = dest if args.reuse and os.path.isdir(dest) else build(work, name)
    runs = {name: [] for name in BUILDS}
    for rnd in range(args.rounds):
        for name in BUILDS if rnd % 2 == 0 else BUILDS[::-1]:
            env = {k: v for k, v in os.environ.items() if k != "LIFTPLUS_FAST_CPU_CAPABILITY"}
            env["PYTHONPATH"] = dirs[name]
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--repeats", str(args.repeats)]
            cmd += ["--threads", str(args.threads), "--cases", args.cases]
            out = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, check=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    for name in BUILDS:
        cpu = runs[name][0]["cpu_capability"]
        print(f"{name}: kernels {cpu['selected']} {cpu['kernels']}")
    print(f"\n{args.rounds} rounds, {args.threads} thread(s), median of {args.repeats} calls per worker")
    print(f"{'case':46s} {'dispatch ms':>11s} {'native ms':>10s} {'min ratio':>9s} {'median':>7s} {'range':>13s}")
    mins, meds = [], []
    for case in runs["dispatch"][0]["ms"]:
        per_round = [d["ms"][case] / n["ms"][case] for d, n in zip(runs["dispatch"], runs["native"])]
        best = {name: min(r["ms"][case] for r in runs[name]) for name in BUILDS}
        mins.append(best["dispatch"] / best["native"])
        meds.append(statistics.median(per_round))
        spread = f"{min(per_round):.2f}-{max(per_round):.2f}"
        times = f"{best['dispatch']:11.3f} {best['native']:10.3f}"
        print(f"{case:46s} {times} {mins[-1]:9.3f} {meds[-1]:7.3f} {spread:>13s}")
    print(f"\nmin ratio: median over cases {statistics.median(mins):.3f}, range {min(mins):.3f}-{max(mins):.3f}")
    print(f"median ratio: median over cases {statistics.median(meds):.3f}, range {min(meds):.3f}-{max(meds):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
