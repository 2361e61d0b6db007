"""The defense registry: every defense (and clean-set control) the benchmark can run registers once.

A defense decides how a cell trains: with EPIC on or off, at which fraction, with a callback that
replaces EPIC's selection (the baselines), and on the poisoned or the clean training set. Register a
new one (one file, no other edit)::

    register_defense("epic-0.5", group="epic", epic_fraction=0.5)

The benchmark's ``--defenses`` choices and its report's order are read from here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..registry import Registry

GROUPS = ("none", "epic", "baseline", "control")
"""Defense groups, in the order cells run and rows are reported (EPIC before the baselines that copy its
drop schedule; the clean-set controls last)."""

__all__ = [
    "DEFENSE_REGISTRY",
    "DefenseInfo",
    "defense_names",
    "get_defense",
    "matching_control",
    "register_defense",
]


@dataclass(frozen=True)
class DefenseInfo:
    """One registered defense.

    Attributes:
        name: Its name.
        group: ``"none"``, ``"epic"``, ``"baseline"`` or ``"control"`` (see :data:`GROUPS`).
        epic_enabled: Whether EPIC's rounds run (a baseline's callback replaces their selection).
        epic_fraction: EPIC's subset fraction.
        epic_settings: Other ``EpicConfig`` fields the defense sets (e.g. its ``epic_drop_rule``).
        callback: ``callback(args, schedule, seed) -> EpicCallback``: replaces EPIC's selection (None:
            EPIC's own).
        needs_schedule: The callback replays the reference EPIC cell's per-round per-class drop counts.
        clean_set: Trains on the clean training set (a control: how often the target lands in the poison
            class without any poison).
        control_of: For a clean-set control, the defense it is the poison-free twin of.
    """

    name: str
    group: str
    epic_enabled: bool = True
    epic_fraction: float = 0.2
    epic_settings: Mapping[str, Any] = field(default_factory=dict)
    callback: Callable[[Any, Sequence[Mapping[int, int]] | None, int], Any] | None = None
    needs_schedule: bool = False
    clean_set: bool = False
    control_of: str | None = None


DEFENSE_REGISTRY: Registry[DefenseInfo] = Registry("defense")


def register_defense(name: str, *, group: str, **settings: Any) -> DefenseInfo:
    """Register a defense.

    Args:
        name: Its name (what ``--defenses`` takes).
        group: ``"none"``, ``"epic"``, ``"baseline"`` or ``"control"``.
        **settings: The other :class:`DefenseInfo` fields.
    """
    if group not in GROUPS:
        raise ValueError(f"group={group!r}: use one of {', '.join(GROUPS)}.")
    return DEFENSE_REGISTRY.add(name, DefenseInfo(name, group, **settings))


def get_defense(name: str) -> DefenseInfo:
    """The registered defense ``name`` (a ValueError lists the known ones)."""
    return DEFENSE_REGISTRY.get(name)


def defense_names(group: str | None = None) -> tuple[str, ...]:
    """Registered defense names (optionally of one group), groups in :data:`GROUPS` order."""
    items = [(GROUPS.index(d.group), i, n) for i, (n, d) in enumerate(DEFENSE_REGISTRY.items())]
    return tuple(n for _, _, n in sorted(items) if group is None or DEFENSE_REGISTRY.get(n).group == group)


def matching_control() -> dict[str, str]:
    """Defense -> the clean-set run it is compared with (the same training without the poisons)."""
    return {d.control_of: n for n, d in DEFENSE_REGISTRY.items() if d.control_of is not None}


register_defense("none", group="none", epic_enabled=False)
_REFERENCE_RULE = {"epic_drop_rule": "first_isolation"}  # the EPIC-x defenses are the reference method
for _fraction in (0.1, 0.2, 0.3):
    register_defense(
        f"epic-{_fraction}", group="epic", epic_fraction=_fraction, epic_settings=_REFERENCE_RULE
    )
# EPIC-0.2 with the alternative drop rules of hf_epic.drop_rules, at the settings chosen from the recorded
# isolation evidence of trials 0-11 (benchmarks/replay_drop_rules.py; docs/results/drop_rules.md)
register_defense(
    "epic-0.2-persistent", group="epic",
    epic_settings={"epic_drop_rule": "persistent", "epic_drop_persistence": 2},
)  # fmt: skip
register_defense(
    "epic-0.2-ranked", group="epic", epic_settings={"epic_drop_rule": "ranked", "epic_drop_rank_share": 0.005}
)
register_defense("clean-control", group="control", epic_enabled=False, clean_set=True, control_of="none")
register_defense(
    "clean-epic-0.2", group="control", epic_fraction=0.2, clean_set=True, control_of="epic-0.2",
    epic_settings=_REFERENCE_RULE,
)  # fmt: skip

from .. import baselines  # noqa: E402,F401  (registers the baselines: random, high-loss, low-confidence)
