"""What the stale-cache check costs: one ``stat`` per source file of a list (docs/data.md).

    python benchmarks/stat_cost.py [--files 100000] [--repeats 7] [--dir /data/scratch]

Generates ``--files`` small files in a temporary folder under ``--dir`` (spread over folders of
1000, as data sets are), then times, median of ``--repeats``:

* ``stat_files``: the stat of every file, what the cache build records;
* ``changed_sources``: the same plus the comparison, what training runs when it opens a cache.

The files were just written, so their inodes are in the kernel's cache: the figures are those
of a warm cache (a machine that built the cache or ran recently). A cold cache (after a reboot,
or network storage) costs what the storage takes per metadata lookup, which this does not
measure. Writes ``benchmarks/results/source_stat.json``. A standalone script, not a case of
``run.py``: it measures a cost, not a ratio of candidates.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from common import write_json  # noqa: E402

from liftplus_fast.data.source_stat import changed_sources, stat_files  # noqa: E402


def make_files(folder: str, n: int, per_folder: int = 1000) -> list:
    paths = []
    for i in range(n):
        sub = os.path.join(folder, f"class_{i // per_folder:05d}")
        if i % per_folder == 0:
            os.makedirs(sub)
        path = os.path.join(sub, f"img_{i:07d}.jpg")
        with open(path, "wb") as f:
            f.write(b"\xff\xd8" + i.to_bytes(4, "little"))
        paths.append(path)
    return paths


def timed(fn, repeats: int) -> list:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dir", default=None, help="where the files are generated (default: the temp folder)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "source_stat.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lpf-stat-", dir=args.dir) as folder:
        t0 = time.perf_counter()
        paths = make_files(folder, args.files)
        made = time.perf_counter() - t0
        recorded = stat_files(paths)
        stat_s = timed(lambda: stat_files(paths), args.repeats)
        check_s = timed(lambda: changed_sources(paths, recorded), args.repeats)
        assert not len(changed_sources(paths, recorded))
        fs = os.popen(f"stat -f -c %T {folder}").read().strip()
    rows = {"stat_files": stat_s, "changed_sources": check_s}
    result = {
        "files": args.files,
        "filesystem": fs,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "generate_s": made,
        "median_s": {k: statistics.median(v) for k, v in rows.items()},
        "all_s": rows,
    }
    write_json(args.out, result)
    print(f"{args.files} files on {fs}, median of {args.repeats} (load average {os.getloadavg()[0]:.1f}):")
    for name, times in rows.items():
        med = statistics.median(times)
        print(f"  {name:16s} {med:.3f} s  ({med / args.files * 1e6:.2f} us per file; min {min(times):.3f} s)")


if __name__ == "__main__":
    main()
