"""Measured choices (ops/choices.py): forced by their variable, decided once, listed with the
reason, taken from another process; and the ops run the option chosen."""

import importlib
import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import liftplus_fast as lf
from liftplus_fast.errors import UserInputError
from liftplus_fast.ops import choices

attention_mod = importlib.import_module("liftplus_fast.ops.attention")
linear_gelu_mod = importlib.import_module("liftplus_fast.ops.linear_gelu")
layer_norm_mod = importlib.import_module("liftplus_fast.ops.layer_norm")
NATIVE = lf.ops.choose("attention", torch.device("cpu")) == "cpu"


@pytest.fixture
def toy(monkeypatch):
    """A registered choice whose decisions are counted (removed afterwards)."""
    calls = []
    blocked = {}

    def decide():
        calls.append(1)
        return choices.faster({"a": 2.0, "b": 1.0}, prefer="a")

    choice = choices.Choice("toy", ("a", "b", "c"), "LIFTPLUS_FAST_TOY", decide, lambda: blocked)
    monkeypatch.setitem(choices._CHOICES, "toy", choice)
    for store in (choices._OPTION, choices._WHY):
        monkeypatch.delitem(store, "toy", raising=False)
    monkeypatch.delenv("LIFTPLUS_FAST_TOY", raising=False)
    yield calls, blocked
    choices.reset("toy")


def test_decided_once_on_first_use_with_the_reason(toy, caplog):
    calls, _ = toy
    with caplog.at_level(logging.DEBUG, logger="liftplus_fast"):
        assert choices.get("toy") == "b" and choices.get("toy") == "b"
    assert calls == [1]
    assert choices.explain("toy") == {"option": "b", "why": "measured: b 1000.00 ms, a 2000.00 ms"}
    assert choices.table(["toy"]) == {"toy": choices.explain("toy")}
    assert [r.getMessage() for r in caplog.records] == [
        "liftplus_fast: toy runs b (measured: b 1000.00 ms, a 2000.00 ms)"
    ]
    choices.reset("toy")
    assert choices.get("toy") == "b" and calls == [1, 1]


@pytest.mark.parametrize("value", ["c", " C "])
def test_the_variable_forces_an_option_without_measuring(toy, monkeypatch, value):
    calls, _ = toy
    monkeypatch.setenv("LIFTPLUS_FAST_TOY", value)
    assert choices.explain("toy") == {"option": "c", "why": "forced by LIFTPLUS_FAST_TOY=c"}
    assert calls == []


def test_a_bad_value_or_an_option_that_cannot_run_names_the_variable(toy, monkeypatch):
    _, blocked = toy
    monkeypatch.setenv("LIFTPLUS_FAST_TOY", "fastest")
    with pytest.raises(UserInputError, match="LIFTPLUS_FAST_TOY must be one of a, b, c"):
        choices.get("toy")
    monkeypatch.setenv("LIFTPLUS_FAST_TOY", "c")
    blocked["c"] = "no such unit"
    with pytest.raises(UserInputError, match="LIFTPLUS_FAST_TOY=c cannot run here: no such unit"):
        choices.get("toy")


def test_a_table_from_another_process_is_checked_then_taken(toy):
    calls, _ = toy
    with pytest.raises(ValueError, match="not a decision of a known choice"):
        choices.adopt({"toy": {"option": "d"}})
    with pytest.raises(ValueError, match="not a decision of a known choice"):
        choices.adopt({"nonesuch": {"option": "a"}})
    assert "toy" not in choices._OPTION  # nothing taken from a table with a bad entry
    choices.adopt({"toy": {"option": "c", "why": "rank 0 measured"}})
    assert choices.explain("toy") == {"option": "c", "why": "rank 0 measured"} and calls == []


@pytest.mark.parametrize(
    "seconds,option",
    [({"a": 1.0, "b": 1.05}, "a"), ({"a": 1.09, "b": 1.0}, "a"), ({"a": 1.2, "b": 1.0}, "b"), ({"b": 1.0}, "b")],
)
def test_faster_keeps_the_preferred_option_near_a_tie(seconds, option):
    assert choices.faster(seconds, prefer="a")[0] == option


def test_best_seconds_interleaves_and_keeps_the_best():
    order = []
    seconds = choices.best_seconds({"x": lambda: order.append("x"), "y": lambda: order.append("y")}, rounds=2)
    assert order == ["x", "y"] * 3 and set(seconds) == {"x", "y"} and all(s >= 0 for s in seconds.values())


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _ran(fn):
    with _Ops() as mode:
        fn()
    return mode.names


@pytest.mark.skipif(not NATIVE, reason="native extension not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_runs_the_option_chosen(monkeypatch, dtype):
    monkeypatch.setitem(choices._OPTION, "half_gemm", "native")
    qkv = torch.randn(2, 9, 3 * 16, dtype=dtype, requires_grad=True)
    expect = {"brgemm": "attention_brgemm_fwd", "kernel": "attention_fwd", "sdpa": "scaled_dot_product"}
    for option, op in expect.items():
        if option == "brgemm" and not attention_mod._BRGEMM_LAYOUT:
            continue
        monkeypatch.setitem(choices._OPTION, attention_mod.CHOICES[dtype].name, option)
        names = _ran(lambda: lf.ops.attention(qkv, 2).float().sum().backward())
        assert any(op in n for n in names), (option, names)
        others = {"attention_brgemm_fwd", "attention_fwd"} - {op}
        assert not any(n.endswith("::" + o) or n.endswith("." + o) for n in names for o in others), (option, names)


@pytest.mark.skipif(not NATIVE, reason="native extension not built")
def test_attention_is_forced_by_its_variable(monkeypatch):
    monkeypatch.delitem(choices._OPTION, "attention_bf16", raising=False)
    monkeypatch.delitem(choices._WHY, "attention_bf16", raising=False)
    monkeypatch.setenv(attention_mod.ENV_VAR, "sdpa")
    monkeypatch.setattr(attention_mod, "_time_options", _must_not_measure)
    try:
        assert choices.explain("attention_bf16") == {"option": "sdpa", "why": "forced by LIFTPLUS_FAST_ATTENTION=sdpa"}
        monkeypatch.setattr(attention_mod, "_BRGEMM_LAYOUT", "")  # a torch without brgemm
        choices.reset("attention_bf16")
        monkeypatch.setenv(attention_mod.ENV_VAR, "brgemm")
        with pytest.raises(UserInputError, match="LIFTPLUS_FAST_ATTENTION=brgemm cannot run here"):
            choices.get("attention_bf16")
    finally:
        choices.reset("attention_bf16")


@pytest.mark.skipif(not NATIVE, reason="native extension not built")
def test_attention_measures_only_what_can_run(monkeypatch):
    seen = []

    def timed(dtype, options):
        seen.append((dtype, list(options)))
        return {name: 1.0 + i for i, name in enumerate(options)}

    monkeypatch.setattr(attention_mod, "_time_options", timed)
    monkeypatch.setitem(choices._OPTION, "half_gemm", "native")
    assert attention_mod.CHOICES[torch.float32].decide()[0] == seen[-1][1][0]
    assert "sdpa" in seen[-1][1]
    monkeypatch.setitem(choices._OPTION, "half_gemm", "fp32")  # bf16 GEMMs as fp32: nothing to time
    option, why = attention_mod.CHOICES[torch.bfloat16].decide()
    assert option == "sdpa" and "fp32" in why and len(seen) == 1


@pytest.mark.skipif(not NATIVE, reason="native extension not built")
def test_attention_timing_runs_every_option_given():
    options = ["kernel", "sdpa"] + (["brgemm"] if attention_mod._BRGEMM_LAYOUT else [])
    seconds = attention_mod._time_options(torch.float32, options)
    assert set(seconds) == set(options) and all(0 < s < 60 for s in seconds.values())


@pytest.mark.skipif(not NATIVE, reason="native extension not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bias_gelu_runs_the_option_chosen(monkeypatch, dtype):
    x = torch.randn(2, 5, 8, dtype=dtype, requires_grad=True)
    w, b = torch.randn(16, 8, dtype=dtype), torch.randn(16, dtype=dtype)
    outs = {}
    for option in ("fused", "eager"):
        monkeypatch.setitem(choices._OPTION, linear_gelu_mod.CHOICES[dtype].name, option)
        names = _ran(lambda o=option: outs.setdefault(o, lf.ops.linear_gelu(x, w, b)).float().sum().backward())
        assert any("bias_gelu_fwd" in n for n in names) is (option == "fused"), names
    rel = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outs["fused"], outs["eager"], rtol=rel, atol=rel)


@pytest.mark.parametrize("frozen", [True, False])
def test_layer_norm_fused_only_for_frozen_weights(monkeypatch, frozen):
    monkeypatch.setitem(choices._OPTION, "layer_norm_bf16", "fused")
    x = torch.randn(6, 32).to(torch.bfloat16).requires_grad_()
    w = torch.randn(32, requires_grad=not frozen)
    b = torch.randn(32, requires_grad=not frozen)
    names = _ran(lambda: lf.ops.fp32_layer_norm(x, w, b, 1e-5).sum().backward())
    casts = sum("_to_copy" in n for n in names)
    assert (casts == 0) is frozen, names
    monkeypatch.setitem(choices._OPTION, "layer_norm_bf16", "cast")
    x2 = x.detach().clone().requires_grad_()
    ref = lf.ops.fp32_layer_norm(x2, w.detach(), b.detach(), 1e-5)
    ref.float().sum().backward()
    out = lf.ops.fp32_layer_norm(x.detach(), w.detach(), b.detach(), 1e-5)
    # Same fp32 arithmetic rounded once: at most a one-ulp flip of bf16 from the order of sums.
    out, ref = out.detach().float(), ref.detach().float()
    assert float((out - ref).abs().max()) <= 2**-7 * float(ref.abs().max())


def test_every_choice_decides_on_this_machine(monkeypatch):
    # The real timings (a fraction of a second each), for what this CPU has.
    names = ("attention_bf16", "attention_fp32", "bias_gelu_bf16", "bias_gelu_fp32", "layer_norm_bf16", "linear_bf16")
    for name in names:
        monkeypatch.delitem(choices._OPTION, name, raising=False)
        monkeypatch.delitem(choices._WHY, name, raising=False)
    for var in (attention_mod.ENV_VAR, linear_gelu_mod.ENV_VAR, layer_norm_mod.ENV_VAR):
        monkeypatch.delenv(var, raising=False)
    table = choices.table()
    for name, decided in table.items():
        assert decided["option"] in choices._CHOICES[name].options and decided["why"], name
    for name in ("attention_bf16", "attention_fp32", "bias_gelu_fp32", "layer_norm_bf16"):
        assert table[name]["why"].startswith(("measured: ", "bf16 GEMMs run as fp32", "the native")), table[name]


def _must_not_measure(*args, **kwargs):
    raise AssertionError("measured where the variable forced the option")


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_choices_first_needed_in_evaluation_still_decide(monkeypatch, mode):
    # Prediction and evaluation can be the first to need a choice; its timings run backward passes.
    names = ("attention_bf16", "bias_gelu_bf16", "layer_norm_bf16")
    for name in names:
        monkeypatch.delitem(choices._OPTION, name, raising=False)
        monkeypatch.delitem(choices._WHY, name, raising=False)
    for var in (attention_mod.ENV_VAR, linear_gelu_mod.ENV_VAR, layer_norm_mod.ENV_VAR):
        monkeypatch.delenv(var, raising=False)
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        decided = {name: choices.get(name) for name in names}
    assert all(decided[name] in choices._CHOICES[name].options for name in names)
