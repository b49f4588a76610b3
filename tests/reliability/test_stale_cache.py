"""A source image changed in place after the cache was built: training refuses the cache naming
the file, and the cache command refreshes only the changed images."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

import liftplus_fast as lf
from liftplus_fast.cli import main
from liftplus_fast.data import ImageNetLT
from liftplus_fast.data.cache_build import build_chunk
from liftplus_fast.data.cache_store import CacheError, data_path, read_index

from .conftest import list_run_args, make_list_dataset, snapshot


@pytest.fixture
def cached(tmp_path):
    root = make_list_dataset(str(tmp_path / "data"), n_classes=3, n_train=4, n_test=2)
    cache = str(tmp_path / "cache")
    lf.build_cache("imagenet_lt", root, cache, num_workers=0, progress=False)
    return root, cache


def rewrite(path, seed=1):
    """Replace an image's pixels in place: same name, new content (and so new size and mtime)."""
    size = Image.open(path).size
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 16, (size[1], size[0], 3), dtype=np.uint8)).save(path)  # compresses better


def stored(cache, split):
    header, arrays = read_index(cache, split)
    data = np.fromfile(data_path(cache, split), dtype=np.uint8)
    return [bytes(data[o : o + n]) for o, n in zip(arrays["offsets"], arrays["nbytes"])]


def train_on_cache(root, cache, out):
    return lf.fast_train(method="lift+", output_dir=str(out), **list_run_args(root, data_cache=cache))


def test_an_image_rewritten_in_place_makes_the_cache_stale(cached, tmp_path):
    root, cache = cached
    changed = os.path.join(root, "img", "train_1_2.png")
    rewrite(changed)
    out = tmp_path / "out"
    with pytest.raises(CacheError) as err:
        train_on_cache(root, cache, out)
    msg = str(err.value)
    assert "the 'train' cache" in msg and "is stale: 1 of 12 source images changed since it was built" in msg
    assert f"{changed!r}: size " in msg and "modified " in msg
    assert f"refresh it with: liftplus-fast cache -d imagenet_lt --root {root} cache_dir {cache} cache_size 256" in msg
    assert snapshot(out) == {}  # refused before anything was written


def test_a_touched_file_of_the_same_size_is_caught_by_its_mtime(cached, tmp_path):
    root, cache = cached
    path = os.path.join(root, "img", "test_0_0.png")
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # one nanosecond later, same bytes
    with pytest.raises(CacheError, match=r"'test' cache .* 1 of 6 source images changed .*test_0_0\.png': modified"):
        train_on_cache(root, cache, tmp_path / "out")


def test_a_deleted_source_file_makes_the_cache_stale(cached, tmp_path):
    root, cache = cached
    os.remove(os.path.join(root, "img", "train_2_0.png"))
    with pytest.raises(CacheError, match=r"train_2_0\.png' is gone"):
        train_on_cache(root, cache, tmp_path / "out")


def test_the_cache_command_decodes_only_the_changed_images(cached, tmp_path, capsys):
    root, cache = cached
    before = stored(cache, "train")
    rewrite(os.path.join(root, "img", "train_1_2.png"))  # source index 6 of train
    assert main(["cache", "-d", "imagenet_lt", "--root", root, "cache_dir", cache, "num_workers", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("format "), out  # the cache format and why
    lines = out[1:]
    assert lines[0].startswith("train: 12 images, 0 skipped") and lines[0].endswith(", 1 decoded"), lines
    assert lines[1].startswith("test: 6 images, 0 skipped") and lines[1].endswith(", 0 decoded"), lines
    after = stored(cache, "train")
    assert [i for i in range(12) if after[i] != before[i]] == [6]  # the other images were copied, not re-encoded
    # The refreshed image is what a full build of the new file stores.
    fresh = str(tmp_path / "fresh")
    lf.build_cache("imagenet_lt", root, fresh, num_workers=0, progress=False, splits=("train",))
    assert stored(fresh, "train") == after
    assert lf.build_cache("imagenet_lt", root, cache, num_workers=0, progress=False)["train"]["decoded"] == 0
    result = train_on_cache(root, cache, tmp_path / "out")  # fresh again: training opens it
    assert result.history[0]["images"] == 12


def test_an_interrupted_build_redecodes_a_finished_chunk_whose_source_changed(tmp_path, monkeypatch):
    from liftplus_fast.data import cache_build

    root = make_list_dataset(str(tmp_path / "data"), n_classes=2, n_train=4, n_test=1)
    source = ImageNetLT(root, "train")
    cache = str(tmp_path / "cache")

    def fail_on_chunk_2(work_dir, chunk, paths, options, *previous):
        if chunk == 2:
            raise RuntimeError("interrupted")
        return build_chunk(work_dir, chunk, paths, options, *previous)

    monkeypatch.setattr(cache_build, "build_chunk", fail_on_chunk_2)
    with pytest.raises(RuntimeError, match="interrupted"):
        cache_build.build_split(
            source, "imagenet_lt", "train", cache, cache_build.CacheOptions(), 0, False, chunk_size=2
        )
    monkeypatch.setattr(cache_build, "build_chunk", build_chunk)
    rewrite(source.paths[0])  # in finished chunk 0
    summary = cache_build.build_split(source, "imagenet_lt", "train", cache, cache_build.CacheOptions(), 0, False, 2)
    assert summary["chunks_reused"] == 1 and summary["chunks_built"] == 3  # chunk 1 reused, 0 rebuilt
    fresh = str(tmp_path / "fresh")
    cache_build.build_split(source, "imagenet_lt", "train", fresh, cache_build.CacheOptions(), 0, False, 2)
    assert stored(cache, "train") == stored(fresh, "train")


def test_an_index_of_the_previous_format_asks_for_a_rebuild(cached, tmp_path):
    root, cache = cached
    import json

    from liftplus_fast.data.cache_store import index_path, write_index

    header, arrays = read_index(cache, "train")
    old = {k: v for k, v in arrays.items() if not k.startswith("source_")}
    write_index(index_path(cache, "train"), old, dict(header, version=1))
    with pytest.raises(CacheError, match="has cache format version 1, this package reads version 2"):
        train_on_cache(root, cache, tmp_path / "out")
    assert json.loads(json.dumps(header))["version"] == 2
    summary = lf.build_cache("imagenet_lt", root, cache, num_workers=0, progress=False)
    assert summary["train"]["decoded"] == 12 and summary["test"]["decoded"] == 0
    shutil.rmtree(os.path.join(root, "img"))  # the cache holds the images; their sources are gone
    with pytest.raises(CacheError, match="is gone"):
        train_on_cache(root, cache, tmp_path / "out2")
