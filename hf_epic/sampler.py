"""A training sampler over the rows EPIC keeps, re-shuffled each epoch from seed + epoch."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["KeptRowsSampler"]


class KeptRowsSampler(Sampler[int]):
    """Yield the kept row positions in a fresh random order each epoch.

    The order depends only on ``seed``, the epoch (``set_epoch``) and the kept set, so a resumed run
    iterates exactly the batches of the uninterrupted run. It deliberately is not a ``RandomSampler``
    and has no ``generator`` attribute: accelerate would replace or re-seed it.

    Args:
        num_rows: Number of rows in the training set.
        seed: Base seed of the shuffling.
        kept: Row positions to iterate (default: all rows).
        shuffle: If False, iterate the kept rows in increasing order.
    """

    def __init__(self, num_rows: int, seed: int = 0, kept: Iterable[int] | None = None, shuffle: bool = True):
        self.num_rows = int(num_rows)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self.kept = torch.arange(self.num_rows, dtype=torch.long)
        if kept is not None:
            self.set_kept(kept)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose permutation the next ``iter()`` yields."""
        self.epoch = int(epoch)

    def set_kept(self, kept: Iterable[int]) -> None:
        """Replace the rows to iterate (sorted, unique, each in ``[0, num_rows)``)."""
        rows = torch.as_tensor(list(kept) if not isinstance(kept, torch.Tensor) else kept, dtype=torch.long)
        rows = torch.unique(rows)
        if rows.numel() and (rows[0] < 0 or rows[-1] >= self.num_rows):
            raise ValueError(f"kept row positions must lie in [0, {self.num_rows}).")
        self.kept = rows

    def __len__(self) -> int:
        return int(self.kept.numel())

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(self.kept.tolist())
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self), generator=generator)
        return iter(self.kept[order].tolist())
