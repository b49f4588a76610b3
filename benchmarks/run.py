"""Run the benchmark suite: every ``bench_*.py`` here, candidates interleaved, ratios printed.

    python benchmarks/run.py                 # all benchmarks, full shapes
    python benchmarks/run.py --smoke         # one tiny case per benchmark (CI)
    python benchmarks/run.py --only adaptformer --repeats 21

Writes ``benchmarks/results/<name>.json`` (whole or not at all, :mod:`liftplus_fast.files`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# This checkout's package first (not whatever is installed), then the benchmark modules.
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import common  # noqa: E402


def discover(only=None):
    names = sorted(f[len("bench_") : -3] for f in os.listdir(HERE) if f.startswith("bench_") and f.endswith(".py"))
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise SystemExit(f"unknown benchmark(s) {unknown}; available: {names}")
        names = [n for n in names if n in only]
    return [importlib.import_module(f"bench_{n}") for n in names]


def fmt_ratio(row, peer, name):
    value = row.get(f"speedup_vs_{peer}", {}).get(name)
    return f"{value:6.2f}x" if value is not None else "     -"


def print_table(name, rows):
    print(f"\n## {name}")
    if any("max_rel_err" in row for row in rows):
        print(
            "rel err: max |x - x64| / max |x64| over the output and every gradient, against the "
            "reference evaluated in float64"
        )
    header = (
        f"{'case':44s} {'candidate':14s} {'ms':>9s} {'vs ref':>8s} {'vs compile':>10s} {'peak MB':>9s} "
        f"{'floor':>6s} {'rel err':>8s}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        for cand, ms in row["ms"].items():
            floor = row.get("floor_fraction", {}).get(cand)
            mem = row["peak_mem_mb"].get(cand)
            err = row.get("max_rel_err", {}).get(cand)
            print(
                f"{row['case'][:44]:44s} {cand:14s} {ms:9.3f} {fmt_ratio(row, 'reference', cand):>8s} "
                f"{fmt_ratio(row, 'compile', cand):>10s} "
                f"{(f'{mem:9.1f}' if mem is not None else '        -')} "
                f"{(f'{floor:6.2f}' if floor is not None else '     -')} "
                f"{(f'{err:8.1e}' if err is not None else '       -')}"
            )
        if "items_per_s" in row:
            print("    images/s: " + ", ".join(f"{c} {v:.0f}" for c, v in row["items_per_s"].items()))
        for note in row.get("notes", []):
            print(f"    note: {note}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one tiny case per benchmark")
    parser.add_argument("--only", nargs="*", help="benchmark names (e.g. adaptformer tte)")
    parser.add_argument("--filter", nargs="*", help="keep cases whose name contains all of these substrings")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per candidate")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (fixed for the run)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.smoke else 15)
    warmup = 1 if args.smoke else 3
    machine = {
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if not args.smoke:
        machine["copy_bandwidth_GBps"] = common.copy_bandwidth() / 1e9
        machine["fp32_gemm_GFLOPs"] = common.gemm_throughput() / 1e9
        print(
            f"copy bandwidth {machine['copy_bandwidth_GBps']:.1f} GB/s, "
            f"fp32 GEMM {machine['fp32_gemm_GFLOPs']:.1f} GFLOP/s, threads {args.threads}"
        )
    # A benchmark that fails raises: its traceback and a non-zero exit status are the report.
    for module in discover(args.only):
        rows = []
        for case in module.cases(args.smoke):
            if args.filter and not all(f in case.name for f in args.filter):
                continue
            t0 = time.perf_counter()
            case_repeats = args.repeats or (min(case.repeats, repeats) if case.repeats else repeats)
            times = common.time_interleaved(
                case.candidates, repeats=case_repeats, warmup=1 if case.repeats else warmup, device=case.device
            )
            memory = (
                {}
                if args.no_memory or not case.measure_memory
                else {n: common.peak_memory_bytes(fn, case.device) for n, fn in case.candidates.items()}
            )
            row = common.summarize(case, times, memory)
            if case.report is not None:
                extra = case.report()
                row["notes"] = list(row["notes"]) + extra.pop("notes", [])
                row.update(extra)
            if case.accuracy is not None:
                row["max_rel_err"] = case.accuracy()
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            # After every case: a run stopped by a time limit keeps the rows it measured.
            common.write_json(
                os.path.join(args.out, f"{module.NAME}.json"),
                {"name": module.NAME, "machine": machine, "smoke": args.smoke, "rows": rows},
            )
            print(f"  {module.NAME}: {row['case']} done in {row['seconds']:.1f}s", flush=True)
        if not rows:
            print(f"\n## {module.NAME}: no cases on this machine")
            continue
        print_table(module.NAME, rows)


if __name__ == "__main__":
    main()
