"""tools/gpu_check.py without a GPU: offline install from a wheel folder, budgets, summaries.

The install runs in a throw-away virtual environment that sees this environment's packages
through a ``.pth`` file, so nothing is installed here. The build and CUDA parts need minutes or
a GPU; `--cpu` runs of the whole script are described in docs/gpu.md.
"""

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import time
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.py")

spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def make_wheel(folder, dist="lpf-probe", module="lpf_probe", version="0.1"):
    """A minimal pure-Python wheel holding ``module/__init__.py`` (VALUE = 42)."""
    norm = dist.replace("-", "_")
    info = f"{norm}-{version}.dist-info"
    path = os.path.join(folder, f"{norm}-{version}-py3-none-any.whl")
    files = {
        f"{module}/__init__.py": "VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
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


def run_check(python, out, *args, timeout=240):
    proc = subprocess.run(
        [python, SCRIPT, str(out), "--cpu", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    summary = json.load(open(os.path.join(out, "summary.json")))
    return proc, summary


def test_installs_a_missing_distribution_offline_into_the_running_environment(tmp_path, venv_python):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(str(wheels))
    proc, summary = run_check(
        venv_python, tmp_path / "out", "--parts", "install", "--wheels", str(wheels), "--require", "lpf-probe:lpf_probe"
    )
    part = summary["parts"]["install"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert part["ok"] and part["missing_before"] == ["lpf-probe"]
    assert part["installed"] == ["lpf_probe-0.1-py3-none-any.whl"] and part["still_missing"] == []
    out = subprocess.check_output(
        [venv_python, "-c", "import lpf_probe; print(lpf_probe.__file__, lpf_probe.VALUE)"], text=True
    )
    assert out.split()[1] == "42" and os.path.dirname(venv_python)[:-4] in out.split()[0]
    assert importlib.util.find_spec("lpf_probe") is None  # this environment is untouched
    log = open(tmp_path / "out" / "gpu_check.log").read()
    assert "--no-index" in log and "--no-deps" in log
    # A second run finds it installed and installs nothing.
    _, again = run_check(
        venv_python,
        tmp_path / "out2",
        "--parts",
        "install",
        "--wheels",
        str(wheels),
        "--require",
        "lpf-probe:lpf_probe",
    )
    assert again["parts"]["install"]["missing_before"] == [] and again["parts"]["install"]["ok"]


def test_missing_wheel_fails_that_part_names_it_and_the_next_part_still_runs(tmp_path, venv_python):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    proc, summary = run_check(
        venv_python,
        tmp_path / "out",
        "--parts",
        "install,bench",
        "--wheels",
        str(wheels),
        "--require",
        "lpf-absent:lpf_absent",
    )
    assert proc.returncode == 1
    install = summary["parts"]["install"]
    assert not install["ok"] and install["no_wheel"] == ["lpf-absent"]
    assert summary["parts"]["bench"]["ok"] and summary["ok"] is False
    assert "install FAILED" in proc.stdout and "bench ok" in proc.stdout


def test_no_wheel_folder_says_how_to_make_one(tmp_path, venv_python):
    _, summary = run_check(venv_python, tmp_path / "out", "--parts", "install", "--require", "lpf-absent")
    error = summary["parts"]["install"]["error"]
    assert "lpf-absent" in error and "pip download" in error and "--no-deps" in error


def test_download_command_targets_the_gpu_machines_python():
    cmd = gpu_check.download_command("W", "3.12", gpu_check.requirements(["timm"]))
    assert cmd[1:4] == ["-m", "pip", "download"]
    for flag in ("--no-deps", "--only-binary=:all:"):
        assert flag in cmd
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and "cp312" in cmd
    assert {"open_clip_torch", "ftfy", "wcwidth", "timm"} <= set(cmd) and "torch" not in cmd
    # torchvision must pair with the machine's torch, never pull another torch in.
    assert "torchvision==0.26.*" in cmd
    assert "torchvision==0.29.*" in gpu_check.download_command("W", "3.11", torch_version="2.14.1")


def test_a_part_over_its_time_is_stopped_with_its_children(tmp_path):
    check = gpu_check.Check(str(tmp_path), budget=60)
    t0 = time.monotonic()
    rc, tail = check.run(
        [
            sys.executable,
            "-c",
            "import subprocess, sys; print('started', flush=True); "
            "subprocess.run([sys.executable, '-c', 'import time; time.sleep(60)'])",
        ],
        timeout=2,
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


def test_docs_show_the_download_command_the_script_runs():
    doc = open(os.path.join(ROOT, "docs", "gpu.md")).read()
    block = doc.split("# which runs:\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    cmd = gpu_check.download_command("WHEELS", "3.12", torch_version="2.11")
    assert block.replace('"', "").split() == ["python"] + cmd[1:]


def test_counts_from_verbose_lines_after_a_timeout():
    lines = [
        "tests/ops/test_cuda_build.py::test_a PASSED                 [  1%]",
        "tests/ops/test_cuda_build.py::test_b[fp32] FAILED           [  2%]",
        "tests/ops/test_triton_tte.py::test_c SKIPPED (needs a CUDA device) [  3%]",
        "collected 3 items",
    ]
    counts = gpu_check.verbose_counts(lines)
    assert (counts["tests"], counts["failures"], counts["skipped"]) == (3, 1, 1)
    assert counts["failed_names"] == ["tests/ops/test_cuda_build.py::test_b[fp32]"] and counts["timed_out"]


def test_end_to_end_part_runs_on_cpu(tmp_path):
    # Keeps the GPU machine's e2e part in step with the package API between GPU sessions.
    proc, summary = run_check(sys.executable, tmp_path / "out", "--parts", "e2e", timeout=600)
    e2e = summary["parts"]["e2e"]
    assert proc.returncode == 0 and e2e["ok"], proc.stdout[-3000:] + json.dumps(e2e)[:3000]
    assert e2e["device"] == "cpu" and e2e["auto"]["first_loss_rel_diff"] < 1e-2
    assert e2e["auto"]["ms_per_step"] > 0 and e2e["reference"]["ms_per_step"] > 0
    assert 0 <= e2e["fast_train_digits"]["metrics"]["overall"] <= 100
