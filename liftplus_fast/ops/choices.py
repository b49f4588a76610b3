"""Implementations chosen by measurement on the machine at hand.

Which implementation of an op is fastest depends on the CPU more than on anything the package
can read from it: the same AVX512-BF16 flag comes with bf16 GEMMs 1.9x faster than fp32 on one
machine and 1.6x slower on another, and AMX changes the balance between a hand-written kernel,
PyTorch's own and a batch-reduce-GEMM one again. So each such op defines a *choice* here: its
options, an environment variable that forces one, and a function that decides when nothing is
forced (timing the options on the op's real shapes where the facts do not settle it).

* **Decided once**, on first use (or by :func:`table`), then a plain lookup: no step pays for it,
  and ``torch.compile`` guards on the decision like on any global.
* **Logged**: :func:`table` lists every decision with its reason; ``fast_train`` writes it to
  the training log on CPU, ``backend_info()["choices"]`` returns it (and each decision is logged
  at ``DEBUG`` on the ``liftplus_fast`` logger when it is made).
* **Forceable**: the choice's environment variable names an option (validated; a bad value or an
  option that cannot run here is a ``UserInputError`` naming the variable).
* **Agreed across processes**: :func:`adopt` takes a table decided elsewhere;
  ``DistContext.agree_on_choices`` gives every ``torchrun`` process rank 0's, since processes
  sharing a machine can time differently.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch

from ..errors import UserInputError

__all__ = ["Choice", "adopt", "best_seconds", "define", "explain", "faster", "get", "reset", "table"]

logger = logging.getLogger("liftplus_fast")


@dataclass(frozen=True)
class Choice:
    """One measured choice: ``decide()`` returns ``(option, why)`` when ``env_var`` is unset;
    ``available()`` the options that can run here (``(option, why not)`` pairs for the others)."""

    name: str
    options: Tuple[str, ...]
    env_var: str
    decide: Callable[[], Tuple[str, str]]
    available: Optional[Callable[[], Dict[str, str]]] = None  # option -> why it cannot run


_CHOICES: Dict[str, Choice] = {}
# name -> option / reason, filled on first use. Plain dicts of strings: torch.compile guards on
# the entries it reads. Tests set entries with monkeypatch.setitem.
_OPTION: Dict[str, str] = {}
_WHY: Dict[str, str] = {}


def define(choice: Choice) -> Choice:
    """Register ``choice`` (once per name; a module reloaded in tests redefines it)."""
    _CHOICES[choice.name] = choice
    return choice


def _forced(choice: Choice) -> Optional[str]:
    text = os.environ.get(choice.env_var, "").strip().lower()
    if not text:
        return None
    if text not in choice.options:
        raise UserInputError(f"{choice.env_var} must be one of {', '.join(choice.options)} (or unset); got {text!r}")
    blocked = choice.available() if choice.available is not None else {}
    if text in blocked:
        raise UserInputError(f"{choice.env_var}={text} cannot run here: {blocked[text]}")
    return text


@torch.compiler.disable
def _decide(name: str) -> str:
    choice = _CHOICES[name]
    forced = _forced(choice)
    if forced:
        option, why = forced, f"forced by {choice.env_var}={forced}"
    else:
        # A choice first needed in evaluation (no_grad, inference_mode) still times backward passes.
        with torch.inference_mode(False), torch.enable_grad():
            option, why = choice.decide()
    if option not in choice.options:
        raise RuntimeError(f"choice {name} decided {option!r}, not one of {choice.options}")
    _OPTION[name], _WHY[name] = option, why
    logger.debug("liftplus_fast: %s runs %s (%s)", name, option, why)
    return option


def get(name: str) -> str:
    """The option ``name`` runs (decided on the first call)."""
    option = _OPTION.get(name)
    return option if option is not None else _decide(name)


def explain(name: str) -> Dict[str, str]:
    """``{"option": ..., "why": ...}`` for ``name`` (decided on the first call)."""
    option = get(name)
    return {"option": option, "why": _WHY.get(name) or "set by the caller"}


def table(names: Optional[Iterable[str]] = None) -> Dict[str, Dict[str, str]]:
    """Every registered choice (or those in ``names``) with its option and reason, deciding
    those not decided yet."""
    return {name: explain(name) for name in (sorted(_CHOICES) if names is None else names)}


def adopt(decided: Dict[str, Dict[str, str]]) -> None:
    """Take choices decided elsewhere (what :func:`table` returned on another process)."""
    if not isinstance(decided, dict):
        raise ValueError(f"decided must be a dict name -> {{'option', 'why'}}; got {decided!r}")
    for name, entry in decided.items():
        choice = _CHOICES.get(name)
        option = entry.get("option") if isinstance(entry, dict) else None
        if choice is None or option not in choice.options:
            raise ValueError(f"not a decision of a known choice: {name!r} -> {entry!r}")
    for name, entry in decided.items():
        _OPTION[name], _WHY[name] = entry["option"], str(entry.get("why", ""))


def reset(name: Optional[str] = None) -> None:
    """Forget the decision of ``name`` (every decision when ``None``): it is made again on next use."""
    for store in (_OPTION, _WHY):
        if name is None:
            store.clear()
        else:
            store.pop(name, None)


def best_seconds(runs: Dict[str, Callable[[], object]], rounds: int = 3) -> Dict[str, float]:
    """Best-of-``rounds`` seconds of each run, interleaved (the first round also warms up)."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds + 1):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def faster(seconds: Dict[str, float], prefer: str, margin: float = 1.1) -> Tuple[str, str]:
    """The fastest option, except that ``prefer`` is kept unless another is faster by
    ``margin`` (so a near tie decides the same way run after run); with the reason."""
    best = min(seconds, key=seconds.get)
    option = prefer if prefer in seconds and seconds[prefer] <= margin * seconds[best] else best
    times = ", ".join(f"{name} {1e3 * s:.2f} ms" for name, s in sorted(seconds.items(), key=lambda kv: kv[1]))
    return option, f"measured: {times}"
