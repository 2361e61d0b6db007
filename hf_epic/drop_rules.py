r"""Drop rules: which of a round's isolated rows EPIC removes from training.

Pure torch and Python (no Hugging Face imports). Every selection round finds the *isolated* rows
(:func:`hf_epic.selection.find_isolated`: rows in clusters of at most ``cluster_threshold`` rows)
and gives each an *isolation score* (below). A drop rule turns that evidence, and the evidence of
the earlier rounds, into the rows to drop this round. The per-class cap
``epic_max_drop_fraction`` applies to what the rule returns, and dropping stays cumulative.

Isolation score
---------------
For an isolated row ``i`` of class ``c``, with ``s`` the similarity kernel of the round
(:mod:`hf_epic.kernels`, ``s(i, i) = 1``, ``s <= 1``)::

    iso(i) = 1 - max(0, max_{j in c, j != i} s(i, j))

one minus the similarity to the nearest *other* row of its class, in ``[0, 1]``; 1 for the only
row of a class. For the euclidean kernel ``s = exp(-d / D)`` it is ``1 - exp(-d_nn / D)``, a
monotone function of the distance ``d_nn`` to the nearest neighbour. The state keeps it rounded
to 6 decimals, and rules see the rounded value, so a resumed run decides as an uninterrupted one.

Rules
-----
``"first_isolation"`` (the default, the EPIC reference's)
    Drop every isolated row: ``D_r = I_r``, where ``I_r`` is the set of rows isolated in round ``r``.
``"persistent"``
    Drop a row once it was isolated in ``k = persistence`` consecutive rounds that evaluated it:
    ``i in D_r`` iff ``i in I_r, I_{r_1}, ..., I_{r_{k-1}}`` where ``r_1 > r_2 > ...`` are the
    earlier rounds whose evidence covers the class of ``i``. Rounds without evidence for the row
    (a custom ``select_rows``, a class not selected) neither count nor break the run.
``"ranked"``
    Per class ``c``, among the rows of ``I_r`` not dropped before, drop the
    ``m_c = ceil(rank_share * n_c)`` rows with the highest isolation score (ties: the lowest
    row position), ``n_c`` the class's row count; all of them if fewer are isolated.

A new rule is one class::

    @register_drop_rule("twice_any")
    class TwiceAny(DropRule):
        summary = "rows isolated in at least two rounds"

        def select(self, evidence, history, labels, already_dropped):
            seen = torch.cat([evidence.rows, *(e.rows for e in history)])
            rows, counts = torch.unique(seen, return_counts=True)
            return rows[(counts >= 2) & torch.isin(rows, evidence.rows)]

Suspicion
---------
:func:`suspicion` ranks rows for auditing: ``suspicion(i) = k_i + mean_r iso_r(i)``, with ``k_i``
the number of rounds that isolated row ``i`` and the mean over those rounds (0 for a row never
isolated). Rows isolated in more rounds come first; among rows isolated equally often, the more
isolated ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch

from .registry import Registry

__all__ = [
    "DROP_RULES",
    "DropRule",
    "FirstIsolation",
    "Persistent",
    "Ranked",
    "RoundEvidence",
    "Suspicion",
    "apply_drop_rule",
    "available_drop_rules",
    "get_drop_rule",
    "register_drop_rule",
    "suspicion",
    "unregister_drop_rule",
]

SCORE_DECIMALS = 6


@dataclass(frozen=True)
class RoundEvidence:
    """What one selection round found.

    Attributes:
        round: The round's number (1 for the first).
        rows: int64 sorted row positions isolated in the round.
        scores: float64 isolation scores of ``rows`` (same order), see the module docstring.
        classes: The labels whose rows the round evaluated (None: every class).
    """

    round: int
    rows: torch.Tensor
    scores: torch.Tensor
    classes: tuple[int, ...] | None = None

    @classmethod
    def build(
        cls,
        round: int,
        rows: Sequence[int] | torch.Tensor,
        scores: Sequence[float] | torch.Tensor,
        classes: Sequence[int] | None = None,
    ) -> RoundEvidence:
        """Evidence from row positions and scores in any order; scores are rounded to 6 decimals.

        Raises:
            ValueError: If ``rows`` and ``scores`` differ in length or a row appears twice.
        """
        r = torch.as_tensor(rows, dtype=torch.long).flatten()
        s = torch.as_tensor(scores, dtype=torch.float64).flatten()
        if r.numel() != s.numel():
            raise ValueError(
                f"round {round}: {r.numel()} isolated rows but {s.numel()} isolation scores; pass one score "
                "per row."
            )
        order = torch.argsort(r)
        r, s = r[order], s[order]
        if r.numel() > 1 and bool((r[1:] == r[:-1]).any()):
            raise ValueError(f"round {round}: an isolated row is listed twice; list each row once.")
        s = torch.round(s * 10**SCORE_DECIMALS) / 10**SCORE_DECIMALS
        return cls(int(round), r, s, None if classes is None else tuple(sorted(int(c) for c in classes)))

    def evaluated(self, labels: torch.Tensor) -> torch.Tensor:
        """Boolean mask: which rows of ``labels`` (the labels of some rows) this round evaluated."""
        if self.classes is None:
            return torch.ones(labels.shape, dtype=torch.bool)
        return torch.isin(labels, torch.tensor(self.classes, dtype=labels.dtype))

    def to_record(self) -> dict[str, list]:
        """The round record's keys for this evidence (JSON-ready)."""
        return {"isolated_rows": self.rows.tolist(), "isolation_scores": self.scores.tolist()}

    @classmethod
    def from_record(cls, record: Mapping[str, Any], index: int = 0) -> RoundEvidence | None:
        """The evidence of a round record of ``epic_state.json`` (None when it holds none).

        Args:
            record: The round record.
            index: The record's position in the list (its number when it has no ``round`` key).
        """
        rows = record.get("isolated_rows")
        if rows is None:
            return None
        number = int(record.get("round", index + 1))
        return cls.build(number, rows, record.get("isolation_scores") or [])


class DropRule:
    """Decides which isolated rows a round drops. Subclass, implement :meth:`select`, register.

    Args:
        persistence: Rounds in a row a row must be isolated (``"persistent"``), >= 1.
        rank_share: Largest share of each class dropped per round (``"ranked"``), in (0, 1].

    Attributes:
        name: The name ``epic_drop_rule`` uses (set by :func:`register_drop_rule`).
        summary: One line saying what the rule drops (model cards, logs).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    def __init__(self, *, persistence: int = 2, rank_share: float = 0.005) -> None:
        self.persistence = int(persistence)
        self.rank_share = float(rank_share)

    def select(
        self,
        evidence: RoundEvidence,
        history: Sequence[RoundEvidence],
        labels: torch.Tensor,
        already_dropped: torch.Tensor,
    ) -> torch.Tensor:
        """Rows to drop this round.

        Args:
            evidence: This round's isolated rows and scores.
            history: The evidence of the earlier rounds, oldest first (rounds without evidence left out).
            labels: int64 ``(N,)`` label of every row.
            already_dropped: int64 sorted rows dropped in earlier rounds.

        Returns:
            int64 row positions (any order; rows dropped before are ignored).
        """
        raise NotImplementedError


_R = TypeVar("_R", bound=type[DropRule])
DROP_RULES: Registry[type[DropRule]] = Registry("drop rule")
"""Every registered drop rule class by name, in registration order."""


def register_drop_rule(name: str) -> Callable[[_R], _R]:
    """Class decorator: registers a :class:`DropRule` subclass under ``name``.

    Raises:
        ValueError: If ``name`` is empty or already registered.
        TypeError: If the decorated object is not a ``DropRule`` subclass.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a drop rule name must be a non-empty string, got {name!r}.")

    def decorate(cls: _R) -> _R:
        if not (isinstance(cls, type) and issubclass(cls, DropRule)):
            raise TypeError(f"register_drop_rule({name!r}) decorates DropRule subclasses, got {cls!r}.")
        DROP_RULES.add(name, cls)
        cls.name = name
        return cls

    return decorate


def unregister_drop_rule(name: str) -> None:
    """Removes a registered drop rule (for tests and plug-ins that replace one)."""
    if name in DROP_RULES:
        DROP_RULES.remove(name)


def available_drop_rules() -> tuple[str, ...]:
    """Names of the registered drop rules, in registration order (the built-in ones first)."""
    return DROP_RULES.names()


def get_drop_rule(name: str, **options: Any) -> DropRule:
    """An instance of the rule registered as ``name``.

    Args:
        name: A registered name (:func:`available_drop_rules`).
        **options: ``persistence``, ``rank_share`` (see :class:`DropRule`).

    Raises:
        ValueError: If no rule has that name.
    """
    if name not in DROP_RULES:
        raise ValueError(
            f"unknown drop rule {name!r}; choose one of {', '.join(DROP_RULES)}, or register one with "
            "@hf_epic.drop_rules.register_drop_rule."
        )
    return DROP_RULES.get(name)(**options)


def apply_drop_rule(
    rule: DropRule,
    evidence: RoundEvidence,
    history: Sequence[RoundEvidence],
    labels: torch.Tensor,
    already_dropped: torch.Tensor,
) -> torch.Tensor:
    """Run ``rule`` and return the int64 sorted rows it drops newly (those dropped before removed).

    Raises:
        ValueError: If the rule returns a row position outside ``[0, N)``.
    """
    already = torch.as_tensor(already_dropped, dtype=torch.long)
    chosen = torch.as_tensor(rule.select(evidence, history, labels, already)).to(torch.long).flatten()
    chosen = torch.unique(chosen)
    n = int(labels.numel())
    if chosen.numel() and (int(chosen[0]) < 0 or int(chosen[-1]) >= n):
        raise ValueError(
            f"drop rule {rule.name or type(rule).__name__!r} returned row positions outside [0, {n}); "
            "return positions of the training set's rows."
        )
    return chosen[~torch.isin(chosen, already)]


@register_drop_rule("first_isolation")
class FirstIsolation(DropRule):
    """Drop every isolated row the first time it is isolated (the EPIC reference's rule)."""

    summary = "every row isolated in a round is dropped in that round (the EPIC reference's rule)"

    def select(
        self,
        evidence: RoundEvidence,
        history: Sequence[RoundEvidence],
        labels: torch.Tensor,
        already_dropped: torch.Tensor,
    ) -> torch.Tensor:
        return evidence.rows


@register_drop_rule("persistent")
class Persistent(DropRule):
    """Drop a row once it was isolated in ``persistence`` consecutive rounds that evaluated it.

    With ``r_1 > r_2 > ...`` the earlier rounds whose evidence covers row ``i``'s class, ``i`` is
    dropped in round ``r`` iff it is isolated in ``r, r_1, ..., r_{k-1}`` (``k = persistence``).
    Rounds without evidence for the row neither count nor break the run; ``k = 1`` is
    ``"first_isolation"``.
    """

    @property
    def summary(self) -> str:  # type: ignore[override]
        return f"a row is dropped once it was isolated in {self.persistence} consecutive rounds"

    def select(
        self,
        evidence: RoundEvidence,
        history: Sequence[RoundEvidence],
        labels: torch.Tensor,
        already_dropped: torch.Tensor,
    ) -> torch.Tensor:
        candidates = evidence.rows
        if self.persistence <= 1 or candidates.numel() == 0:
            return candidates
        cand_labels = labels[candidates]
        streak = torch.ones(candidates.numel(), dtype=torch.long)
        alive = torch.ones(candidates.numel(), dtype=torch.bool)
        for earlier in reversed(history):
            if not bool(alive.any()) or bool((streak >= self.persistence).all()):
                break
            seen = earlier.evaluated(cand_labels)
            isolated = torch.isin(candidates, earlier.rows)
            streak += (alive & seen & isolated).long()
            alive &= ~(seen & ~isolated)
        return candidates[streak >= self.persistence]


@register_drop_rule("ranked")
class Ranked(DropRule):
    """Per class, drop only the most isolated rows, up to ``ceil(rank_share * n_c)`` a round.

    Among the rows of class ``c`` isolated this round and not dropped before, the
    ``ceil(rank_share * n_c)`` with the highest isolation score are dropped (ties: the lowest row
    position first); all of them when fewer are isolated.
    """

    @property
    def summary(self) -> str:  # type: ignore[override]
        return (
            f"per round and class, only the most isolated rows are dropped, at most "
            f"{100 * self.rank_share:g} % of the class"
        )

    def select(
        self,
        evidence: RoundEvidence,
        history: Sequence[RoundEvidence],
        labels: torch.Tensor,
        already_dropped: torch.Tensor,
    ) -> torch.Tensor:
        fresh = ~torch.isin(evidence.rows, already_dropped)
        rows, scores = evidence.rows[fresh], evidence.scores[fresh]
        if rows.numel() == 0:
            return rows
        counts = torch.bincount(labels)
        row_labels = labels[rows]
        chosen = []
        for c in torch.unique(row_labels).tolist():
            mine = row_labels == c
            limit = max(1, math.ceil(self.rank_share * int(counts[c]) * (1.0 - 1e-9)))
            # rows are sorted, so the stable sort on -score breaks ties by the lowest position
            order = torch.sort(-scores[mine], stable=True).indices
            chosen.append(rows[mine][order[:limit]])
        return torch.cat(chosen)


@dataclass(frozen=True)
class Suspicion:
    """Per-row suspicion (see the module docstring); tensors of length N.

    Attributes:
        score: float64 ``k_i + mean isolation score`` (0 for rows never isolated).
        rounds_isolated: int64 ``k_i``, rounds that isolated the row.
        mean_isolation: float64 mean isolation score over those rounds (0 if none).
        max_isolation: float64 largest isolation score over those rounds (0 if none).
    """

    score: torch.Tensor
    rounds_isolated: torch.Tensor
    mean_isolation: torch.Tensor
    max_isolation: torch.Tensor

    def ranking(self, rows: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """``rows`` (default: every row) ordered by decreasing suspicion, ties by lowest position."""
        r = torch.arange(self.score.numel()) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        r = torch.sort(r).values
        order = torch.sort(-self.score[r], stable=True).indices
        return r[order]


def suspicion(evidence: Sequence[RoundEvidence], num_rows: int) -> Suspicion:
    """Suspicion of every row from the evidence of all rounds.

    Args:
        evidence: One :class:`RoundEvidence` per round that has some.
        num_rows: Rows of the training set.
    """
    count = torch.zeros(num_rows, dtype=torch.long)
    total = torch.zeros(num_rows, dtype=torch.float64)
    largest = torch.zeros(num_rows, dtype=torch.float64)
    for ev in evidence:
        count.index_add_(0, ev.rows, torch.ones_like(ev.rows))
        total.index_add_(0, ev.rows, ev.scores)
        largest[ev.rows] = torch.maximum(largest[ev.rows], ev.scores)
    mean = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
    mean = torch.round(mean * 10**SCORE_DECIMALS) / 10**SCORE_DECIMALS
    return Suspicion(
        score=count.double() + mean, rounds_isolated=count, mean_isolation=mean, max_isolation=largest
    )
