"""Options declared once: each a dataclass field carrying its type, default, check and help.

A field made with :func:`option` holds everything about one option: its type (the annotation),
its default, the check of its values and one line of help. The dataclasses that hold options
(:class:`~liftplus_fast.config.LiftConfig`, :class:`~liftplus_fast.config.TunerConfig`,
:class:`~liftplus_fast.data.cache_store.CacheOptions`) are therefore the option tables: checks,
``key value`` parsing and the printed list of options (:func:`describe`) are read from them.

A check is a function ``check(value) -> (ok, normalised value, what is expected)``, so every
message has one shape: ``option NAME must be EXPECTED; got VALUE``.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import re
from dataclasses import MISSING, dataclass, fields
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

from .errors import UserInputError

__all__ = [
    "Check",
    "OptionInfo",
    "check_fields",
    "check_value",
    "choice",
    "describe",
    "device",
    "flag",
    "integer",
    "key_value_pairs",
    "number",
    "option",
    "parse_value",
    "rgb",
    "text",
]

Check = Callable[[Any], Tuple[bool, Any, str]]


def option(default: Any = MISSING, check: Optional[Check] = None, help: str = "", *, default_factory: Any = MISSING):
    """A dataclass field declaring one option: its ``default``, its ``check`` and one line of ``help``."""
    if not help:
        raise ValueError("every option needs one line of help")
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"check": check, "help": help})


def check_value(name: str, check: Check, value: Any) -> Any:
    """``value`` checked (and normalised) for option ``name``, or :class:`UserInputError` naming it."""
    ok, out, expected = check(value)
    if not ok:
        raise UserInputError(f"option {name} must be {expected}; got {value!r}")
    return out


def check_fields(obj: Any, prefix: str = "") -> None:
    """Check every option field of the dataclass ``obj``, normalising the values in place."""
    for f in fields(obj):
        check = f.metadata.get("check")
        if check is not None:
            object.__setattr__(obj, f.name, check_value(prefix + f.name, check, getattr(obj, f.name)))


@dataclass(frozen=True)
class OptionInfo:
    """One row of the option table: what ``liftplus-fast options`` prints."""

    name: str
    type: str
    default: Any
    expected: str
    help: str


def describe(holder: Any, prefix: str = "") -> List[OptionInfo]:
    """The options of ``holder`` (an options dataclass, or an instance whose values are then the
    defaults shown) in declaration order; fields without a check are not options."""
    out = []
    for f in fields(holder):
        check = f.metadata.get("check")
        if check is None:
            continue
        if not isinstance(holder, type):
            default = getattr(holder, f.name)
        else:
            default = f.default if f.default is not MISSING else f.default_factory()
        out.append(OptionInfo(prefix + f.name, str(f.type), default, check(default)[2], f.metadata["help"]))
    return out


def parse_value(text: Any) -> Any:
    """A command-line word as a value: ``None``/``true``/``false`` (any case), a Python literal, else the text."""
    if not isinstance(text, str):
        return text
    lowered = text.lower()
    if lowered in ("none", "null"):
        return None
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, RecursionError, MemoryError):  # not a literal (or an absurd one)
        return text


def key_value_pairs(opts: Iterable[str]) -> List[Tuple[str, str]]:
    """``["a", "1", "b", "2"]`` as ``[("a", "1"), ("b", "2")]`` (:class:`UserInputError` on an odd count)."""
    opts = list(opts)
    if len(opts) % 2:
        raise UserInputError(f"options must come as 'key value' pairs; got {opts}")
    return list(zip(opts[::2], opts[1::2]))


# --- checks -----------------------------------------------------------------------------------


def number(kind: type = float, lo=None, hi=None, lo_open=False, hi_open=False, optional=False) -> Check:
    """A finite number (``kind`` float) or an integer (``kind`` int) in a range; ints are accepted for floats."""
    bounds = []
    if lo is not None:
        bounds.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        bounds.append(f"{'<' if hi_open else '<='} {hi}")
    what = ("an integer" if kind is int else "a finite number") + (" " + " and ".join(bounds) if bounds else "")
    if optional:
        what += " or None"

    def check(value):
        if value is None:
            return optional, value, what
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, value, what
        if kind is int and not (isinstance(value, int) or float(value).is_integer()):
            return False, value, what
        if kind is float and not math.isfinite(value):
            return False, value, what
        value = kind(value)
        if lo is not None and (value < lo or (lo_open and value == lo)):
            return False, value, what
        if hi is not None and (value > hi or (hi_open and value == hi)):
            return False, value, what
        return True, value, what

    return check


def integer(lo=None, hi=None, optional=False) -> Check:
    """An integer in ``[lo, hi]`` (either bound may be left open-ended with ``None``)."""
    return number(int, lo=lo, hi=hi, optional=optional)


def choice(values: Sequence[str], optional: bool = False) -> Check:
    """One of ``values`` (or ``None`` when ``optional``)."""
    values = tuple(values)
    what = "one of " + ", ".join(repr(v) for v in values) + (" or None" if optional else "")

    def check(value):
        return (value is None and optional) or (isinstance(value, str) and value in values), value, what

    return check


def flag(value) -> Tuple[bool, Any, str]:
    """``True`` or ``False``."""
    return isinstance(value, bool), value, "True or False"


def text(optional: bool = False, nonempty: bool = True) -> Check:
    """A (non-empty) string, or ``None`` when ``optional``."""
    what = ("a non-empty string" if nonempty else "a string") + (" or None" if optional else "")

    def check(value):
        if value is None:
            return optional, value, what
        return isinstance(value, str) and (bool(value.strip()) or not nonempty), value, what

    return check


def rgb(positive: bool) -> Check:
    """Three finite numbers, one per RGB channel (all > 0 when ``positive``), normalised to a tuple of floats."""
    what = "three finite numbers (one per RGB channel)" + (", all > 0" if positive else "")

    def check(value):
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 3
            or any(
                isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or (positive and x <= 0)
                for x in value
            )
        ):
            return False, value, what
        return True, tuple(float(x) for x in value), what

    return check


def device(value) -> Tuple[bool, Any, str]:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    what = "'auto', 'cpu', 'cuda' or 'cuda:N'"
    ok = isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", value) is not None
    return ok, value, what
