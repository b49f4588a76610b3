"""The base of the loaders that wrap a DataLoader and pass its other attributes through."""

from __future__ import annotations

from typing import Iterator

__all__ = ["WrappedLoader"]


class WrappedLoader:
    """Iterates what :meth:`_wrap` makes of the wrapped loader's batches.

    Other attributes (``sampler``, ``generator``, ``dataset``, ``len``) are the wrapped loader's:
    the training loop re-seeds and tags them through the wrapper.
    """

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self) -> Iterator:
        # Start the wrapped iterator now, as iterating the loader itself would: its seed draws
        # (and so the crops) then match those of an unwrapped loader.
        return self._wrap(iter(self.loader))

    def _wrap(self, batches: Iterator) -> Iterator:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        if name == "loader":  # not yet set (unpickling): avoid recursion
            raise AttributeError(name)
        return getattr(self.loader, name)
