"""The liftplus-fast command line: smoke runs and one-sentence errors."""

import json
import os
import subprocess
import sys

import pytest

from tests.data.tiny_run import tiny_argv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "liftplus_fast", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )


def test_info_prints_backend_json():
    out = run_cli("info")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert "tte_aggregate" in info["ops"] and "native" in info


def test_train_then_test_smoke(tmp_path):
    out_dir = tmp_path / "cli_run"
    out = run_cli(*tiny_argv(out_dir, method="lift+", batch_size=64))
    assert out.returncode == 0, out.stderr
    assert "many:" in out.stdout and (out_dir / "checkpoint.pth.tar").exists()
    test = run_cli(
        "test",
        "-d",
        "digits_lt",
        "-b",
        "tiny_vit",
        "-m",
        "lift+",
        "--output-dir",
        str(tmp_path / "t"),
        "--no-progress",
        "model_dir",
        str(out_dir),
        "resolution",
        "32",
        "num_workers",
        "0",
        "tte",
        "True",
    )
    assert test.returncode == 0, test.stderr
    assert "overall accuracy" in test.stdout


@pytest.mark.parametrize(
    "opts, match",
    [
        (["-d", "nope_lt"], "nope_lt"),
        (["-d", "digits_lt", "batch_size", "10", "accum_step", "3"], "divisible"),
        (["-d", "digits_lt", "no_such_option", "1"], "no_such_option"),
    ],
)
def test_errors_are_one_sentence(opts, match, tmp_path):
    out = run_cli("train", "-b", "tiny_vit", "--output-dir", str(tmp_path / "o"), *opts)
    assert out.returncode == 2
    assert match in out.stderr and "Traceback" not in out.stderr


def test_only_user_input_errors_become_one_line(monkeypatch, capsys):
    from liftplus_fast import cli
    from liftplus_fast.errors import UserInputError

    def bad_input(_args):
        raise UserInputError("v.aft_loc must be 'attn', 'mlp' or 'all'; got 'x'")

    monkeypatch.setattr(cli, "cmd_info", bad_input)
    assert cli.main(["info"]) == 2
    assert capsys.readouterr().err.strip() == "liftplus-fast: error: v.aft_loc must be 'attn', 'mlp' or 'all'; got 'x'"

    for internal in (
        AssertionError("kernel invariant"),
        ValueError("an internal shape bug"),
        RuntimeError("a kernel failure"),
    ):

        def fail(_args, exc=internal):
            raise exc

        monkeypatch.setattr(cli, "cmd_info", fail)
        with pytest.raises(type(internal), match=str(internal)):
            cli.main(["info"])
