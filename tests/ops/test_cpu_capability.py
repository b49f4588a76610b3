"""Run-time CPU dispatch: every capability this CPU supports runs kernels equal to the reference,
the choice is reported, LIFTPLUS_FAST_CPU_CAPABILITY caps it, and no instruction beyond the
baseline can run before a wider build is chosen."""

import json
import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest

import liftplus_fast as lf
from liftplus_fast.ops import _native
from liftplus_fast.ops._native import cpu_capability, cpu_capability_line, native_status

CAPABILITIES = ("default", "avx2", "avx512", "avx512_bf16", "amx")
KERNEL_FILES = {
    "adaptformer_cpu",
    "attention_brgemm_cpu",
    "attention_cpu",
    "bias_gelu_cpu",
    "la_cosine_ce_cpu",
    "tte_aggregate_cpu",
}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NATIVE = native_status().loaded
DISPATCHED = NATIVE and not native_status().build_info.get("native_arch")
needs_dispatch = pytest.mark.skipif(not DISPATCHED, reason="no native library with per-capability CPU builds")


def _supported():
    return cpu_capability()["supported"] if NATIVE else "default"


def _run(code, capability, timeout=300):
    env = dict(os.environ, LIFTPLUS_FAST_CPU_CAPABILITY=capability)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout
    )


@needs_dispatch
def test_backend_info_says_which_build_runs_and_why():
    info = lf.backend_info()["cpu_capability"]
    assert info["supported"] in CAPABILITIES and info["why"]
    if "LIFTPLUS_FAST_CPU_CAPABILITY" not in os.environ:
        assert info["selected"] == info["supported"]
        assert "the widest this CPU supports" in info["why"]
    assert set(info["kernels"]) == KERNEL_FILES
    rank = CAPABILITIES.index
    assert all(rank(cap) <= rank(info["selected"]) for cap in info["kernels"].values())


# The equivalence cases of every CPU kernel (tolerances of docs/ops.md), run with the capability
# forced; the bf16 attention micro-kernel runs only in its AVX512-BF16 build.
_EQUIVALENCE = [
    "tests/ops/test_op_equivalence.py",
    "tests/ops/test_attention.py",
    "tests/ops/test_attention_brgemm.py",
    "tests/ops/test_linear_gelu.py",
    "-k",
    "not triton and not compile and not opcheck",
]

_CHECK = """
import os, sys, pytest, torch, liftplus_fast as lf
cap = os.environ["LIFTPLUS_FAST_CPU_CAPABILITY"]
info = lf.backend_info()["cpu_capability"]
assert info["selected"] == cap, info
assert "forced by LIFTPLUS_FAST_CPU_CAPABILITY=" + cap in info["why"], info
order = {order!r}
assert all(order.index(c) <= order.index(cap) for c in info["kernels"].values()), info
assert bool(torch.ops.liftplus_fast.attention_bf16_kernel()) == (info["kernels"]["attention_cpu"] == "avx512_bf16")
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *{args!r}]))
"""


@needs_dispatch
@pytest.mark.parametrize("capability", CAPABILITIES)
def test_every_supported_capability_matches_the_reference(capability):
    supported = _supported()
    if CAPABILITIES.index(capability) > CAPABILITIES.index(supported):
        pytest.skip(f"this CPU supports up to {supported}")
    out = _run(_CHECK.format(order=CAPABILITIES, args=_EQUIVALENCE), capability, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert re.search(r"\d+ passed", out.stdout) and " failed" not in out.stdout, out.stdout[-2000:]


@needs_dispatch
def test_a_capability_above_the_cpu_is_capped_with_the_reason():
    supported = _supported()
    if supported == "amx":
        # Nothing is above amx: the cap is exercised through the reported reason of a lower one.
        pytest.skip("this CPU supports every capability")
    code = "import liftplus_fast as lf; i = lf.backend_info()['cpu_capability']; print(i['selected']); print(i['why'])"
    out = _run(code, "amx")
    assert out.returncode == 0, out.stderr
    selected, why = out.stdout.strip().splitlines()[-2:]
    assert selected == supported
    assert "LIFTPLUS_FAST_CPU_CAPABILITY=amx caps the capability, but this CPU supports only" in why


@needs_dispatch
@pytest.mark.parametrize("value", ["avx3", "sse", "native"])
def test_an_unknown_capability_is_a_clear_error_naming_the_variable(value):
    expected = f"LIFTPLUS_FAST_CPU_CAPABILITY={value} is not a CPU capability"
    # Importing warns and leaves the native kernels unused ...
    out = _run("import liftplus_fast as lf; print(lf.backend_info()['native']['loaded'])", value)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"
    assert expected in out.stderr and "expected one of default, avx2, avx512, avx512_bf16, amx" in out.stderr
    # ... and a run refuses to start, the command line with one line and status 2.
    out = _run("import liftplus_fast as lf; lf.fast_train(dataset='digits_lt')", value)
    assert out.returncode != 0 and f"UserInputError: {expected}" in out.stderr
    out = _run("from liftplus_fast.cli import main; raise SystemExit(main(['info']))", value)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("liftplus-fast: error: ") and expected in last


@needs_dispatch
def test_case_and_spaces_are_ignored():
    out = _run("import liftplus_fast as lf; print(lf.backend_info()['cpu_capability']['selected'])", " AVX2 ")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "avx2"


def test_pure_python_reports_why_there_are_no_cpu_kernels(monkeypatch):
    monkeypatch.setattr(_native, "_STATUS", _native.NativeStatus(False, "installed without it"))
    info = _native.cpu_capability()
    assert info["selected"] is None and "installed without it" in info["why"]


def _fake_install(tmp_path, monkeypatch, info, library=True):
    (tmp_path / "_build_info.json").write_text(json.dumps(info))
    monkeypatch.setattr(_native, "BUILD_INFO_FILE", str(tmp_path / "_build_info.json"))
    monkeypatch.setattr(_native, "_find_library", lambda: str(tmp_path / "_C.so") if library else None)


def test_a_library_without_cpu_dispatch_is_refused(tmp_path, monkeypatch):
    import torch

    _fake_install(tmp_path, monkeypatch, {"torch_version": torch.__version__, "schemas_from_python": True})
    status = _native._load()
    assert not status.loaded and "without run-time CPU dispatch; rebuild it" in status.reason


def test_a_pure_python_install_says_so_without_a_warning(tmp_path, monkeypatch):
    why = "installed without the native extension (LIFTPLUS_FAST_NO_EXTENSION=1): ..."
    _fake_install(tmp_path, monkeypatch, {"extension": False, "why": why}, library=False)
    monkeypatch.setattr(_native, "_STATUS", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        status = _native.native_status()
    assert not status.loaded and status.chosen and status.reason == why


# ---------------------------------------------------------------------------------------------
# The library as built: baseline code never reaches instructions of a wider capability.
#
# A capability build's own functions live in its namespace (cpu_avx2, cpu_avx512, ...). Inline
# functions and templates of shared headers (torch, the standard library) that it compiles out of
# line are merged with other copies at link time, keeping the first: CMakeLists.txt links every
# baseline object first, so a function that baseline code calls is a baseline copy. What remains
# wide outside the namespaces must be reachable only from capability builds: walking back from it
# through every call, jump or address taken, each path ends in a capability build's function.

_WIDE_NS = ("cpu_avx2", "cpu_avx512", "cpu_amx")  # cpu_avx512 also matches cpu_avx512_bf16
_FUNC = re.compile(r"^([0-9a-f]+) <(.+)>:$")
_REF = re.compile(r"\b([0-9a-f]+) <([^>]+?)(?:\+0x[0-9a-f]+)?>")


def _is_wide(insn: str) -> bool:
    parts = insn.split(None, 1)
    mnemonic = parts[0] if parts else ""
    operands = parts[1] if len(parts) > 1 else ""
    return (
        mnemonic.startswith("v")  # VEX / EVEX encoded (AVX and later)
        or mnemonic.startswith(("tile", "tdp", "ldtilecfg", "sttilecfg"))  # AMX
        or re.search(r"%[yz]mm|%xmm(1[6-9]|2\d|3[01])\b|%k[0-7]\b", operands) is not None
    )


def _functions(library: str):
    """{start address: [name, uses wide instructions, start addresses it calls, jumps to or takes]};
    calls through the PLT go to the library's own definition of that name, if any."""
    dis = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-C", library], capture_output=True, text=True, check=True
    ).stdout
    funcs, refs, cur = {}, {}, None
    for line in dis.splitlines():
        m = _FUNC.match(line)
        if m:
            cur = int(m.group(1), 16)
            funcs[cur] = [m.group(2), False, set()]
            refs[cur] = set()
            continue
        if cur is None or ":\t" not in line:
            continue
        insn = line.split(":\t", 1)[1].strip()
        if _is_wide(insn):
            funcs[cur][1] = True
        for addr, name in _REF.findall(insn):
            refs[cur].add((int(addr, 16), name))
    by_name = {}
    for addr, (name, _, _) in funcs.items():
        by_name.setdefault(name, []).append(addr)
    for addr, found in refs.items():
        for target, name in found:
            if name.endswith("@plt"):
                funcs[addr][2].update(by_name.get(name[: -len("@plt")], []))
            elif target in funcs and target != addr:
                funcs[addr][2].add(target)
    return funcs


def _entry_points(library: str, funcs) -> set:
    """Functions whose address the library stores as data (initialisers, vtables, tables of
    function pointers): where execution can enter other than through a call in the code."""
    relocs = subprocess.run(["readelf", "-rW", library], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in relocs.splitlines():
        cols = line.split()
        if len(cols) >= 4 and cols[2] == "R_X86_64_RELATIVE":
            found.add(int(cols[3], 16))
        elif len(cols) >= 5 and cols[2] in ("R_X86_64_64", "R_X86_64_GLOB_DAT"):
            found.add(int(cols[3], 16))
    return found & set(funcs)


@needs_dispatch
@pytest.mark.skipif(not (shutil.which("objdump") and shutil.which("readelf")), reason="binutils not installed")
def test_baseline_code_never_reaches_wider_instructions():
    funcs = _functions(native_status().path)
    in_wide_ns = {a for a, (name, _, _) in funcs.items() if any(ns in name for ns in _WIDE_NS)}
    assert in_wide_ns, "no capability builds found in the library"
    wide = {a for a, (_, is_wide, _) in funcs.items() if is_wide}
    assert wide & in_wide_ns, "the capability builds use no wider instructions"
    # The baseline build of every kernel file is baseline code.
    default_ns = sorted(funcs[a][0] for a in wide if "cpu_default" in funcs[a][0])
    assert not default_ns, f"baseline builds use wider instructions: {default_ns[:5]}"
    entries = _entry_points(native_status().path, funcs)
    assert entries & in_wide_ns, "the dispatch table's entries were not found"
    callers = {a: set() for a in funcs}
    for a, (_, _, targets) in funcs.items():
        for t in targets:
            callers[t].add(a)
    unsafe = []
    for start in sorted(wide - in_wide_ns):
        seen, todo = {start}, [start]
        while todo:
            f = todo.pop()
            if f in entries:
                unsafe.append(f"{funcs[start][0]} (entered at {funcs[f][0]})")
                break
            for g in callers[f] - in_wide_ns - seen:
                seen.add(g)
                todo.append(g)
    assert not unsafe, f"wide code reachable from baseline code: {unsafe[:5]}"


def test_the_training_log_says_which_cpu_build_runs(tmp_path):
    tiny = dict(dataset="digits_lt", backbone="tiny_vit", pretrained=None, resolution=32, batch_size=64)
    lf.fast_train(method="zs", num_workers=0, progress=False, output_dir=str(tmp_path / "run"), **tiny)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert f"CPU kernels: {cpu_capability_line()}" in log
    assert (cpu_capability()["selected"] or "no native CPU kernels") in cpu_capability_line()
