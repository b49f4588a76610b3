"""One unattended GPU check, staged for a short lease: install, build, tests, step, benchmarks.

    python tools/gpu_check.py OUT --wheels WHEELS          # quick mode (8.7 min at most)
    python tools/gpu_check.py OUT --wheels WHEELS --full   # every test and benchmark shape
    python tools/gpu_check.py OUT --cpu                    # the same parts without a GPU
    python tools/gpu_check.py --download-wheels WHEELS     # on a machine with network

Made for a bare CUDA machine without network that holds torch, triton, cmake and ninja. Parts,
in order, each in its own subprocess with its own time limit (:data:`MODES`); a part that fails
or runs out of time is recorded and the next one runs, and ``OUT/summary.json`` is rewritten
after every part, so a run cut short keeps what it found:

* ``env``: Python, torch, triton, GPU, nvcc, cmake, ninja;
* ``install``: every distribution of :data:`REQUIRED` that does not import here is installed
  from WHEELS (``pip --no-index --no-deps``; then whatever an import still misses, from the same
  folder), never touching the machine's torch;
* ``build``: the native extension for the local GPU's architecture only;
* ``tests``: ``pytest -m gpu`` (over pytest-xdist workers where the machine has pytest-xdist:
  a cold start is Triton compilation, which then runs in parallel);
* ``e2e``: a LIFT+ training step with the Triton, CUDA-extension and reference backends forced in
  turn (first losses compared), then one ``fast_train`` epoch;
* ``step``: ``benchmarks/bench_gpu_step.py`` (the published step under bf16 autocast, eager and
  compiled, against the package's amp and bf16 steps);
* ``bench``: ``benchmarks/run.py --only triton_gpu`` (the fused ops at the model's shapes).

With ``--cpu`` every part runs on the CPU: a CPU build, the GPU tests collected (all skip), the
e2e step on a tiny ViT with Triton under ``TRITON_INTERPRET=1``, the step benchmark on a tiny
ViT, and every op benchmark case built (on the meta device) with the tiny ones run.
OUT receives at most eight files: ``summary.json``, ``gpu_check.log``, ``junit.xml``,
``e2e.json``, ``gpu_step.json``, ``gpu_step.md``, ``triton_gpu.json`` and ``tables.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("env", "install", "build", "tests", "e2e", "step", "bench")
# Seconds each part may take, everything it runs included. Quick: a cold H200 run (Triton and
# inductor compiling from nothing) inside a 10-minute command; the limits add up to 8.7 minutes,
# the parts took 7 on an H200 machine (docs/gpu.md).
# Full: every test and benchmark shape, for a longer lease (and the limits of --cpu runs).
MODES = {
    "quick": {"env": 15, "install": 40, "build": 110, "tests": 110, "e2e": 60, "step": 95, "bench": 90},
    "full": {"env": 30, "install": 90, "build": 300, "tests": 900, "e2e": 180, "step": 300, "bench": 900},
}
# (distribution, import name): what the package, its tests, benchmarks and this check import
# beyond torch and triton (tests/test_gpu_check.py keeps it complete). What these need in turn
# comes into the wheel folder with them (see download_wheels).
REQUIRED = [
    ("torchvision", "torchvision"),
    ("open_clip_torch", "open_clip"),
    ("safetensors", "safetensors"),
    ("numpy", "numpy"),
    ("pillow", "PIL"),
    ("tqdm", "tqdm"),
    ("matplotlib", "matplotlib"),
    ("scikit-learn", "sklearn"),
    ("timm", "timm"),
    ("tensorboard", "tensorboard"),
    ("pyyaml", "yaml"),
    ("pytest", "pytest"),
    ("pytest-benchmark", "pytest_benchmark"),
    ("hypothesis", "hypothesis"),
]
# Never downloaded nor installed: the GPU machine's own builds.
MACHINE_OWN = ("torch", "triton", "nvidia-", "cuda-", "setuptools", "pip")


def download_command(dest: str, python_version: str, names, torch_version: str = "2.11") -> list:
    """The ``pip download`` command that puts wheels of ``names`` (distribution names) for a
    CPython ``python_version`` on manylinux x86-64 into ``dest``, without their dependencies.

    torchvision is pinned to the release paired with ``torch_version`` (0.21 with 2.6, one minor
    step per torch minor): PyPI's build of it matches PyPI's default CUDA build of that torch.
    """
    tag = "cp" + python_version.replace(".", "")
    major, minor = (int(x) for x in torch_version.split(".")[:2])
    pins = {"torchvision": f"torchvision==0.{minor + 15}.*"} if major == 2 else {}
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", dest]
    cmd += ["--python-version", python_version, "--implementation", "cp"]
    cmd += ["--abi", tag, "--abi", "abi3", "--abi", "none"]
    for plat in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any"):
        cmd += ["--platform", plat]
    return cmd + [pins.get(name, name) for name in names]


def _norm(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def wheel_requirements(path: str, python_version: str) -> list:
    """Distribution names a wheel requires for CPython ``python_version`` on Linux x86-64
    (extras left out)."""
    from packaging.requirements import Requirement

    env = {
        "python_version": python_version,
        "python_full_version": python_version + ".0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": "",
    }
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode("utf-8", "replace").splitlines()
    names = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(env):
                names.append(req.name)
    return names


def download_wheels(dest: str, python_version: str, names, torch_version: str) -> int:
    """Fill ``dest`` with wheels of ``names`` and of everything they require, round by round
    (``pip download --no-deps`` each time, so pip never fetches another torch)."""
    os.makedirs(dest, exist_ok=True)
    wanted, done = list(names), set()
    while wanted:
        rc = subprocess.call(download_command(dest, python_version, wanted, torch_version))
        if rc != 0:
            return rc
        done |= {_norm(n) for n in wanted}
        needed = set()
        for f in os.listdir(dest):
            if f.endswith(".whl"):
                needed |= {_norm(n) for n in wheel_requirements(os.path.join(dest, f), python_version)}
        wanted = sorted(n for n in needed - done if not n.startswith(tuple(_norm(m) for m in MACHINE_OWN)))
    return 0


class Check:
    """The running check: log file, progress lines, summary JSON and the parts' time limits."""

    def __init__(self, out: str, caps: dict, mode: str):
        self.out = os.path.abspath(out)
        os.makedirs(self.out, exist_ok=True)
        self.log_path = os.path.join(self.out, "gpu_check.log")
        self.log = open(self.log_path, "a", buffering=1)
        self.t0 = time.monotonic()
        self.caps = caps
        self.summary = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "mode": mode,
            "limits_s": caps,
            "parts": {},
        }

    def say(self, msg: str) -> None:
        line = f"[gpu-check {time.monotonic() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def begin(self, part: str) -> None:
        """Start ``part``'s clock: everything it runs shares its limit."""
        self.deadline = time.monotonic() + self.caps[part]

    def remaining(self) -> float:
        return max(self.deadline - time.monotonic(), 1.0)

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def write_summary(self) -> None:
        _write_json(self.path("summary.json"), self.summary)

    def run(self, cmd: list, timeout: float | None = None, env: dict | None = None) -> tuple[int, str]:
        """Run ``cmd`` (output into the log, last lines returned) for at most ``timeout`` seconds
        and what is left of the part's limit; rc 124 when it ran out of time."""
        timeout = self.remaining() if timeout is None else min(timeout, self.remaining())
        shown = " ".join(c if len(c) < 120 else c[:60] + "..." for c in cmd).replace("\n", " ")
        self.say("$ " + shown)
        full_env = dict(
            os.environ,
            PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
            PYTHONUNBUFFERED="1",
            **(env or {}),
        )
        tail: list = []

        def pump(stream):
            for line in stream:
                self.log.write(line)
                tail.append(line.rstrip("\n"))
                del tail[:-40]

        # A new session so a timeout can end the whole process group (compilers, pytest workers).
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        reader = threading.Thread(target=pump, args=(proc.stdout,), daemon=True)
        reader.start()
        deadline = time.monotonic() + max(timeout, 1.0)
        rc = None
        while rc is None:
            try:
                rc = proc.wait(timeout=min(30.0, max(deadline - time.monotonic(), 0.1)))
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    self.say(f"timed out after {timeout:.0f}s")
                    rc = 124
                else:
                    self.say(f"... still running: {tail[-1][:100] if tail else 'no output yet'}")
        reader.join(timeout=5)
        return rc, "\n".join(tail)


def _python_json(check: Check, code: str, timeout: float | None = None, env: dict | None = None):
    """Run ``code`` in a fresh interpreter; it prints one ``RESULT <json>`` line."""
    rc, tail = check.run([sys.executable, "-c", code], timeout, env)
    found = next((json.loads(line[7:]) for line in tail.splitlines() if line.startswith("RESULT ")), {})
    return rc, found, tail


# --- parts: each returns a dict with "ok" and what it found ------------------------------------


def part_env(check: Check, args) -> dict:
    code = (
        "import json, torch, platform\n"
        "info = {'python': platform.python_version(), 'torch': torch.__version__,\n"
        "        'torch_cuda': torch.version.cuda, 'cuda_available': torch.cuda.is_available()}\n"
        "try:\n    import triton; info['triton'] = triton.__version__\n"
        "except ImportError as e:\n    info['triton'] = None\n"
        "if torch.cuda.is_available():\n"
        "    p = torch.cuda.get_device_properties(0)\n"
        "    info.update(gpu=p.name, capability='%d.%d' % (p.major, p.minor), sms=p.multi_processor_count,\n"
        "                gpu_memory_gb=round(p.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count())\n"
        "print('RESULT ' + json.dumps(info))\n"
    )
    rc, info, _ = _python_json(check, code)
    info["cpus"] = os.cpu_count()
    info["platform"] = platform.platform()
    for tool in ("nvcc", "cmake", "ninja"):
        info[tool] = _tool_version(tool)
    ok = rc == 0 and (args.cpu or bool(info.get("cuda_available")))
    if not ok and rc == 0:
        info["error"] = "torch sees no CUDA device (use --cpu to check without one)"
    return {"ok": ok, **info}


def _tool_version(tool: str):
    local = os.path.join(os.path.dirname(sys.executable), tool)
    exe = local if os.path.exists(local) else ((find_nvcc() or tool) if tool == "nvcc" else tool)
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [line for line in out.splitlines() if line.strip()]
    return lines[-1].strip() if tool == "nvcc" and lines else (lines[0].strip() if lines else None)


def find_nvcc():
    """nvcc on PATH, else under CUDA_HOME / CUDA_PATH / /usr/local/cuda; None when absent."""
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


_PROBE = """
import importlib, json, sys
failed = {}
for mod in sys.argv[1:]:
    try:
        importlib.import_module(mod)
    except BaseException as exc:  # a module that imports half-way is as missing as an absent one
        failed[mod] = {"error": f"{type(exc).__name__}: {exc}"[:300],
                       "missing": getattr(exc, "name", None) if isinstance(exc, ImportError) else None}
print("RESULT " + json.dumps(failed))
"""


def failed_imports(check: Check, modules, timeout: float | None = None) -> dict:
    """``module -> {"error", "missing"}`` for each of ``modules`` that a fresh interpreter cannot
    import (``missing``: the module an ImportError names, often a dependency's)."""
    rc, tail = check.run([sys.executable, "-c", _PROBE, *modules], timeout)
    found = next((json.loads(line[7:]) for line in tail.splitlines() if line.startswith("RESULT ")), None)
    if found is None:
        return {m: {"error": f"the import probe failed (rc {rc}): {tail[-500:]}", "missing": None} for m in modules}
    return found


def find_wheel(wheels: str, dist: str):
    """The newest wheel of ``dist`` in folder ``wheels`` (names normalised as in PEP 427), or None."""
    found = sorted(f for f in os.listdir(wheels) if f.endswith(".whl") and _norm(f.split("-")[0]) == _norm(dist))
    return os.path.join(wheels, found[-1]) if found else None


def install_offline(check: Check, wheels, required=REQUIRED) -> dict:
    """Install from the wheel folder every ``required`` distribution whose module does not import
    here, with whatever those wheels require and this interpreter lacks (found in the same
    folder), in one ``pip --no-index --no-deps`` call: no network, no dependency resolution, the
    machine's torch never replaced. Presence is checked by importing, before and after."""
    modules = {mod: dist for dist, mod in required}
    failed = failed_imports(check, list(modules))
    result = {"missing_before": sorted(modules[m] for m in failed), "installed": [], "no_wheel": []}
    if not failed:
        return {"ok": True, **result}
    if not wheels or not os.path.isdir(wheels):
        result["error"] = f"cannot import {sorted(failed)} and no wheel folder (--wheels DIR); fill one with: " + (
            " ".join(download_command("DIR", "X.Y", sorted(modules[m] for m in failed)))
        )
        result["import_errors"] = failed
        return {"ok": False, **result}
    chosen, queue = [], []
    for mod in failed:
        wheel = find_wheel(wheels, dist=modules[mod])
        if wheel is None:
            result["no_wheel"].append(modules[mod])
        elif wheel not in chosen:
            chosen.append(wheel)
            queue.append(wheel)
    while queue:
        for name in wheel_requirements(queue.pop(), platform.python_version()):
            if _norm(name).startswith(tuple(_norm(m) for m in MACHINE_OWN)) or _installed(name):
                continue
            dep = find_wheel(wheels, dist=name)
            if dep is None:
                result["no_wheel"].append(name)
            elif dep not in chosen:
                chosen.append(dep)
                queue.append(dep)
    if chosen:
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--disable-pip-version-check"]
        rc, tail = check.run(cmd + chosen)
        result["installed"] = [os.path.basename(f) for f in chosen]
        if rc != 0:
            result["error"] = tail[-2000:]
        failed = failed_imports(check, list(modules))
    result["no_wheel"] = sorted(set(result["no_wheel"]))
    result["still_missing"] = sorted(modules[m] for m in failed)
    if failed:
        result["import_errors"] = failed
    return {"ok": not failed and "error" not in result, **result}


def _installed(dist: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def requirements(extra) -> list:
    """:data:`REQUIRED` plus ``DIST[:MODULE]`` strings (module defaults to the name with ``_``)."""
    return REQUIRED + [tuple(r.split(":", 1)) if ":" in r else (r, r.replace("-", "_")) for r in extra]


def part_install(check: Check, args) -> dict:
    return install_offline(check, args.wheels, requirements(args.require))


def part_build(check: Check, args) -> dict:
    env = {"LIFTPLUS_FAST_BUILD_DIR": os.path.join(ROOT, "build", "gpu-check"), "MAX_JOBS": str(os.cpu_count() or 1)}
    if args.cpu:
        env["LIFTPLUS_FAST_CUDA"] = "0"
    else:
        cap = check.summary["parts"].get("env", {}).get("capability")
        if not cap:
            return {"ok": False, "error": "no GPU capability from the env part"}
        env.update(LIFTPLUS_FAST_CUDA="1", TORCH_CUDA_ARCH_LIST=cap)
        nvcc = find_nvcc()
        if nvcc and not os.environ.get("CUDACXX"):
            env["CUDACXX"] = nvcc  # CMake looks on PATH only; toolkits often sit outside it
    t0 = time.monotonic()
    # The last 20 s are the load probe's.
    rc, tail = check.run([sys.executable, "setup.py", "build_ext", "--inplace"], check.remaining() - 20, env)
    result = {"ok": rc == 0, "build_s": round(time.monotonic() - t0, 1), "env": env}
    if rc != 0:
        result["error"] = tail[-3000:]
        return result
    probe = (
        "import json, liftplus_fast as lf; i = lf.backend_info(); "
        "print('RESULT ' + json.dumps({'native': i['native'], 'ops': i['ops']}))"
    )
    rc, found, _ = _python_json(check, probe, 20)
    result.update(found)
    native = found.get("native", {})
    result["ok"] = rc == 0 and bool(native.get("loaded")) and (args.cpu or bool(native.get("cuda")))
    return result


def part_tests(check: Check, args) -> dict:
    junit = check.path("junit.xml")
    check.log.flush()
    start = check.log.tell()
    cmd = [sys.executable, "-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider", "-rfEs"]
    # Workers compile Triton kernels in parallel (a cold start is compile-bound); a module that
    # cannot be imported here must not stop the GPU tests of the others.
    workers = 0 if args.cpu else min(8, max(1, (os.cpu_count() or 1) // 2))
    if workers > 1 and not failed_imports(check, ["xdist"], 20):
        cmd += ["-n", str(workers)]
    cmd += ["--continue-on-collection-errors", f"--junitxml={junit}", "tests"]
    rc, tail = check.run(cmd)
    # pytest writes the JUnit file at the end only: after a timeout count the verbose lines.
    with open(check.log_path, errors="replace") as f:
        f.seek(start)
        lines = f.read().splitlines()
    result = {"rc": rc, "workers": workers, **(junit_counts(junit) if rc != 124 else verbose_counts(lines))}
    # On a GPU the selected tests must really run, not all skip (rc 5: none selected).
    ran = result.get("tests", 0) - result.get("skipped", 0)
    result["ok"] = rc == 0 and (args.cpu or ran > 0)
    if rc != 0 or result.get("failed_names"):
        result["tail"] = tail[-3000:]
    return result


def verbose_counts(lines: list) -> dict:
    """Counts from ``pytest -v`` lines (``tests/x.py::test_y PASSED [ 3%]``, or with xdist
    ``[gw0] [ 3%] PASSED tests/x.py::test_y``), failed names."""
    status = []
    for parts in (line.split() for line in lines):
        names = [p for p in parts if "::" in p]
        states = [p for p in parts if p in ("PASSED", "FAILED", "SKIPPED", "ERROR")]
        if names and states:
            status.append((names[0], states[0]))
    return {
        "tests": len(status),
        "failures": sum(s == "FAILED" for _, s in status),
        "errors": sum(s == "ERROR" for _, s in status),
        "skipped": sum(s == "SKIPPED" for _, s in status),
        "failed_names": [n for n, s in status if s in ("FAILED", "ERROR")][:50],
        "timed_out": True,
    }


def junit_counts(path: str) -> dict:
    """Test counts and the names of failed tests from a pytest JUnit XML file."""
    import xml.etree.ElementTree as ET

    if not os.path.exists(path):
        return {}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed_names"] = [
        f"{c.get('classname')}::{c.get('name')}"
        for c in suite.iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None
    ][:50]
    return counts


def part_e2e(check: Check, args) -> dict:
    out_json = check.path("e2e.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--e2e", out_json] + (["--cpu"] if args.cpu else [])
    # On the CPU the Triton backend runs under the interpreter, which must be set before
    # triton.language is imported: in the subprocess's environment.
    rc, tail = check.run(cmd, env={"TRITON_INTERPRET": "1"} if args.cpu else None)
    result = json.load(open(out_json)) if os.path.exists(out_json) else {}
    result["ok"] = rc == 0 and bool(result.get("ok"))
    if rc != 0:
        result["tail"] = tail[-3000:]
    return result


def part_step(check: Check, args) -> dict:
    out_json = check.path("gpu_step.json")
    cmd = [sys.executable, "benchmarks/bench_gpu_step.py", "--out", out_json, "--repeats", "5" if args.full else "3"]
    rc, tail = check.run(cmd + (["--cpu"] if args.cpu else []))
    result = json.load(open(out_json)) if os.path.exists(out_json) else {}
    timed = result.get("median_step_ms", {})
    return {
        "ok": rc == 0 and len(timed) == 4,
        "rc": rc,
        "images_per_s": result.get("images_per_s"),
        "peak_mem_mb": result.get("peak_mem_mb"),
        "speedup": result.get("speedup"),
        "warmup_s": result.get("warmup_s"),
        **({"tail": tail[-3000:]} if rc != 0 else {}),
    }


def part_bench(check: Check, args) -> dict:
    path = check.path("triton_gpu.json")
    if args.cpu:
        # No GPU: build every case (meta tensors) and run the tiny ones, Triton interpreted.
        cmd = [sys.executable, "benchmarks/bench_triton_gpu.py", "--rehearse", "--out", path]
        rc, tail = check.run(cmd, env={"TRITON_INTERPRET": "1"})
        payload = json.load(open(path)) if os.path.exists(path) else {}
        rows = payload.get("rows", [])
        built = len(payload.get("built", []))
    else:
        # Rows are written as they finish, so a run cut short keeps what it measured.
        cmd = [sys.executable, "benchmarks/run.py", "--only", "triton_gpu", "--repeats", "9", "--out", check.out]
        rc, tail = check.run(cmd + ([] if args.full else ["--smoke"]))
        rows = json.load(open(path))["rows"] if os.path.exists(path) else []
        built = len(rows)
    with open(check.path("tables.md"), "w") as f:
        f.write(markdown_tables(rows))
    return {
        "ok": rc == 0 and bool(rows),
        "rc": rc,
        "cases_built": built,
        "cases_measured": len(rows),
        **({"tail": tail[-3000:]} if rc != 0 else {}),
    }


def markdown_tables(rows: list) -> str:
    """Benchmark rows (``benchmarks/run.py`` JSON) as one Markdown table: ms and ratios."""
    if not rows:
        return "(no benchmark rows)\n"
    cands = sorted({c for row in rows for c in row["ms"]}, key=lambda c: (c != "reference", c != "compile", c))
    head = (
        "| case | "
        + " | ".join(f"{c} ms" for c in cands)
        + " | "
        + " | ".join(f"{c} vs eager" for c in cands if c != "reference")
        + " |"
    )
    lines = [head, "|" + " --- |" * (1 + len(cands) + len([c for c in cands if c != "reference"]))]
    for row in rows:
        ms = [f"{row['ms'][c]:.3f}" if c in row["ms"] else "-" for c in cands]
        ratio = [
            f"{row['speedup_vs_reference'][c]:.2f}x" if c in row.get("speedup_vs_reference", {}) else "-"
            for c in cands
            if c != "reference"
        ]
        lines.append(f"| {row['case']} | " + " | ".join(ms + ratio) + " |")
    return "\n".join(lines) + "\n"


# --- the end-to-end step (its own process) ------------------------------------------------------


def e2e(out_json: str, cpu: bool) -> int:
    """A LIFT+ model on a randomly initialised CLIP: timed training steps with each backend
    forced in turn (the ops a backend lacks take the automatic order), first losses compared
    with the reference, then one short ``fast_train`` run."""
    import torch

    sys.path.insert(0, ROOT)
    import liftplus_fast as lf
    from liftplus_fast.ops._dispatch import ENV_VAR

    device = torch.device("cpu" if cpu else "cuda")
    backbone, size, batch, k, steps = ("tiny_vit", 32, 8, 10, 2) if cpu else ("ViT-B-16", 224, 64, 1000, 5)
    result: dict = {"device": str(device), "backbone": backbone, "batch": batch, "classes": k, "steps": steps}
    result["precision"] = "amp"
    counts = [max(1, int(500 * 0.01 ** (i / (k - 1)))) for i in range(k)]
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, k, (batch,), generator=g).to(device)
    # The CPU rehearses the GPU run: Triton (interpreted), the native kernels, the reference.
    backends = ("triton", "cpu" if cpu else "cuda", "reference")
    for name in backends:
        os.environ[ENV_VAR] = name
        result.setdefault("dispatch", {})[name] = {op: row[device.type] for op, row in lf.backend_info()["ops"].items()}
        if name not in result["dispatch"][name].values():
            # The forced backend implements nothing here (say, the extension did not build): the
            # automatic order would run, which is not what this row is about.
            result[name] = {"error": f"the {name} backend runs no op here: {result['dispatch'][name]}"}
        else:
            try:
                result[name] = _timed_steps(lf, device, backbone, size, k, counts, images, labels, steps)
            except Exception as exc:  # time the others
                result[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"e2e {name}: {result[name]}", flush=True)
        _write_json(out_json, result)
    os.environ.pop(ENV_VAR)
    ref = result["reference"]
    ok = "error" not in ref
    for name in backends[:-1]:
        run = result[name]
        if "error" in run or "error" in ref:
            ok = False
            continue
        run["speedup_vs_reference"] = ref["ms_per_step"] / run["ms_per_step"]
        # Same weights, same batch: the first losses differ only by half-precision rounding.
        run["first_loss_rel_diff"] = abs(run["first_loss"] - ref["first_loss"]) / abs(ref["first_loss"])
        ok = ok and run["first_loss_rel_diff"] < 1e-2 and math.isfinite(run["last_loss"])
    _write_json(out_json, result)
    try:
        with tempfile.TemporaryDirectory() as root:  # the digits come from scikit-learn
            train = lf.fast_train(
                dataset="digits_lt",
                root=root,
                backbone="tiny_vit",
                pretrained=None,
                method="lift+",
                progress=False,
                num_epochs=1,
                batch_size=32,
                resolution=32,
                num_workers=0,
                device=str(device),
            )
        result["fast_train_digits"] = {
            "metrics": {m: v for m, v in train.metrics.items() if m != "per_class"},
            "timings": train.timings,
        }
        ok = ok and math.isfinite(train.metrics["overall"])
    except Exception as exc:
        result["fast_train_digits"] = {"error": f"{type(exc).__name__}: {exc}"}
        ok = False
    result["ok"] = bool(ok)
    _write_json(out_json, result)
    print("e2e ok" if ok else "e2e FAILED", flush=True)
    return 0 if ok else 1


def _timed_steps(lf, device, backbone, size, k, counts, images, labels, steps) -> dict:
    import torch

    from liftplus_fast.train_loop import TrainStep, make_optimizer

    torch.manual_seed(0)
    clip, tok = lf.load_clip(backbone, None, device=device)
    cfg = lf.make_config("lift+", {"num_classes": k, "resolution": size, "classifier_init": "random"})
    model = lf.build_lift_model(clip, cfg, counts, [f"class {i}" for i in range(k)], tok)
    params = [p for p in model.tuner.parameters() if p.requires_grad]
    # The step fast_train runs: the model's own precision, the gradient scaler where it computes
    # in fp16, the published SGD.
    step = TrainStep(model, make_optimizer(params, cfg))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for _ in range(steps + 2):  # two warm-up steps (autotuning, allocator)
        t0 = time.perf_counter()
        loss, _ = step(images, labels)
        losses.append(loss)
        times.append(time.perf_counter() - t0)
    median = sorted(times[2:])[len(times[2:]) // 2]
    return {
        "ms_per_step": 1e3 * median,
        "images_per_s": images.shape[0] / median,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "compute_dtype": str(model.compute_dtype),
        "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }


def _write_json(path: str, payload) -> None:
    # Not liftplus_fast.files: this process writes the summary before the package's own
    # dependencies are installed, so it cannot import the package.
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", help="folder for summary.json, gpu_check.log and tables")
    parser.add_argument("--wheels", help="folder of wheels for what is missing here (see --download-wheels)")
    parser.add_argument("--cpu", action="store_true", help="no GPU: run every part on the CPU")
    parser.add_argument("--full", action="store_true", help="full mode: longer limits, every benchmark shape")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument(
        "--require",
        action="append",
        default=[],
        metavar="DIST[:MODULE]",
        help="also install this distribution from the wheels when it does not import",
    )
    parser.add_argument("--download-wheels", metavar="DIR", help="fill DIR with the wheels (needs network)")
    parser.add_argument("--python-version", default="3.12", help="target Python of --download-wheels")
    parser.add_argument(
        "--torch-version", default="2.11", help="target torch of --download-wheels (picks the paired torchvision)"
    )
    parser.add_argument("--e2e", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.e2e:
        return e2e(args.e2e, args.cpu)
    if args.download_wheels:
        names = [dist for dist, _ in requirements(args.require)]
        return download_wheels(args.download_wheels, args.python_version, names, args.torch_version)
    if not args.out:
        parser.error("OUT (the result folder) is required")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; expected names from {','.join(PARTS)}")
    mode = "full" if args.full else "quick"
    # A CPU rehearsal does the quick mode's work with the full mode's limits (CPUs are slower).
    check = Check(args.out, MODES["full" if args.cpu else mode], mode)
    check.summary["device"] = "cpu" if args.cpu else "gpu"
    for name in [p for p in PARTS if p in parts]:
        check.say(f"== {name} (limit {check.caps[name]:.0f}s)")
        check.begin(name)
        t0 = time.monotonic()
        try:
            result = globals()[f"part_{name}"](check, args)
        except Exception as exc:  # one broken part must not stop the others
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        result["seconds"] = round(time.monotonic() - t0, 1)
        check.summary["parts"][name] = result
        check.say(f"== {name}: {'ok' if result['ok'] else 'FAILED'} in {result['seconds']}s")
        check.write_summary()
    check.summary["ok"] = all(p["ok"] for p in check.summary["parts"].values())
    check.summary["seconds"] = round(time.monotonic() - check.t0, 1)
    check.write_summary()
    check.say(
        f"done in {check.summary['seconds']}s: "
        + ", ".join(f"{n} {'ok' if p['ok'] else 'FAILED'}" for n, p in check.summary["parts"].items())
    )
    return 0 if check.summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
