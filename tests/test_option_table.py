"""Each option is declared once (type, default, check, help); checks, the printed table and the
vocabularies are read from those declarations and from the parts that implement the options."""

import dataclasses

import pytest

from liftplus_fast.config import OPTION_CHECKS, LiftConfig, TunerConfig, check_option, option_table
from liftplus_fast.data.cache_store import CacheOptions
from liftplus_fast.data.transforms import MDA_FUNCS
from liftplus_fast.model.classifiers import CLASSIFIERS
from liftplus_fast.model.inits import CLASSIFIER_INITS
from liftplus_fast.model.losses import LOSSES
from liftplus_fast.model.precision import PRECISIONS
from liftplus_fast.model.text_head import COOP_CLS_POSITIONS
from liftplus_fast.model.tuners import AFT_LOCS, TUNERS
from liftplus_fast.options import describe, key_value_pairs


def test_the_table_lists_every_option_once_with_its_default_and_help():
    table = option_table()
    names = [o.name for o in table]
    assert len(names) == len(set(names)) and set(names) == set(OPTION_CHECKS)
    cfg = LiftConfig(apply_preset=False)
    for row in table:
        assert row.help and "\n" not in row.help and row.expected and row.type, row
        # The default shown is the one a config starts from, and it passes its own check.
        target, name = (cfg.v, row.name[2:]) if row.name.startswith("v.") else (cfg, row.name)
        if row.name.startswith("l."):
            target, name = cfg.l, row.name[2:]
        assert getattr(target, name) == row.default
        assert check_option(row.name, row.default) == row.default
    rows = {o.name: o for o in table}
    assert rows["lr"].default == 0.02 and rows["lr"].type == "float" and "> 0" in rows["lr"].expected
    assert rows["l.pt_layers"].default == "deep" and rows["v.pt_layers"].default is None


@pytest.mark.parametrize(
    "option, implemented",
    [
        ("classifier", list(CLASSIFIERS) + [None]),
        ("loss_type", list(LOSSES)),
        ("prec_train", list(PRECISIONS)),
        ("prec_test", list(PRECISIONS)),
        ("mda_func", list(MDA_FUNCS)),
        ("classifier_init", list(CLASSIFIER_INITS) + [None]),
        ("coop_cls_pos", list(COOP_CLS_POSITIONS)),
        ("v.aft_loc", list(AFT_LOCS)),
        ("l.aft_loc", list(AFT_LOCS)),
    ],
)
def test_a_vocabulary_is_what_its_part_implements(option, implemented):
    for value in implemented:
        assert check_option(option, value) == value
    with pytest.raises(ValueError, match=f"option {option} must be one of"):
        check_option(option, "not_implemented_here")


def test_the_tuner_options_are_those_of_the_installed_tuners():
    names = {f.name for f in dataclasses.fields(TunerConfig)}
    switches = [f.name for f in dataclasses.fields(TunerConfig) if f"{f.name}_layers" in names]
    assert switches == list(TUNERS)  # same tuners, in the installation order


def test_cache_options_are_declared_the_same_way():
    rows = {o.name: o for o in describe(CacheOptions)}
    assert set(rows) == {
        "split_dir",
        "cache_dir",
        "cache_size",
        "cache_format",
        "cache_quality",
        "num_workers",
        "cache_budget",
    }
    assert rows["cache_size"].default == 256 and all(o.help for o in rows.values())
    assert rows["cache_format"].default == "auto" and rows["cache_budget"].default is None
    opts = CacheOptions.from_pairs(["cache_size", "128", "cache_format", "raw", "num_workers", "0"])
    assert (opts.cache_size, opts.cache_format, opts.workers()) == (128, "raw", 0)
    assert CacheOptions(cache_dir="/c").folder("/data") == "/c" and CacheOptions().folder("/d").startswith("/d")
    with pytest.raises(ValueError, match="option cache_quality must be an integer >= 1 and <= 100; got 101"):
        CacheOptions(cache_quality=101)
    with pytest.raises(ValueError, match="option cache_budget must be a finite number > 0 or None; got 0"):
        CacheOptions.from_pairs(["cache_budget", "0"])
    with pytest.raises(ValueError, match="option cache_format must be one of 'auto', 'jpeg', 'raw'"):
        CacheOptions(cache_format="png")
    with pytest.raises(ValueError, match="unknown cache option 'size'"):
        CacheOptions.from_pairs(["size", "3"])
    with pytest.raises(ValueError, match="'key value' pairs"):
        key_value_pairs(["cache_size"])
