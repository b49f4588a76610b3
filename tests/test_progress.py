"""Progress output: tqdm on a terminal, periodic plain lines in log files."""

import io

import pytest

from liftplus_fast.progress import PlainProgress, progress_bar, progress_interval


class FakeClock:
    def __init__(self, step):
        self.t, self.step = 0.0, step

    def __call__(self):
        self.t += self.step
        return self.t


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_file_gets_plain_lines_at_the_interval_not_carriage_returns():
    out = io.StringIO()
    bar = PlainProgress(range(100), "epoch 1/3", None, out, interval=10.0, clock=FakeClock(1.0))
    for i in bar:
        bar.set_postfix(loss=f"{1.0 / (i + 1):.4f}")
    lines = out.getvalue().splitlines()
    # One clock tick per item (plus the start): a line every 10 items.
    assert len(lines) == 10 and "\r" not in out.getvalue()
    assert lines[0].startswith("epoch 1/3: 10/100 (10%) 1.0 it/s, elapsed 10s, eta 90s")
    assert lines[0].endswith("loss=0.1000") and lines[-1].startswith("epoch 1/3: 100/100 (100%)")


def test_short_loops_write_nothing():
    out = io.StringIO()
    assert list(progress_bar(range(5), "Testing", stream=out)) == list(range(5))
    assert out.getvalue() == ""


def test_terminal_gets_tqdm_and_disable_is_silent(monkeypatch):
    from tqdm.auto import tqdm

    term = Terminal()
    bar = progress_bar(range(3), "x", stream=term)
    assert isinstance(bar, tqdm) and list(bar) == [0, 1, 2]
    monkeypatch.setenv("LIFTPLUS_FAST_PROGRESS_INTERVAL", "0")
    quiet = io.StringIO()
    assert list(progress_bar(range(3), "x", disable=True, stream=quiet)) == [0, 1, 2]
    assert quiet.getvalue() == ""


def test_terminal_bar_iterates_its_iterable_once():
    # A DataLoader starts its workers and draws a seed on every iter(): the bar must call it once.
    class Loader:
        starts = 0

        def __iter__(self):
            Loader.starts += 1
            return iter(range(4))

        def __len__(self):
            return 4

    bar = progress_bar(Loader(), "epoch 1/1", stream=Terminal())
    assert bar.total == 4 and list(bar) == [0, 1, 2, 3]
    assert Loader.starts == 1


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.setenv("LIFTPLUS_FAST_PROGRESS_INTERVAL", "0")
    out = io.StringIO()
    bar = progress_bar([1, 2, 3], "Features", stream=out)
    assert len(bar) == 3 and list(bar) == [1, 2, 3]
    lines = out.getvalue().splitlines()
    assert [line.split(" it/s")[0].rsplit(" ", 1)[0] for line in lines] == [
        "Features: 1/3 (33%)",
        "Features: 2/3 (67%)",
        "Features: 3/3 (100%)",
    ]
    monkeypatch.setenv("LIFTPLUS_FAST_PROGRESS_INTERVAL", "soon")
    with pytest.raises(ValueError, match="LIFTPLUS_FAST_PROGRESS_INTERVAL must be a number"):
        progress_interval()


def test_training_in_a_log_file_writes_lines_not_frames(tmp_path, capfd, monkeypatch):
    import liftplus_fast as lf

    monkeypatch.setenv("LIFTPLUS_FAST_PROGRESS_INTERVAL", "0")  # a line per batch, to see them all
    lf.fast_train(
        dataset="digits_lt",
        root=str(tmp_path / "data"),
        backbone="tiny_vit",
        pretrained=None,
        resolution=32,
        batch_size=128,
        num_workers=0,
        num_epochs=1,
        prec_train="fp32",
        prec_test="fp32",
        progress=True,
    )
    err = capfd.readouterr().err
    assert "\r" not in err
    assert "epoch 1/1: 1/3 (33%)" in err and "loss=" in err and "Testing: 1/" in err
