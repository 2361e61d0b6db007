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
        batch_size: When set (> 1) and the kept rows would end the epoch with a batch of exactly one
            row, the last row of the epoch's order is left out of that epoch (a different row each
            epoch when shuffling). BatchNorm cannot train on a one-row batch, and EPIC's shrinking set
            can create one in the middle of a run; ``EpicTrainer`` sets this for such models.
    """

    def __init__(
        self,
        num_rows: int,
        seed: int = 0,
        kept: Iterable[int] | None = None,
        shuffle: bool = True,
        batch_size: int | None = None,
    ):
        self.num_rows = int(num_rows)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.batch_size = batch_size
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

    def _drops_last_row(self) -> bool:
        n = int(self.kept.numel())
        return self.batch_size is not None and self.batch_size > 1 and n > 1 and n % self.batch_size == 1

    def __len__(self) -> int:
        return int(self.kept.numel()) - int(self._drops_last_row())

    def __iter__(self) -> Iterator[int]:
        rows = self.kept
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            rows = rows[torch.randperm(rows.numel(), generator=generator)]
        return iter(rows[: len(self)].tolist())
