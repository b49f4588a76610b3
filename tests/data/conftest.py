"""Image folders the cache tests share (module-scoped: written once per test module)."""

import pytest

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
