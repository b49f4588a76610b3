"""The option listing: `liftplus-fast options` and docs/options.md, both generated from the
option declarations."""

import os

from liftplus_fast.config import OPTION_ALIASES, TRANSLATED_OPTIONS, option_table
from liftplus_fast.data.cache_store import CacheOptions
from liftplus_fast.option_listing import options_markdown, options_text
from liftplus_fast.options import describe
from liftplus_fast.predict import PredictOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_docs_options_md_is_the_generated_listing():
    with open(os.path.join(ROOT, "docs", "options.md"), encoding="utf-8") as f:
        written = f.read()
    assert written == options_markdown(), "docs/options.md is stale: regenerate it with `make options-doc`"


def test_every_option_is_listed_with_type_default_and_meaning():
    text = options_text()
    sections = text.split("\n\n")
    listed = {}  # section title -> {name: line}
    for title, body in zip(sections[::2], sections[1::2]):
        listed[title.strip().rstrip(":")] = {line.split()[0]: line for line in body.splitlines()}
    expected = {
        "Options of train and test": option_table(),
        "Options of cache": describe(CacheOptions),
        "Flags of predict": [
            r.__class__(**{**r.__dict__, "name": "--" + r.name.replace("_", "-")}) for r in describe(PredictOptions)
        ],
    }
    for title, rows in expected.items():
        assert set(listed[title]) == {r.name for r in rows}, title
        for row in rows:
            assert listed[title][row.name].rstrip().endswith(row.help), row.name
    run = listed["Options of train and test"]
    assert run["lr"].split()[1:3] == ["float", "0.02"] and "int or None" in run["v.adaptformer_dim"]
    for name in set(OPTION_ALIASES) | set(TRANSLATED_OPTIONS):
        assert f"\n  {name} " in text
    markdown = options_markdown()
    for row in option_table():
        assert f"| `{row.name}` |" in markdown
    # Every table row has the five cells: a '|' inside a cell would break it.
    for line in markdown.splitlines():
        if line.startswith("| `"):
            assert line.count(" | ") - line.count("\\|") in (1, 4), line
