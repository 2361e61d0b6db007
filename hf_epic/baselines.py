"""Baseline defenses that drop as many rows as EPIC did, but chosen by a simpler rule.

EPIC's claim is that effective poisons are *isolated* in gradient space and are neither the
highest-loss nor the lowest-confidence examples. To test it, each baseline here replays a recorded EPIC
run's drop schedule - the same selection rounds, the same number of rows per class per round - and only
changes *which* rows go:

* :class:`RandomDropCallback` - uniformly random rows of the class;
* :class:`HighLossDropCallback` - the rows with the highest cross-entropy loss;
* :class:`LowConfidenceDropCallback` - the rows whose top softmax probability (the model's confidence in
  its own prediction, whatever the label) is lowest. Confidence in the *given* label is ``exp(-loss)``
  and would rank rows exactly as the high-loss baseline does, so it is not a separate baseline.

Each is an :class:`hf_epic.epic_callback.EpicCallback` whose ``select_rows`` hook is replaced; rows
already dropped are never picked again (dropping stays cumulative, as in EPIC). Build the schedule from
the reference run's ``epic_state.json`` with :func:`schedule_from_epic_state`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from hf_epic.epic_callback import EpicCallback

BASELINES = ("random", "high-loss", "low-confidence")

__all__ = [
    "BASELINES",
    "HighLossDropCallback",
    "LowConfidenceDropCallback",
    "MatchedDropCallback",
    "RandomDropCallback",
    "baseline_callback",
    "confidence_from_gradient_embeddings",
    "schedule_from_epic_state",
    "select_per_class",
]


def schedule_from_epic_state(state: Any) -> list[dict[int, int]]:
    """Read a recorded EPIC run's drop schedule: per round, how many rows were newly dropped per class.

    Args:
        state: an ``EpicState``, its ``to_dict()`` dict, or the path of an ``epic_state.json``.

    Returns:
        One ``{class: count}`` dict per selection round, in round order (classes with no drop omitted).

    Raises:
        ValueError: if the state has no ``rounds`` record.
    """
    if isinstance(state, (str, os.PathLike)):
        with open(state) as handle:
            state = json.load(handle)
    elif not isinstance(state, Mapping):
        state = state.to_dict()
    rounds = state.get("rounds")
    if rounds is None:
        raise ValueError(
            "The EPIC state has no 'rounds' list; pass the epic_state.json (or EpicState) of a finished EPIC run."
        )
    schedule = []
    for record in sorted(rounds, key=lambda r: r["round"]):
        per_class = {
            int(c): int(n) for c, n in record.get("newly_dropped_per_class", {}).items() if int(n) > 0
        }
        schedule.append(per_class)
    return schedule


def _as_mask(already_dropped: torch.Tensor | Sequence[int] | None, num_rows: int) -> torch.Tensor:
    """Turn a bool mask or a list of row positions into a bool mask of length ``num_rows``."""
    if already_dropped is None:
        return torch.zeros(num_rows, dtype=torch.bool)
    tensor = torch.as_tensor(already_dropped)
    if tensor.dtype == torch.bool:
        if tensor.numel() != num_rows:
            raise ValueError(f"already_dropped mask has {tensor.numel()} entries for {num_rows} rows.")
        return tensor.cpu().clone()
    mask = torch.zeros(num_rows, dtype=torch.bool)
    mask[tensor.long().cpu()] = True
    return mask


def select_per_class(
    scores: torch.Tensor,
    labels: torch.Tensor,
    counts: Mapping[int, int],
    already_dropped: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Pick, in each class, the ``counts[class]`` not-yet-dropped rows with the highest score.

    Ties are broken by row position (lower first), so the choice is deterministic.

    Args:
        scores: float ``(N,)``, higher = dropped first.
        labels: int ``(N,)`` class of each row.
        counts: ``{class: number of rows to drop}``; a class with fewer eligible rows gives all it has.
        already_dropped: bool mask ``(N,)`` or row positions of rows that may not be picked again.

    Returns:
        Sorted int64 row positions (CPU).
    """
    scores = torch.as_tensor(scores).detach().float().cpu()
    labels = torch.as_tensor(labels).detach().long().cpu()
    if scores.shape != labels.shape or scores.dim() != 1:
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} must both be (N,).")
    eligible = ~_as_mask(already_dropped, len(labels))
    picked = []
    for cls, count in sorted(counts.items()):
        if count <= 0:
            continue
        rows = torch.nonzero(eligible & (labels == int(cls))).flatten()
        if len(rows) == 0:
            continue
        # stable sort on -score keeps lower row positions first among equal scores
        order = torch.sort(-scores[rows], stable=True).indices
        picked.append(rows[order[: int(count)]])
    if not picked:
        return torch.zeros(0, dtype=torch.long)
    return torch.sort(torch.cat(picked)).values


def confidence_from_gradient_embeddings(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Recover each row's top softmax probability from EPIC's logit-gradient embedding.

    EPIC's embedding is ``g = softmax(z) - onehot(y)``, so ``softmax(z) = g + onehot(y)``.

    Args:
        embeddings: float ``(N, C)`` logit-gradient embeddings (C = number of classes).
        labels: int ``(N,)`` labels.

    Returns:
        float ``(N,)`` top probability per row.

    Raises:
        ValueError: if the embeddings are not logit gradients (wrong width, or rows that do not sum to 0).
    """
    embeddings = torch.as_tensor(embeddings).detach().float().cpu()
    labels = torch.as_tensor(labels).detach().long().cpu()
    if embeddings.dim() != 2 or int(labels.max()) >= embeddings.shape[1]:
        raise ValueError(
            f"Embeddings of shape {tuple(embeddings.shape)} are not C-dimensional logit gradients for labels up "
            f"to {int(labels.max())}; the low-confidence baseline needs EPIC's default embedding "
            "(softmax - onehot), not the last-layer variant."
        )
    row_sums = embeddings.sum(dim=1).abs()
    if bool((row_sums > 1e-3).any()):
        raise ValueError(
            "Embeddings do not sum to 0 per row, so they are not softmax - onehot logit gradients; the "
            "low-confidence baseline needs EPIC's default embedding, not the last-layer variant."
        )
    probs = embeddings + torch.nn.functional.one_hot(labels, embeddings.shape[1]).float()
    return probs.max(dim=1).values


class MatchedDropCallback(EpicCallback):
    """An EpicCallback that drops, round by round, the per-class counts of a recorded schedule.

    Subclasses define :meth:`scores` (higher = dropped first). The round number is read from the EPIC
    state, so a resumed run continues the schedule where it stopped. Rounds beyond the schedule drop
    nothing.

    Args:
        *args: passed to ``EpicCallback``.
        schedule: one ``{class: count}`` dict per round (:func:`schedule_from_epic_state`).
        **kwargs: passed to ``EpicCallback``.
    """

    name = "matched"

    def __init__(self, *args: Any, schedule: Sequence[Mapping[int, int]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(schedule, Mapping) or not all(isinstance(c, Mapping) for c in schedule):
            raise TypeError(
                "schedule must be a list with one {class: count} dict per round; build it with "
                "schedule_from_epic_state(<the EPIC run's epic_state.json>)."
            )
        self.schedule = [{int(c): int(n) for c, n in counts.items()} for counts in schedule]
        if any(n < 0 for counts in self.schedule for n in counts.values()):
            raise ValueError("schedule counts must be >= 0 rows per class and round.")

    @property
    def round_index(self) -> int:
        """0-based index of the round being selected (rounds already recorded in the EPIC state)."""
        return len(self.state.rounds) if self.state is not None else 0

    def scores(self, embeddings: torch.Tensor, labels: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """Return one float per row; the highest-scoring rows are dropped first.

        Args:
            embeddings: float ``(N, D)`` gradient embeddings.
            labels: int ``(N,)`` labels.
            losses: float ``(N,)`` per-row cross-entropy.
        """
        raise NotImplementedError

    def select_rows(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        losses: torch.Tensor,
        already_dropped: torch.Tensor,
    ) -> torch.Tensor:
        """Drop this round's scheduled number of rows per class, ranked by :meth:`scores`.

        Args:
            embeddings: float ``(N, D)`` gradient embeddings of every row.
            labels: int ``(N,)`` labels.
            losses: float ``(N,)`` per-row cross-entropy.
            already_dropped: int64 row positions dropped in earlier rounds (a bool mask is accepted too).

        Returns:
            Sorted int64 row positions to drop newly.
        """
        index = self.round_index
        counts = self.schedule[index] if index < len(self.schedule) else {}
        if not counts:
            return torch.zeros(0, dtype=torch.long)
        return select_per_class(self.scores(embeddings, labels, losses), labels, counts, already_dropped)


class RandomDropCallback(MatchedDropCallback):
    """Drop uniformly random rows of each class (seeded by ``seed`` and the round number).

    Args:
        *args: passed to ``EpicCallback``.
        schedule: per-round ``{class: count}``.
        seed: seed of the random choice.
        **kwargs: passed to ``EpicCallback``.
    """

    name = "random"

    def __init__(
        self, *args: Any, schedule: Sequence[Mapping[int, int]], seed: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(*args, schedule=schedule, **kwargs)
        self.drop_seed = int(seed)

    def scores(self, embeddings: torch.Tensor, labels: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """Random scores from a generator seeded by ``seed`` and the round (documented in the base class)."""
        generator = torch.Generator().manual_seed(self.drop_seed * 1000 + self.round_index)
        return torch.rand(len(labels), generator=generator)


class HighLossDropCallback(MatchedDropCallback):
    """Drop the rows with the highest per-row cross-entropy loss in each class."""

    name = "high-loss"

    def scores(self, embeddings: torch.Tensor, labels: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """The loss itself (documented in the base class)."""
        return torch.as_tensor(losses).detach().float().cpu()


class LowConfidenceDropCallback(MatchedDropCallback):
    """Drop the rows whose top softmax probability is lowest in each class."""

    name = "low-confidence"

    def prepare(self, args: Any, model: Any, train_dataset: Any) -> None:
        """Check (before training) that the embedding is the logit gradient the confidence is read from.

        Args:
            args: the trainer's arguments.
            model: the model to be trained.
            train_dataset: the training set.
        """
        super().prepare(args, model, train_dataset)
        if self.settings is not None and self.settings["epic_embedding"] != "logits_grad":
            raise ValueError(
                f"The low-confidence baseline reads each row's softmax from EPIC's logit-gradient embedding, but "
                f"epic_embedding={self.settings['epic_embedding']!r}; use epic_embedding='logits_grad'."
            )

    def scores(self, embeddings: torch.Tensor, labels: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """Minus the top softmax probability (documented in the base class)."""
        return -confidence_from_gradient_embeddings(embeddings, labels)


def baseline_callback(
    name: str, *args: Any, schedule: Sequence[Mapping[int, int]], seed: int = 0, **kwargs: Any
) -> MatchedDropCallback:
    """Build a baseline callback by name.

    Args:
        name: one of ``BASELINES``.
        *args: passed to ``EpicCallback``.
        schedule: per-round ``{class: count}`` (:func:`schedule_from_epic_state`).
        seed: seed for the random baseline.
        **kwargs: passed to ``EpicCallback``.
    """
    if name == "random":
        return RandomDropCallback(*args, schedule=schedule, seed=seed, **kwargs)
    if name == "high-loss":
        return HighLossDropCallback(*args, schedule=schedule, **kwargs)
    if name == "low-confidence":
        return LowConfidenceDropCallback(*args, schedule=schedule, **kwargs)
    raise ValueError(f"Unknown baseline {name!r}; use one of {', '.join(BASELINES)}.")


def _register_baselines() -> None:
    """Register every baseline as a benchmark defense (at EPIC-0.2's fraction, replaying a schedule)."""
    from hf_epic.experiments.defenses import register_defense

    for name in BASELINES:
        register_defense(
            name,
            group="baseline",
            callback=lambda args, schedule, seed, name=name: baseline_callback(
                name, args, schedule=schedule, seed=seed
            ),
            needs_schedule=True,
        )


_register_baselines()
