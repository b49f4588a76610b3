"""tools/gpu_check.py without a GPU: every part in --cpu mode, the offline install, the limits.

The install runs in a throw-away virtual environment that sees this environment's packages
through a ``.pth`` file, so nothing is installed here. The build part is left out of the
``--cpu`` run here: it rebuilds the extension in place (docs/gpu.md, "Without a GPU").
"""

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
import zipfile

import pytest
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.py")

spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def make_wheel(folder, dist="lpf-probe", module="lpf_probe", version="0.1", requires=()):
    """A minimal pure-Python wheel holding ``module/__init__.py`` (VALUE = 42), which imports the
    modules of ``requires`` (``(dist, module)`` pairs) as its METADATA requires them."""
    norm = dist.replace("-", "_")
    info = f"{norm}-{version}.dist-info"
    path = os.path.join(folder, f"{norm}-{version}-py3-none-any.whl")
    imports = "".join(f"import {mod}\n" for _, mod in requires)
    meta = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {d}\n" for d, _ in requires) + "Requires-Dist: torch>=2.0\n"
    files = {
        f"{module}/__init__.py": imports + "VALUE = 42\n",
        f"{info}/METADATA": meta,
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


@pytest.fixture
def venv_python(tmp_path):
    """A fresh venv whose site-packages also sees this environment's (pip, torch, ...)."""
    env_dir = tmp_path / "venv"
    subprocess.check_call([sys.executable, "-m", "venv", "--without-pip", str(env_dir)])
    python = env_dir / "bin" / "python"
    site = subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    ).strip()
    with open(os.path.join(site, "outer.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    return str(python)


def run_check(python, out, *args, timeout=300, env=None):
    proc = subprocess.run(
        [python, SCRIPT, str(out), "--cpu", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )
    summary = json.load(open(os.path.join(out, "summary.json")))
    return proc, summary


def test_installs_what_does_not_import_with_its_requirements_from_the_folder(tmp_path, venv_python):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(str(wheels), "lpf-dep", "lpf_dep")
    make_wheel(str(wheels), requires=[("lpf-dep", "lpf_dep")])
    proc, summary = run_check(
        venv_python, tmp_path / "out", "--parts", "install", "--wheels", str(wheels), "--require", "lpf-probe:lpf_probe"
    )
    part = summary["parts"]["install"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert part["ok"] and part["missing_before"] == ["lpf-probe"] and part["still_missing"] == []
    # The requirement came from the folder in the same pip call; torch (the machine's) never.
    assert part["installed"] == ["lpf_probe-0.1-py3-none-any.whl", "lpf_dep-0.1-py3-none-any.whl"]
    out = subprocess.check_output(
        [venv_python, "-c", "import lpf_probe; print(lpf_probe.__file__, lpf_probe.VALUE)"], text=True
    )
    assert out.split()[1] == "42" and os.path.dirname(venv_python)[:-4] in out.split()[0]
    assert importlib.util.find_spec("lpf_probe") is None  # this environment is untouched
    log = open(tmp_path / "out" / "gpu_check.log").read()
    assert "--no-index" in log and "--no-deps" in log
    # A second run finds it importable and installs nothing.
    args = ("--parts", "install", "--wheels", str(wheels), "--require", "lpf-probe:lpf_probe")
    _, again = run_check(venv_python, tmp_path / "out2", *args)
    assert again["parts"]["install"]["missing_before"] == [] and again["parts"]["install"]["ok"]


def test_presence_is_checked_by_importing(tmp_path, venv_python):
    # A distribution whose files are there but whose import fails counts as missing.
    site = subprocess.check_output(
        [venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    ).strip()
    os.makedirs(os.path.join(site, "lpf_broken"))
    with open(os.path.join(site, "lpf_broken", "__init__.py"), "w") as f:
        f.write("raise ImportError('built for another torch')\n")
    _, summary = run_check(venv_python, tmp_path / "out", "--parts", "install", "--require", "lpf-broken:lpf_broken")
    part = summary["parts"]["install"]
    assert not part["ok"] and part["missing_before"] == ["lpf-broken"]
    assert "built for another torch" in part["import_errors"]["lpf_broken"]["error"]


def test_missing_wheel_fails_that_part_names_it_and_the_next_part_still_runs(tmp_path, venv_python):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    proc, summary = run_check(
        venv_python,
        tmp_path / "out",
        "--parts",
        "install,tests",
        "--wheels",
        str(wheels),
        "--require",
        "lpf-absent:lpf_absent",
    )
    assert proc.returncode == 1
    install = summary["parts"]["install"]
    assert not install["ok"] and install["no_wheel"] == ["lpf-absent"]
    assert summary["parts"]["tests"]["ok"] and summary["ok"] is False
    assert "install FAILED" in proc.stdout and "tests ok" in proc.stdout


def test_no_wheel_folder_says_how_to_make_one(tmp_path, venv_python):
    _, summary = run_check(venv_python, tmp_path / "out", "--parts", "install", "--require", "lpf-absent")
    error = summary["parts"]["install"]["error"]
    assert "lpf-absent" in error and "pip download" in error and "--no-deps" in error


def test_download_command_targets_the_gpu_machines_python():
    cmd = gpu_check.download_command("W", "3.12", ["open_clip_torch", "torchvision", "timm"])
    assert cmd[1:4] == ["-m", "pip", "download"]
    for flag in ("--no-deps", "--only-binary=:all:"):
        assert flag in cmd
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and "cp312" in cmd
    assert {"open_clip_torch", "timm"} <= set(cmd) and "torch" not in cmd
    # torchvision must pair with the machine's torch, never pull another torch in.
    assert "torchvision==0.26.*" in cmd
    assert "torchvision==0.29.*" in gpu_check.download_command("W", "3.11", ["torchvision"], torch_version="2.14.1")


def test_download_follows_the_requirements_of_the_wheels(tmp_path, monkeypatch):
    # Round by round: each pip call fetches what the wheels so far require (torch excluded).
    calls = []
    folder = tmp_path / "w"
    deps = {"lpf-probe": [("lpf-dep", "lpf_dep")], "lpf_dep": []}

    def fake_pip(cmd):
        names = cmd[cmd.index("any") + 1 :]
        calls.append(names)
        for name in names:
            make_wheel(str(folder), name, name.replace("-", "_"), requires=deps[name])
        return 0

    monkeypatch.setattr(gpu_check.subprocess, "call", fake_pip)
    assert gpu_check.download_wheels(str(folder), "3.12", ["lpf-probe"], "2.11") == 0
    assert calls == [["lpf-probe"], ["lpf_dep"]]


def test_docs_show_the_download_command_the_script_runs():
    doc = open(os.path.join(ROOT, "docs", "gpu.md")).read()
    block = doc.split("# whose first round runs:\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    names = [dist for dist, _ in gpu_check.REQUIRED]
    cmd = gpu_check.download_command("WHEELS", "3.12", names, torch_version="2.11")
    assert block.replace('"', "").split() == ["python"] + cmd[1:]


def _pyproject_dependencies():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    specs = project["dependencies"] + project["optional-dependencies"]["test"]
    return {re.match(r"[A-Za-z0-9_.-]+", spec).group(0).lower() for spec in specs}


def _third_party_imports():
    """Top-level modules imported anywhere in the package, tests, benchmarks and the check."""
    stdlib = set(sys.stdlib_module_names)
    own = {"liftplus_fast", "tests", "common", "triton_interp", "op_tester"}
    own |= {f[:-3] for f in os.listdir(os.path.join(ROOT, "benchmarks")) if f.endswith(".py")}
    found = set()
    for folder in ("liftplus_fast", "tests", "benchmarks", "tools"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                for node in ast.walk(ast.parse(open(os.path.join(dirpath, f)).read())):
                    if isinstance(node, ast.Import):
                        found |= {a.name.split(".")[0] for a in node.names}
                    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                        found.add(node.module.split(".")[0])
    return found - stdlib - own


def test_required_list_covers_what_the_package_and_the_check_import():
    # The wheel folder is filled from REQUIRED (and what those wheels require): every
    # distribution pyproject.toml names and every third-party module imported here must be in it.
    dists = {d.lower() for d, _ in gpu_check.REQUIRED}
    modules = {m for _, m in gpu_check.REQUIRED}
    assert _pyproject_dependencies() - {"torch", "triton"} <= dists
    # Imported by the package's dependencies' own machinery or optional there: packaging (pip's,
    # for --download-wheels), xdist (parallel tests when the machine has it), matplotlib's pyplot.
    machine = {"torch", "triton", "packaging", "xdist"}
    assert _third_party_imports() - machine <= modules, _third_party_imports() - machine - modules


def test_quick_mode_fits_a_ten_minute_command_by_construction():
    quick, full = gpu_check.MODES["quick"], gpu_check.MODES["full"]
    assert set(quick) == set(full) == set(gpu_check.PARTS)
    assert sum(quick.values()) <= 9 * 60
    assert all(full[p] >= quick[p] for p in quick)


def test_a_part_over_its_time_is_stopped_with_its_children(tmp_path):
    check = gpu_check.Check(str(tmp_path), {"e2e": 2}, "quick")
    check.begin("e2e")
    t0 = time.monotonic()
    rc, tail = check.run(
        [
            sys.executable,
            "-c",
            "import subprocess, sys; print('started', flush=True); "
            "subprocess.run([sys.executable, '-c', 'import time; time.sleep(60)'])",
        ],
    )
    assert rc == 124 and time.monotonic() - t0 < 20
    assert "started" in tail and "timed out" in open(check.log_path).read()


def test_unknown_part_is_refused(tmp_path):
    proc = subprocess.run(
        [sys.executable, SCRIPT, str(tmp_path), "--parts", "env,bild"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "bild" in proc.stderr


def test_markdown_table_of_benchmark_rows():
    rows = [
        {
            "case": "adaptformer N=1576 r=4",
            "ms": {"reference": 1.0, "compile": 0.5, "triton": 0.25},
            "speedup_vs_reference": {"compile": 2.0, "triton": 4.0},
        }
    ]
    lines = gpu_check.markdown_tables(rows).splitlines()
    assert lines[0] == "| case | reference ms | compile ms | triton ms | compile vs eager | triton vs eager |"
    assert lines[2] == "| adaptformer N=1576 r=4 | 1.000 | 0.500 | 0.250 | 2.00x | 4.00x |"


def test_counts_from_verbose_lines_after_a_timeout():
    lines = [
        "tests/ops/test_cuda_build.py::test_a PASSED                 [  1%]",
        "tests/ops/test_cuda_build.py::test_b[fp32] FAILED           [  2%]",
        "tests/ops/test_triton_tte.py::test_c SKIPPED (needs a CUDA device) [  3%]",
        "[gw3] [  4%] PASSED tests/ops/test_op_equivalence.py::test_d[cuda-cuda]",
        "[gw1] [  5%] FAILED tests/ops/test_op_equivalence.py::test_e[cuda-triton]",
        "collected 3 items",
    ]
    counts = gpu_check.verbose_counts(lines)
    assert (counts["tests"], counts["failures"], counts["skipped"]) == (5, 2, 1)
    assert counts["failed_names"] == [
        "tests/ops/test_cuda_build.py::test_b[fp32]",
        "tests/ops/test_op_equivalence.py::test_e[cuda-triton]",
    ]
    assert counts["timed_out"]


@pytest.mark.slow
def test_every_part_runs_on_the_cpu(tmp_path):
    # The rehearsal of a GPU run: the GPU tests collected (they skip), the e2e step with every
    # backend forced (Triton interpreted), the step benchmark on a tiny ViT, every op benchmark
    # case built and the tiny ones run. Keeps the GPU machine's parts in step with the package.
    parts = ",".join(p for p in gpu_check.PARTS if p != "build")
    proc, summary = run_check(sys.executable, tmp_path / "out", "--parts", parts, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + json.dumps(summary)[:3000]
    assert [p for p in summary["parts"]] == [p for p in gpu_check.PARTS if p != "build"]
    e2e = summary["parts"]["e2e"]
    assert e2e["device"] == "cpu" and e2e["triton"]["first_loss_rel_diff"] < 1e-2
    assert e2e["dispatch"]["triton"]["adaptformer"] == "triton" and e2e["dispatch"]["cpu"]["adaptformer"] == "cpu"
    assert e2e["dispatch"]["triton"]["attention"] != "triton"  # no Triton attention: automatic order
    assert 0 <= e2e["fast_train_digits"]["metrics"]["overall"] <= 100
    step = summary["parts"]["step"]
    assert set(step["images_per_s"]) == {"published_autocast", "published_compile", "fast_amp", "fast_bf16"}
    bench = summary["parts"]["bench"]
    assert bench["cases_built"] > 20 and bench["cases_measured"] == 4
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        ["summary.json", "gpu_check.log", "junit.xml", "e2e.json", "gpu_step.json", "gpu_step.md"]
        + ["triton_gpu.json", "tables.md"]
    )
