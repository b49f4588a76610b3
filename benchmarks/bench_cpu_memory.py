"""The training step with freed CPU memory kept for reuse (``liftplus_fast.cpu_memory``) against
glibc's defaults (``LIFTPLUS_FAST_MALLOC=system``), for the bf16 reference and the package's fast
bf16 step of ``bench_train_step.py``.

The setting is process-wide, so each (candidate, mode) runs in a process of its own, in
alternating order over ``--rounds`` rounds; each process times ``--steps`` steps after two
warm-up steps and reports its fastest step, the page faults and the system time of one step.
Ratio = system / kept time of the same candidate (above 1: keeping memory is faster); the last
line compares each as it runs by default (the package's fast step keeps memory, the published code
runs with glibc's defaults).

    python benchmarks/bench_cpu_memory.py --case 32,100 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

CANDIDATES = ("reference", "fast_bf16")
MODES = ("system", "keep")


def _one(candidate: str, batch: int, k: int, steps: int, smoke: bool) -> dict:
    """Runs in the child: one candidate's steps under this process's malloc mode."""
    import bench_train_step

    from liftplus_fast.cpu_memory import keep_freed_memory

    state = keep_freed_memory()
    shape = ("tiny_vit", 32) if smoke else ("ViT-B-16", 224)
    case = bench_train_step.make_case(*shape, batch, k, only=(candidate,))[0]
    step = case.candidates[candidate]
    step()
    step()
    times, faults, sys_s = [], [], []
    for _ in range(steps):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step()
        t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        times.append(t1 - t0)
        faults.append(r1.ru_minflt - r0.ru_minflt)
        sys_s.append(r1.ru_stime - r0.ru_stime)
    return {"state": state, "s": min(times), "faults": statistics.median(faults), "sys_s": statistics.median(sys_s)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default="32,100", help="B,K of the ViT-B/16 step (default 32,100)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny ViT, one step (seconds)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--child", nargs=2, metavar=("CANDIDATE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    batch, k = (int(v) for v in args.case.split(","))
    if args.child:
        print(json.dumps(_one(args.child[0], batch, k, args.steps, args.smoke)))
        return 0
    results = {c: {m: [] for m in MODES} for c in CANDIDATES}
    for r in range(args.rounds):
        order = [(c, m) for c in CANDIDATES for m in (MODES if r % 2 == 0 else MODES[::-1])]
        for candidate, mode in order:
            cmd = [sys.executable, __file__, "--case", args.case, "--steps", str(args.steps), "--child", candidate]
            cmd += [mode, "--smoke"] if args.smoke else [mode]
            env = dict(os.environ, LIFTPLUS_FAST_MALLOC=mode)
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                sys.stderr.write(out.stderr[-3000:])
                return 1
            results[candidate][mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    print(f"B = {batch}, K = {k}{' (smoke: tiny ViT)' if args.smoke else ''}; fastest step of each mode")
    print("| candidate | glibc defaults s/step | faults/step | kept s/step | faults/step | system / kept |")
    print("| --- | --- | --- | --- | --- | --- |")
    for candidate in CANDIDATES:
        best = {m: min(results[candidate][m], key=lambda x: x["s"]) for m in MODES}
        ratio = best["system"]["s"] / best["keep"]["s"]
        rows.append({"candidate": candidate, "ratio": ratio, **{m: best[m] for m in MODES}})
        print(
            f"| {candidate} | {best['system']['s']:.3f} | {best['system']['faults']:.0f} | {best['keep']['s']:.3f} "
            f"| {best['keep']['faults']:.0f} | {ratio:.2f}x |"
        )
    # As each runs by default: the package's step keeps memory (fast_train), the published code
    # runs with glibc's defaults.
    shipped = rows[0]["system"]["s"] / rows[1]["keep"]["s"]
    print(f"  fast_bf16 (kept) / reference (glibc defaults): {shipped:.2f}")
    if args.out:
        from liftplus_fast.files import atomic_write_json

        payload = {"case": args.case, "smoke": args.smoke, "rows": rows, "fast_kept_vs_reference_system": shipped}
        atomic_write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
