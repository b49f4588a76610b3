"""Whole batches built in the DataLoader workers: the same pixels and boxes as item by item."""

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from liftplus_fast.data.cache_build import open_source_cache
from liftplus_fast.data.cached_transforms import CachedMDACrop, CachedResizeCrop
from liftplus_fast.data.loaders import EpochTaggedSampler, NormalizedLoader
from liftplus_fast.data.normalize import normalization_affine, normalize_batch, normalize_into
from liftplus_fast.errors import UserInputError

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
TRANSFORMS = (CachedMDACrop(32, 3), CachedResizeCrop(32, 36), CachedResizeCrop(32, 40, five_crop=True))


@pytest.mark.parametrize("fmt", ["raw", "jpeg"])
def test_batch_equals_items_uint8_and_normalised(caches, fmt):
    root, dirs = caches
    for transform in TRANSFORMS:
        ds = open_source_cache("imagefolder", root, "train", dirs[fmt], transform=transform)
        items = [(1, i) for i in range(len(ds))]
        torch.manual_seed(0)
        want = torch.stack([ds[item][0] for item in items])
        torch.manual_seed(0)
        got, labels = ds[items]
        assert got.dtype == torch.uint8 and torch.equal(got, want) and labels == ds.labels
        torch.manual_seed(0)
        normed, _ = ds.normalized(MEAN, STD)[items]
        # Normalising image by image (TTE: before cutting the crops) gives the batch's numbers exactly.
        assert normed.dtype == torch.float32
        torch.testing.assert_close(normed, normalize_batch(want, MEAN, STD), rtol=0, atol=0)


def test_worker_batches_draw_the_boxes_of_per_sample_loading(caches):
    root, dirs = caches
    ds = open_source_cache("imagefolder", root, "train", dirs["raw"], transform=CachedMDACrop(32, 3))
    epochs = {}
    for batched in (False, True):
        seq = SequentialSampler(ds)
        if batched:
            loader = DataLoader(ds, batch_size=None, sampler=EpochTaggedSampler(seq, 3), num_workers=2)
        else:
            loader = DataLoader(ds, batch_size=3, sampler=EpochTaggedSampler(seq), num_workers=2)
        loader.sampler.set_epoch(2)
        torch.manual_seed(5)  # the loader's base seed for its workers comes from here
        epochs[batched] = torch.cat([x for x, _ in loader])
    assert epochs[True].shape == (len(ds), 3, 32, 32) and torch.equal(epochs[True], epochs[False])


def test_normalized_loader_passes_worker_normalised_batches_and_makes_label_tensors(caches):
    root, dirs = caches
    ds = open_source_cache("imagefolder", root, "test", dirs["jpeg"], transform=CachedResizeCrop(32, 36))
    batches = BatchSampler(SequentialSampler(ds), 2, False)
    plain = NormalizedLoader(DataLoader(ds, batch_size=None, sampler=batches), MEAN, STD)
    worker = NormalizedLoader(DataLoader(ds.normalized(MEAN, STD), batch_size=None, sampler=batches), MEAN, STD)
    for (a, ya), (b, yb) in zip(plain, worker):
        assert a.dtype == b.dtype == torch.float32 and ya.dtype == yb.dtype == torch.int64
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert torch.equal(ya, yb)
    assert len(plain) == len(worker) == -(-len(ds) // 2)


def test_batches_need_a_uint8_transform(caches):
    root, dirs = caches
    ds = open_source_cache("imagefolder", root, "train", dirs["raw"])
    with pytest.raises(UserInputError, match="transform"):
        ds[[0, 1]]


def test_epoch_tagged_batches_group_as_dataloader_does():
    sampler = EpochTaggedSampler(SequentialSampler(range(7)), batch_size=3)
    sampler.set_epoch(2)
    assert list(sampler) == [[(2, 0), (2, 1), (2, 2)], [(2, 3), (2, 4), (2, 5)], [(2, 6)]] and len(sampler) == 3
    for bad in (0, -1, 2.5):
        with pytest.raises(UserInputError, match="batch_size"):
            EpochTaggedSampler(SequentialSampler(range(3)), batch_size=bad)


def test_chunked_normalisation_equals_one_pass_and_checks_shapes(monkeypatch):
    from liftplus_fast.data import normalize

    x = torch.randint(0, 256, (3, 5, 3, 16, 16), dtype=torch.uint8)
    affine = normalization_affine(MEAN, STD)
    want = (x.float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    monkeypatch.setattr(normalize, "_CHUNK", 2 * 3 * 16 * 16)  # two crops per chunk
    got = normalize_into(torch.empty(x.shape), x, affine)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="shape"):
        normalize_into(torch.empty(2, 3, 16, 16), x, affine)
    with pytest.raises(UserInputError, match="mean and std"):
        normalization_affine((0.5, 0.5), STD)


def test_batch_ring_hands_out_its_slots_in_turn_and_grows_for_longer_batches():
    from liftplus_fast.data.cache_store import BatchRing
    from liftplus_fast.data.loaders import ring_depth

    ring = BatchRing(3)
    first = [ring.take((4, 3, 2, 2), torch.float32) for _ in range(3)]
    assert len({t.data_ptr() for t in first}) == 3
    # Another item shape has a ring of its own and does not advance this one.
    other = ring.take((4, 3, 1, 1), torch.float32)
    assert other.data_ptr() not in {t.data_ptr() for t in first}
    again = ring.take((4, 3, 2, 2), torch.float32)
    assert again.data_ptr() == first[0].data_ptr()
    # A shorter last batch is a view of the next slot; a longer one gets new slots.
    short = ring.take((2, 3, 2, 2), torch.float32)
    assert short.shape == (2, 3, 2, 2) and short.data_ptr() == first[1].data_ptr()
    longer = ring.take((5, 3, 2, 2), torch.float32)
    assert longer.shape[0] == 5 and longer.data_ptr() not in {t.data_ptr() for t in first}
    assert ring_depth(2) == 4
    with pytest.raises(ValueError, match="depth"):
        BatchRing(1)


@pytest.mark.parametrize("workers", [1, 2])
def test_reused_worker_batches_are_the_fresh_ones_while_the_loop_holds_one(caches, workers):
    # A training loop holds the batch it trains on while it asks for the next; with reused
    # buffers sized from prefetch_factor, no batch changes under it. Compared with fresh
    # batches, for one and for two workers (one worker is the tightest case).
    from liftplus_fast.data.loaders import cached_batch_loader

    root, dirs = caches
    ds = open_source_cache("imagefolder", root, "train", dirs["raw"], transform=CachedMDACrop(32, 3))
    runs = {}
    for reuse in (False, True):
        sampler = EpochTaggedSampler(list(range(len(ds))) * 4, 2)
        loader = cached_batch_loader(ds, sampler, workers, MEAN, STD, persistent_workers=True)
        if not reuse:
            loader.loader.dataset._ring_depth = 0
        torch.manual_seed(3)
        held, seen, kept = None, [], []
        for images, _ in loader:
            kept.append(images)
            if held is not None:
                # The previous batch is still what it was when it arrived.
                assert torch.equal(held[0], held[1])
            held = (images, images.clone())
            seen.append(images.clone())
        runs[reuse] = torch.cat(seen)
        # Batches kept past the ring (not cloned) were refilled: the buffers really are reused.
        overwritten = sum(not torch.equal(k, v) for k, v in zip(kept, seen))
        assert (overwritten > 0) == reuse
    assert runs[True].shape == (len(ds) * 4, 3, 32, 32)
    assert torch.equal(runs[True], runs[False])
