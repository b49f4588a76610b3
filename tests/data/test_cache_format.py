"""``cache_format auto``: raw where the raw cache fits the disk budget, jpeg otherwise, and kept once chosen."""

import os

import pytest
from PIL import Image

from liftplus_fast.cli import main as cli_main
from liftplus_fast.data import build_dataset, cache_build, cache_format
from liftplus_fast.data.cache_build import build_cache
from liftplus_fast.data.cache_format import choose_format, estimate_raw_bytes, raw_budget
from liftplus_fast.data.cache_store import CacheOptions, cached_size, data_path, read_index, source_fingerprint

from .conftest import interrupt_build


def _raw_bytes(paths, cache_size):
    total = 0
    for p in paths:
        with Image.open(p) as img:
            h, w = cached_size(img.height, img.width, cache_size)
        total += 3 * h * w
    return total


def test_the_estimate_is_exact_when_every_image_is_sampled_and_close_from_a_sample(folder):
    paths = build_dataset("imagefolder", folder, "train").paths
    assert estimate_raw_bytes(paths, 44) == _raw_bytes(paths, 44)
    assert estimate_raw_bytes(paths, 30) == _raw_bytes(paths, 30)
    # Three of ten images: the mean of their sizes, times ten.
    sampled = estimate_raw_bytes(paths, 44, sample=3)
    assert 0.5 * _raw_bytes(paths, 44) < sampled < 1.5 * _raw_bytes(paths, 44)
    assert estimate_raw_bytes([], 44) == 0
    # Unreadable files are left out of the estimate, not fatal.
    assert estimate_raw_bytes(paths + [os.path.join(folder, "missing.jpg")], 44, sample=100) > 0


@pytest.mark.parametrize("budget_gib, expected", [(1.0, "raw"), (1e-6, "jpeg")])
def test_auto_stores_raw_within_the_budget_and_jpeg_over_it(folder, tmp_path, budget_gib, expected):
    cdir = str(tmp_path / "c")
    summary = build_cache("imagefolder", folder, cdir, cache_size=44, cache_budget=budget_gib, progress=False)
    need = sum(_raw_bytes(build_dataset("imagefolder", folder, s).paths, 44) for s in ("train", "test"))
    for split in ("train", "test"):
        header, _ = read_index(cdir, split)
        assert header["cache_format"] == expected == summary[split]["cache_format"]
        assert "cache_budget" in summary[split]["format_reason"]
    if expected == "raw":  # the estimate of a fully sampled folder is the size written
        assert need == sum(os.path.getsize(data_path(cdir, s)) for s in ("train", "test"))
    # The stored format is what the fingerprint holds: the cache opens for training as any other.
    assert len(cache_build.open_source_cache("imagefolder", folder, "train", cdir)) == 10


def test_auto_keeps_a_cache_or_an_unfinished_build_whatever_the_budget_says(folder, tmp_path, monkeypatch):
    cdir = str(tmp_path / "c")
    build_cache("imagefolder", folder, cdir, cache_size=44, cache_format="jpeg", progress=False)
    again = build_cache("imagefolder", folder, cdir, cache_size=44, cache_budget=100.0, progress=False)
    assert again["train"]["cache_format"] == "jpeg" and again["train"]["chunks_built"] == 0
    assert again["train"]["format_reason"].startswith("keeps the jpeg cache")
    # An interrupted raw build resumes as raw though the budget now says jpeg.
    part = str(tmp_path / "part")
    src = build_dataset("imagefolder", folder, "train")
    interrupt_build(monkeypatch, src, part, CacheOptions(cache_format="raw"), at_chunk=2)
    options, why = choose_format({"train": src}, "imagefolder", part, CacheOptions(cache_budget=1e-6))
    assert options.cache_format == "raw" and why.startswith("keeps the raw cache")
    # A cache of other options (here another cache_size) is not kept: the budget decides.
    options, why = choose_format({"train": src}, "imagefolder", cdir, CacheOptions(cache_size=30, cache_budget=1e-6))
    assert options.cache_format == "jpeg" and "exceeds the budget" in why


def test_the_default_budget_is_half_the_free_disk_or_half_the_memory(tmp_path, monkeypatch):
    budget, what = raw_budget(str(tmp_path / "not" / "yet"), CacheOptions())
    free = cache_format.shutil.disk_usage(str(tmp_path)).free
    assert 0 < budget <= free / 2 + 2**20 and what.startswith("half of the")
    monkeypatch.setattr(cache_format, "_memory_bytes", lambda: 2 * 2**30)
    assert raw_budget(str(tmp_path), CacheOptions()) == (2**30, "half of the 2.0 GiB of memory")
    monkeypatch.setattr(cache_format, "_memory_bytes", lambda: None)
    assert raw_budget(str(tmp_path), CacheOptions())[1].endswith("free on the cache's disk")
    assert raw_budget(str(tmp_path), CacheOptions(cache_budget=0.5)) == (2**29, "cache_budget")


def test_a_fingerprint_is_of_a_stored_format(folder):
    src = build_dataset("imagefolder", folder, "train")
    args = ("imagefolder", "train", src.root, src.paths, src.labels, src.classnames)
    with pytest.raises(ValueError, match="stored format"):
        source_fingerprint(*args, CacheOptions())
    assert source_fingerprint(*args, CacheOptions(cache_format="raw")) != source_fingerprint(
        *args, CacheOptions(cache_format="jpeg")
    )


def test_the_cache_command_says_which_format_and_why(folder, tmp_path, capsys):
    cdir = str(tmp_path / "c")
    rc = cli_main(
        ["cache", "-d", "imagefolder", "--root", folder, "--no-progress", "cache_dir", cdir, "cache_size", "44"]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "format raw: the raw cache (about" in out and "fits the budget" in out
    assert read_index(cdir, "train")[0]["cache_format"] == "raw"
