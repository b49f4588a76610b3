"""Decoding and augmenting cached images on the GPU, in batches.

The DataLoader workers only slice the cache's memory map (:meth:`CachedImageDataset.encoded`);
:func:`augment_batch`, called by :class:`~liftplus_fast.data.loaders.GPUAugmentLoader`, sends
each batch's bytes to the device, decodes the JPEGs there in one
``torchvision.io.decode_jpeg(..., device=...)`` call (raw caches are reshaped), applies the same
uint8 transforms as the worker path (:mod:`liftplus_fast.data.cached_transforms`: crop boxes
drawn on the CPU with the reference's calls, crops and resizes on the device) and normalises
the batch there. With ``device="cpu"`` it runs the same code on the CPU, which is how the
logic is tested without a GPU.

The boxes are drawn in the main process, in batch order, from torch's global generator, so a
run with workers draws other boxes than the worker path (as any change of worker count does);
with ``num_workers=0`` both paths draw the same.
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch

from .normalize import normalize_batch


def collate_encoded(batch: Sequence[Tuple[tuple, int]]):
    """Collate encoded items: a list of ``(bytes, stored_hw, orig_hw, epoch)`` and a label tensor."""
    items = [item for item, _ in batch]
    return items, torch.as_tensor([label for _, label in batch], dtype=torch.int64)


def decode_batch(items: Sequence[tuple], cache_format: str, device) -> List[torch.Tensor]:
    """The stored images of ``items`` as ``[3, h, w]`` uint8 tensors on ``device``."""
    device = torch.device(device)
    if cache_format == "raw":
        return [blob.to(device, non_blocking=True).view(hw[0], hw[1], 3).permute(2, 0, 1) for blob, hw, _, _ in items]
    from torchvision.io import ImageReadMode, decode_jpeg

    blobs = [blob for blob, _, _, _ in items]
    if device.type == "cuda":
        return decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
    return [decode_jpeg(b, mode=ImageReadMode.RGB) for b in blobs]


def augment_batch(
    items: Sequence[tuple], transform: Callable, cache_format: str, device, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Decode, transform (``transform(image, orig_hw, epoch)``) and normalise one batch on ``device``."""
    images = decode_batch(items, cache_format, device)
    out = torch.stack([transform(img, orig, epoch) for img, (_, _, orig, epoch) in zip(images, items)])
    return normalize_batch(out, mean, std)
