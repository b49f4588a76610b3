"""One unattended GPU check: offline install, native build, GPU tests, GPU benchmarks, a training step.

    python tools/gpu_check.py OUT --wheels WHEELS      # or: make gpu-check OUT=dir WHEELS=dir
    python tools/gpu_check.py OUT --cpu                # the same steps with CUDA off (no GPU)
    python tools/gpu_check.py --download-wheels WHEELS --python-version 3.12   # networked machine

Made for a bare CUDA machine without network that holds torch, triton, cmake and ninja: the
distributions the package needs and the machine lacks are installed from WHEELS (``pip install
--no-index --no-deps``), the extension is built in place for the local GPU's architecture only,
then ``pytest -m gpu``, the GPU benchmark cases and a short end-to-end training step run. Every
part runs in its own subprocess under a time limit taken from one overall budget (default
450 s); a part that fails or runs out of time is recorded and the next one runs. OUT receives
``summary.json`` (rewritten after every part), ``gpu_check.log`` (everything the parts printed),
``junit.xml``, ``bench/triton_gpu.json`` and ``tables.md`` (the benchmark rows as Markdown).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("env", "install", "build", "tests", "e2e", "bench")
# (distribution, import name): what the package and its tests import beyond torch, triton and
# numpy. open_clip imports huggingface_hub and timm only when asked for hub models or timm towers.
REQUIRED = [
    ("torchvision", "torchvision"),
    ("open_clip_torch", "open_clip"),
    ("ftfy", "ftfy"),
    ("wcwidth", "wcwidth"),
    ("regex", "regex"),
    ("tqdm", "tqdm"),
    ("safetensors", "safetensors"),
    ("pytest", "pytest"),
    ("iniconfig", "iniconfig"),
    ("pluggy", "pluggy"),
    ("packaging", "packaging"),
    ("pygments", "pygments"),
    ("hypothesis", "hypothesis"),
    ("sortedcontainers", "sortedcontainers"),
]
# Each part's own cap in seconds for the default budget (scaled with --budget, and never past
# what is left of it); bench takes what is left.
DEFAULT_BUDGET = 450.0
CAPS = {"env": 60, "install": 90, "build": 240, "tests": 150, "e2e": 75, "bench": 10**6}


def download_command(dest: str, python_version: str, required=REQUIRED, torch_version: str = "2.11") -> list:
    """The ``pip download`` command that fills ``dest`` with wheels of ``required`` for a
    CPython ``python_version`` on manylinux x86-64 (run it on a machine with network).

    torchvision is pinned to the release paired with ``torch_version`` (0.21 with 2.6, one minor
    step per torch minor): PyPI's build of it matches PyPI's default CUDA build of that torch.
    """
    tag = "cp" + python_version.replace(".", "")
    major, minor = (int(x) for x in torch_version.split(".")[:2])
    pins = {"torchvision": f"torchvision==0.{minor + 15}.*"} if major == 2 else {}
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
        dest,
        "--python-version",
        python_version,
        "--implementation",
        "cp",
        "--abi",
        tag,
        "--abi",
        "abi3",
        "--abi",
        "none",
    ]
    for plat in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any"):
        cmd += ["--platform", plat]
    return cmd + [pins.get(dist, dist) for dist, _ in required]


class Check:
    """The running check: log file, progress lines, summary JSON and the time budget."""

    def __init__(self, out: str, budget: float):
        self.out = os.path.abspath(out)
        os.makedirs(self.out, exist_ok=True)
        self.log_path = os.path.join(self.out, "gpu_check.log")
        self.log = open(self.log_path, "a", buffering=1)
        self.t0 = time.monotonic()
        self.budget = budget
        self.summary = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_s": budget, "parts": {}}

    def say(self, msg: str) -> None:
        line = f"[gpu-check {time.monotonic() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def cap(self, part: str) -> float:
        """Seconds ``part`` may take: its cap scaled to the budget, within what is left."""
        return min(CAPS[part] * self.budget / DEFAULT_BUDGET, self.left())

    def write_summary(self) -> None:
        _write_json(os.path.join(self.out, "summary.json"), self.summary)

    def run(self, cmd: list, timeout: float, env: dict | None = None) -> tuple[int, str]:
        """Run ``cmd`` (output into the log, last lines returned); rc 124 when it ran out of time."""
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


# --- parts: each returns a dict with "ok" and what it found ------------------------------------


def part_env(check: Check, args) -> dict:
    code = (
        "import json, torch, platform\n"
        "info = {'python': platform.python_version(), 'torch': torch.__version__,\n"
        "        'torch_cuda': torch.version.cuda, 'cuda_available': torch.cuda.is_available()}\n"
        "try:\n    import triton; info['triton'] = triton.__version__\n"
        "except ImportError as e:\n    info['triton'] = None\n"
        "try:\n    import torchvision; info['torchvision'] = torchvision.__version__\n"
        "except Exception as e:\n    info['torchvision'] = 'not importable: %s' % e\n"
        "if torch.cuda.is_available():\n"
        "    p = torch.cuda.get_device_properties(0)\n"
        "    info.update(gpu=p.name, capability='%d.%d' % (p.major, p.minor),\n"
        "                gpu_memory_gb=round(p.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count())\n"
        "print('ENV ' + json.dumps(info))\n"
    )
    rc, tail = check.run([sys.executable, "-c", code], check.cap("env"))
    info = next((json.loads(line[4:]) for line in tail.splitlines() if line.startswith("ENV ")), {})
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
    exe = local if os.path.exists(local) else (find_nvcc() or tool if tool == "nvcc" else tool)
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [line for line in out.splitlines() if line.strip()]
    return lines[-1].strip() if tool == "nvcc" and lines else (lines[0].strip() if lines else None)


def missing_distributions(required=REQUIRED) -> list:
    """The ``(distribution, import name)`` pairs whose module this interpreter cannot import."""
    return [(dist, mod) for dist, mod in required if importlib.util.find_spec(mod) is None]


def find_wheel(wheels: str, dist: str):
    """The newest wheel of ``dist`` in folder ``wheels`` (names normalised as in PEP 427), or None."""
    norm = dist.lower().replace("-", "_").replace(".", "_")
    names = sorted(
        f for f in os.listdir(wheels) if f.endswith(".whl") and f.split("-")[0].lower().replace(".", "_") == norm
    )
    return os.path.join(wheels, names[-1]) if names else None


def install_offline(check: Check, wheels, required=REQUIRED, timeout: float = 90) -> dict:
    """Install the missing ``required`` distributions from the wheel folder, without network or
    dependency resolution (the machine's torch must never be replaced)."""
    missing = [dist for dist, _ in missing_distributions(required)]
    result = {"missing_before": missing, "installed": [], "no_wheel": []}
    if not missing:
        return {"ok": True, **result}
    if not wheels or not os.path.isdir(wheels):
        result["error"] = f"missing {missing} and no wheel folder (--wheels DIR); fill one with: " + " ".join(
            download_command("DIR", "X.Y", required)
        )
        return {"ok": False, **result}
    files = []
    for dist in missing:
        wheel = find_wheel(wheels, dist)
        (files.append(wheel) or result["installed"].append(os.path.basename(wheel))) if wheel else result[
            "no_wheel"
        ].append(dist)
    if files:
        rc, tail = check.run(
            [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--disable-pip-version-check", *files],
            timeout,
        )
        if rc != 0:
            result["error"] = tail[-2000:]
    importlib.invalidate_caches()
    result["still_missing"] = [dist for dist, _ in missing_distributions(required)]
    return {"ok": not result["still_missing"] and "error" not in result, **result}


def requirements(extra) -> list:
    """:data:`REQUIRED` plus ``DIST[:MODULE]`` strings (module defaults to the name with ``_``)."""
    return REQUIRED + [tuple(r.split(":", 1)) if ":" in r else (r, r.replace("-", "_")) for r in extra]


def part_install(check: Check, args) -> dict:
    return install_offline(check, args.wheels, requirements(args.require), timeout=check.cap("install"))


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
    rc, tail = check.run([sys.executable, "setup.py", "build_ext", "--inplace"], check.cap("build"), env)
    result = {"ok": rc == 0, "seconds": round(time.monotonic() - t0, 1), "env": env}
    if rc != 0:
        result["error"] = tail[-3000:]
        return result
    probe = (
        "import json, liftplus_fast as lf; i = lf.backend_info(); "
        "print('NATIVE ' + json.dumps({'native': i['native'], 'ops': i['ops']}))"
    )
    rc, tail = check.run([sys.executable, "-c", probe], 60)
    found = next((json.loads(line[7:]) for line in tail.splitlines() if line.startswith("NATIVE ")), {})
    result.update(found)
    native = found.get("native", {})
    result["ok"] = rc == 0 and bool(native.get("loaded")) and (args.cpu or bool(native.get("cuda")))
    return result


def find_nvcc():
    """nvcc on PATH, else under CUDA_HOME / CUDA_PATH / /usr/local/cuda; None when absent."""
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


def part_tests(check: Check, args) -> dict:
    junit = os.path.join(check.out, "junit.xml")
    # A test module that cannot be imported here (say, a missing optional package) must not stop
    # the GPU tests of the other modules.
    check.log.flush()
    start = check.log.tell()
    rc, tail = check.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-v",
            "-m",
            "gpu",
            "-p",
            "no:cacheprovider",
            "--continue-on-collection-errors",
            "-rfEs",
            f"--junitxml={junit}",
            "tests",
        ],
        check.cap("tests"),
    )
    # pytest writes the JUnit file at the end only: after a timeout count the verbose lines.
    with open(check.log_path, errors="replace") as f:
        f.seek(start)
        lines = f.read().splitlines()
    result = {"rc": rc, **(junit_counts(junit) if rc != 124 else verbose_counts(lines))}
    # On a GPU the selected tests must really run, not all skip (rc 5: none selected).
    ran = result.get("tests", 0) - result.get("skipped", 0)
    result["ok"] = rc == 0 and (args.cpu or ran > 0)
    if rc != 0 or result.get("failed_names"):
        result["tail"] = tail[-3000:]
    return result


def verbose_counts(lines: list) -> dict:
    """Counts from ``pytest -v`` lines (``tests/x.py::test_y PASSED [ 3%]``), failed names."""
    status = [
        (p[0], p[1])
        for p in (line.split() for line in lines)
        if len(p) >= 2 and "::" in p[0] and p[1] in ("PASSED", "FAILED", "SKIPPED", "ERROR")
    ]
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
    out_json = os.path.join(check.out, "e2e.json")
    rc, tail = check.run(
        [sys.executable, os.path.abspath(__file__), "--e2e", out_json] + (["--cpu"] if args.cpu else []),
        check.cap("e2e"),
    )
    result = json.load(open(out_json)) if os.path.exists(out_json) else {}
    result["ok"] = rc == 0 and bool(result.get("ok"))
    if rc != 0:
        result["tail"] = tail[-3000:]
    return result


def part_bench(check: Check, args) -> dict:
    bench_dir = os.path.join(check.out, "bench")
    # Rows are written as they finish, so a run cut short by the budget keeps what it measured.
    cmd = [sys.executable, "benchmarks/run.py", "--only", "triton_gpu", "--repeats", "10", "--out", bench_dir]
    rc, tail = check.run(cmd + (["--smoke"] if args.smoke else []), max(check.left() - 5, 1))
    path = os.path.join(bench_dir, "triton_gpu.json")
    rows = json.load(open(path))["rows"] if os.path.exists(path) else []
    tables = markdown_tables(rows)
    with open(os.path.join(check.out, "tables.md"), "w") as f:
        f.write(tables)
    return {
        "ok": rc == 0 and (bool(rows) or args.cpu),
        "rc": rc,
        "cases": len(rows),
        "complete": rc == 0,
        "tables_md": "tables.md",
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
    """A LIFT+ model on a randomly initialised CLIP: timed training steps with the fused ops and
    with the reference, their first losses compared, then one short ``fast_train`` run."""
    import torch

    sys.path.insert(0, ROOT)
    import liftplus_fast as lf
    from liftplus_fast.ops._dispatch import ENV_VAR

    device = torch.device("cpu" if cpu else "cuda")
    backbone, size, batch, k, steps = ("tiny_vit", 32, 8, 10, 3) if cpu else ("ViT-B-16", 224, 64, 1000, 10)
    result: dict = {
        "device": str(device),
        "backbone": backbone,
        "batch": batch,
        "classes": k,
        "precision": "amp",
        "steps": steps,
    }
    counts = [max(1, int(500 * 0.01 ** (i / (k - 1)))) for i in range(k)]
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, k, (batch,), generator=g).to(device)
    backends = ("auto", "reference") if cpu else ("triton", "cuda", "reference")
    result["dispatch"] = lf.backend_info()["ops"]
    for name in backends:
        os.environ[ENV_VAR] = name
        try:
            result[name] = _timed_steps(lf, device, backbone, size, k, counts, images, labels, steps)
        except Exception as exc:  # e.g. the CUDA extension did not build: time the others
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"e2e {name}: {result[name]}", flush=True)
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
        train = lf.fast_train(
            dataset="digits_lt",
            root=os.path.join(os.path.dirname(out_json), "data"),
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
    except Exception as exc:  # scikit-learn (the digits) may be missing on a bare machine
        result["fast_train_digits"] = {"error": f"{type(exc).__name__}: {exc}"}
        ok = False
    result["ok"] = bool(ok)
    _write_json(out_json, result)
    print("e2e ok" if ok else "e2e FAILED", flush=True)
    return 0 if ok else 1


def _timed_steps(lf, device, backbone, size, k, counts, images, labels, steps) -> dict:
    import torch

    torch.manual_seed(0)
    clip, tok = lf.load_clip(backbone, None, device=device)
    cfg = lf.make_config("lift+", {"num_classes": k, "resolution": size})
    model = lf.build_lift_model(clip, cfg, counts, [f"class {i}" for i in range(k)], tok)
    params = [p for p in model.tuner.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=5e-4)
    # The model owns its precision (prec_train "amp": half-precision compute, fp32 tuner), as in
    # fast_train; fp16 on CUDA needs the gradient scaler.
    scaler = torch.amp.GradScaler("cuda") if model.needs_grad_scaler else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for _ in range(steps + 2):  # two warm-up steps (autotuning, allocator)
        t0 = time.perf_counter()
        loss, _ = model.training_loss(images, labels)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    median = sorted(times[2:])[len(times[2:]) // 2]
    return {
        "ms_per_step": 1e3 * median,
        "images_per_s": images.shape[0] / median,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }


def _write_json(path: str, payload) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", help="folder for summary.json, gpu_check.log and tables")
    parser.add_argument("--wheels", help="folder of wheels for what is missing here (see --download-wheels)")
    parser.add_argument("--cpu", action="store_true", help="CUDA off: build CPU kernels, run the CPU-capable parts")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for everything (default 450)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--smoke", action="store_true", help="one benchmark case per op")
    parser.add_argument(
        "--require",
        action="append",
        default=[],
        metavar="DIST[:MODULE]",
        help="also install this distribution from the wheels when missing (e.g. timm)",
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
        return subprocess.call(
            download_command(args.download_wheels, args.python_version, requirements(args.require), args.torch_version)
        )
    if not args.out:
        parser.error("OUT (the result folder) is required")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; expected names from {','.join(PARTS)}")
    check = Check(args.out, args.budget)
    check.summary["mode"] = "cpu" if args.cpu else "gpu"
    for name in [p for p in PARTS if p in parts]:
        if check.left() < 5:
            check.summary["parts"][name] = {"ok": False, "error": "no time left in the budget"}
            continue
        check.say(f"== {name} ({check.left():.0f}s left)")
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
