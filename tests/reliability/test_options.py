"""Every option is type- and range-checked by name when the config is built, LiftConfig included."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from liftplus_fast.cli import main as cli_main
from liftplus_fast.config import OPTION_CHECKS, LiftConfig, check_option, make_config


@pytest.mark.parametrize(
    "name, text",
    [
        ("lr", "abc"),
        ("weight_decay", "abc"),
        ("momentum", "abc"),
        ("seed", "abc"),
        ("la_tau", "abc"),
        ("expand", "abc"),
        ("resolution", "abc"),
        ("v.adaptformer_dim", "abc"),
        ("tte", "maybe"),
        ("mean", "[0.5]"),
        ("num_workers", "-1"),
        ("v.adaptformer_dim", "0"),
        ("num_epochs", "0"),
        ("lr", "nan"),
        ("lr", "-1"),
        ("momentum", "1.5"),
        ("std", "[1, 0, 1]"),
        ("batch_size", "2.5"),
        ("loss_type", "nope"),
        ("dist_timeout", "0"),
        ("nonfinite_loss", "ignore"),
        ("v.lora_layers", "range("),
        ("dataset", "''"),
    ],
)
def test_bad_value_is_rejected_naming_the_option(name, text):
    with pytest.raises(ValueError, match=rf"option {name} must be "):
        make_config("lift+", opts=[name, text])


def test_liftconfig_itself_checks_its_options():
    with pytest.raises(ValueError, match="option batch_size must be an integer >= 1; got 0"):
        LiftConfig(lr=-1, batch_size=0, loss_type="nope")
    with pytest.raises(ValueError, match="option lr must be a finite number > 0; got -1"):
        LiftConfig(lr=-1)
    with pytest.raises(ValueError, match="option loss_type must be one of"):
        LiftConfig(loss_type="nope")
    with pytest.raises(ValueError, match="option v.adaptformer_dim"):
        LiftConfig.from_dict(dict(LiftConfig().to_dict(), v={"adaptformer_dim": -4}))


def test_values_are_normalised():
    cfg = make_config("lift+", opts=["lr", "1", "mean", "[0, 0.5, 1]", "v.adaptformer_layers", "(0, 1)"])
    assert isinstance(cfg.lr, float) and cfg.mean == (0.0, 0.5, 1.0) and cfg.v.adaptformer_layers == [0, 1]


def test_demo_with_zero_epochs_is_refused(tmp_path, capsys):
    code = cli_main(["demo", "--epochs", "0", "--output-dir", str(tmp_path / "demo"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "option num_epochs must be an integer >= 1; got 0" in err


def test_every_field_has_a_check():
    from dataclasses import fields

    names = {f.name for f in fields(LiftConfig) if f.name not in ("v", "l")}
    names |= {"v." + f.name for f in fields(LiftConfig().v)}
    names |= {"l." + f.name for f in fields(LiftConfig().l)}
    assert names == set(OPTION_CHECKS)


# Values as a user types them: numbers, words, lists, expressions, blanks.
_texts = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(
        [
            "True",
            "False",
            "None",
            "nan",
            "inf",
            "-inf",
            "",
            " ",
            "[]",
            "[0.5]",
            "[1, 2, 3]",
            "(0.1, 0.2, 0.3)",
            "range(3)",
            "range(",
            "{}",
            "'x'",
            "abc",
            "CE",
            "LA",
            "skip",
            "fp16",
            "1e999",
            "0x10",
            "[True, 1, 2]",
            "CosineClassifier",
            "mlp",
        ]
    ),
    st.text(max_size=12),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(OPTION_CHECKS)), text=_texts)
def test_random_values_at_the_command_line_parser(name, text):
    try:
        cfg = make_config("lift+", opts=[name, text])
    except ValueError as exc:
        # Every rejection names the option it rejects.
        assert name in str(exc), (name, text, str(exc))
        return
    target, field = (
        (cfg.v, name[2:]) if name.startswith("v.") else (cfg.l, name[2:]) if name.startswith("l.") else (cfg, name)
    )
    value = getattr(target, field)
    # An accepted value passes its own check unchanged: what config.json records is what runs.
    assert check_option(name, value) == value
    assert LiftConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
