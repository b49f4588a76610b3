"""The option listing: what ``liftplus-fast options`` prints and what docs/options.md holds.

Both are generated from the option declarations (:func:`liftplus_fast.config.option_table`,
:class:`~liftplus_fast.data.cache_store.CacheOptions`,
:class:`~liftplus_fast.predict.PredictOptions`), so they cannot drift from what the command
line accepts; ``tests/test_option_listing.py`` keeps docs/options.md equal to
:func:`options_markdown` (regenerate it with ``make options-doc``).
"""

from __future__ import annotations

import re
from typing import Any, List, Sequence, Tuple

from .config import OPTION_ALIASES, TRANSLATED_HELP, option_table
from .data.cache_store import CacheOptions
from .options import OptionInfo, describe
from .predict import PredictOptions

__all__ = ["option_sections", "options_markdown", "options_text"]

_INTRO = (
    "`train` and `test` take these as `key value` words after `-d`, `-b` and `-m` (published "
    "names and meanings, e.g. `num_epochs 15 v.adaptformer_dim 8`), or as keys of a config file "
    "given to `-d`, `-b` or `-m` (`v:` / `l:` as nested mappings). Flags such as `--no-progress` "
    "may come anywhere on the line."
)


def _type_name(annotation: str) -> str:
    optional = re.fullmatch(r"Optional\[(.+)\]", annotation)
    if optional:
        return f"{_type_name(optional.group(1))} or None"
    return {"Layers": "blocks", "tuple": "3 numbers"}.get(annotation, annotation)


def _value(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(f"{v:.4g}" for v in value) + ")"
    return str(value)


def option_sections() -> List[Tuple[str, str, List[OptionInfo]]]:
    """``(title, how they are given, rows)`` for every command that takes options."""
    return [
        ("Options of train and test", _INTRO, option_table()),
        ("Options of cache", "`key value` words after `-d` and `--root`.", describe(CacheOptions)),
        (
            "Flags of predict",
            "`--top-k 5` style flags besides `--model-dir`, `--images` and `--output`.",
            [
                OptionInfo("--" + o.name.replace("_", "-"), o.type, o.default, o.expected, o.help)
                for o in describe(PredictOptions)
            ],
        ),
    ]


def _translated() -> List[Tuple[str, str]]:
    names = sorted(set(OPTION_ALIASES) | set(TRANSLATED_HELP))
    return [(name, TRANSLATED_HELP[name]) for name in names]


def options_text() -> str:
    """The listing ``liftplus-fast options`` prints: per option its name, type, default and meaning."""
    lines: List[str] = []
    for title, _how, rows in option_sections():
        lines += [title + ":", ""]
        cells = [(r.name, _type_name(r.type), _value(r.default), r.help) for r in rows]
        widths = [max(len(c[i]) for c in cells) + 2 for i in range(3)]
        for name, kind, default, meaning in cells:
            lines.append(f"  {name:<{widths[0]}}{kind:<{widths[1]}}{default:<{widths[2]}}{meaning}")
        lines.append("")
    lines.append("Published names read as another option:")
    for name, meaning in _translated():
        lines.append(f"  {name:<14}{meaning}")
    lines += ["", "What each option accepts: docs/options.md, or the error a wrong value gets."]
    return "\n".join(lines) + "\n"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def _table(rows: Sequence[OptionInfo]) -> List[str]:
    out = ["| option | type | default | meaning | accepts |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        cells = (f"`{r.name}`", _type_name(r.type), f"`{_value(r.default)}`", r.help, r.expected)
        out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return out


def options_markdown() -> str:
    """docs/options.md: every option of every command, with type, default, meaning and what it accepts."""
    lines = [
        "# Options",
        "",
        "Generated from the option declarations by `liftplus-fast options --markdown` (`make options-doc`);",
        "`liftplus-fast options` prints the same list in the terminal.",
        "",
    ]
    for title, how, rows in option_sections():
        lines += [f"## {title}", "", how, "", *_table(rows), ""]
    lines += ["## Published names read as another option", "", "| name | meaning |", "| --- | --- |"]
    lines += [f"| `{name}` | {_cell(meaning)} |" for name, meaning in _translated()]
    return "\n".join(lines) + "\n"
