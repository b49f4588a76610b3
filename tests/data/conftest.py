"""Image folders the cache tests share (module-scoped: written once per test module), and an
interrupted cache build."""

import pytest

from liftplus_fast.data import cache_build
from liftplus_fast.data.cache_build import build_cache
from liftplus_fast.data.synthetic_images import write_image_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Ten training images of 3 classes (5, 3, 2) and two test images a class, in four sizes."""
    root = tmp_path_factory.mktemp("src")
    write_image_folder(str(root), [5, 3, 2], test_per_class=2, sizes=((40, 52), (52, 40), (36, 36), (48, 64)))
    return str(root)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """``(root, {format: cache folder})``: 7 training images of 2 classes, cached raw and jpeg at 44 px."""
    root = tmp_path_factory.mktemp("caches")
    write_image_folder(str(root), [4, 3], test_per_class=2, sizes=((40, 52), (52, 40), (48, 64)))
    out = {}
    for fmt in ("raw", "jpeg"):
        out[fmt] = str(root / fmt)
        build_cache("imagefolder", str(root), out[fmt], cache_size=44, cache_format=fmt, progress=False)
    return str(root), out


def interrupt_build(monkeypatch, src, work_dir, options, at_chunk):
    """Build ``src`` (a train split) into ``work_dir`` in chunks of 3 images, stopped by a
    KeyboardInterrupt as chunk number ``at_chunk`` (from 1) starts."""
    real, calls = cache_build.build_chunk, []

    def interrupted(work_dir, chunk, paths, options):
        calls.append(chunk)
        if len(calls) == at_chunk:
            raise KeyboardInterrupt
        return real(work_dir, chunk, paths, options)

    monkeypatch.setattr(cache_build, "build_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache_build.build_split(src, "imagefolder", "train", work_dir, options, progress=False, chunk_size=3)
    monkeypatch.setattr(cache_build, "build_chunk", real)
