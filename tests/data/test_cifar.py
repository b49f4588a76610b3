"""CIFAR-100-LT on a generated CIFAR-100 in torchvision's on-disk pickle format (no network)."""

import pickle

import numpy as np
import pytest
import torchvision.datasets.cifar as tv_cifar

from liftplus_fast.data import CIFAR100LT, build_dataset, long_tail_counts, select_long_tail_indices

N_TRAIN, N_TEST = 50000, 10000


def _write_split(path, n, labels):
    data = np.zeros((n, 3072), dtype=np.uint8)
    idx = np.arange(n)
    # The index is written into the first two pixels of the red plane so each loaded image
    # tells which original image it is.
    data[:, 0] = idx // 256
    data[:, 1] = idx % 256
    with open(path, "wb") as f:
        pickle.dump({"data": data, "fine_labels": [int(y) for y in labels], "coarse_labels": [0] * n}, f, protocol=4)


@pytest.fixture(scope="session")
def fake_cifar_root(tmp_path_factory):
    """A CIFAR-100 with labels in a shuffled order, like the real one."""
    root = tmp_path_factory.mktemp("cifar")
    base = root / "cifar-100-python"
    base.mkdir()
    rng = np.random.RandomState(123)
    train_labels = rng.permutation(np.repeat(np.arange(100), 500))
    test_labels = rng.permutation(np.repeat(np.arange(100), 100))
    _write_split(base / "train", N_TRAIN, train_labels)
    _write_split(base / "test", N_TEST, test_labels)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class_{k:03d}" for k in range(100)], "coarse_label_names": ["x"] * 20}, f)
    return str(root), train_labels, test_labels


@pytest.fixture
def no_md5(monkeypatch):
    """Make torchvision accept the generated files (their md5 differs from the real ones)."""
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)


def _original_index(img):
    arr = np.asarray(img)
    return int(arr[0, 0, 0]) * 256 + int(arr[0, 1, 0])


def _published_replay(labels, imb_factor):
    """The published selection, written out independently: global seed, per-class shuffle."""
    img_max = len(labels) / 100
    state = np.random.get_state()
    try:
        np.random.seed(0)
        targets = np.array(labels, dtype=np.int64)
        out = []
        for c in range(100):
            n = int(img_max * (imb_factor ** (c / 99.0)))
            idx = np.where(targets == c)[0]
            np.random.shuffle(idx)
            out.append(idx[:n])
        return np.concatenate(out)
    finally:
        np.random.set_state(state)


def test_counts_formula():
    ir100 = long_tail_counts(500.0, 100, 0.01)
    assert ir100[0] == 500 and ir100[-1] == 5 and sum(ir100) == 10847
    assert sum(long_tail_counts(500.0, 100, 0.02)) == 12608
    assert sum(long_tail_counts(500.0, 100, 0.1)) == 19573
    assert ir100 == [int(500 * 100 ** (-k / 99)) for k in range(100)]


def test_selection_matches_published_procedure():
    labels = np.random.RandomState(5).permutation(np.repeat(np.arange(100), 500))
    got = select_long_tail_indices(labels, long_tail_counts(500.0, 100, 0.01), seed=0)
    np.testing.assert_array_equal(got, _published_replay(labels, 0.01))


def test_selection_leaves_global_numpy_state_alone():
    np.random.seed(42)
    expected = np.random.rand()
    np.random.seed(42)
    select_long_tail_indices([0, 0, 1, 1], [1, 1])
    assert np.random.rand() == expected


def test_cifar100_ir100_on_disk(fake_cifar_root, no_md5):
    root, train_labels, _ = fake_cifar_root
    ds = CIFAR100LT(root, imb_factor=0.01, split="train", download=False)
    assert len(ds) == 10847 and ds.num_classes == 100
    assert ds.cls_num_list == long_tail_counts(500.0, 100, 0.01)
    assert ds.classnames[:2] == ["class_000", "class_001"]
    expected = _published_replay(train_labels, 0.01)
    np.testing.assert_array_equal(ds.selected_indices, expected)
    assert ds.labels == [int(train_labels[i]) for i in expected]
    for pos in (0, 500, 10846):
        img, y = ds[pos]
        assert _original_index(img) == expected[pos] and y == train_labels[expected[pos]]


def test_cifar100_test_split_is_balanced(fake_cifar_root, no_md5):
    root, _, test_labels = fake_cifar_root
    ds = build_dataset("cifar100_ir100", root, split="test", download=False)
    assert len(ds) == N_TEST and ds.cls_num_list == [100] * 100
    assert ds.labels == [int(y) for y in test_labels]


def test_cifar100_registry_variants(fake_cifar_root, no_md5):
    root, _, _ = fake_cifar_root
    assert len(build_dataset("cifar100_ir10", root, download=False)) == 19573
    balanced = build_dataset("cifar100", root, download=False)
    assert len(balanced) == N_TRAIN and balanced.selected_indices is None


def test_cifar_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="split"):
        CIFAR100LT(str(tmp_path), split="valid", download=False)
    with pytest.raises(ValueError, match="imb_factor"):
        CIFAR100LT(str(tmp_path), imb_factor=100, download=False)


def test_no_network_and_no_files_is_one_clear_error(tmp_path, monkeypatch):
    import urllib.error

    from liftplus_fast.data import DatasetUnavailableError

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    root = str(tmp_path / "empty")
    with pytest.raises(DatasetUnavailableError, match=r"not in .*empty.*could not be downloaded.*cifar-100-python"):
        build_dataset("cifar100_ir100", root, "train")
    with pytest.raises(DatasetUnavailableError, match="not in"):
        CIFAR100LT(root, split="test", download=False)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # nothing half-written
