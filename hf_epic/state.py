"""The EPIC state of a training run: dropped rows and one record per selection round, as JSON.

The state is saved atomically (write to a temporary file in the same folder, then ``os.replace``)
as ``epic_state.json`` into every checkpoint and into the output folder, and restored on resume.
No pickle is involved anywhere.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

from .drop_rules import RoundEvidence, Suspicion, suspicion

STATE_FILE_NAME = "epic_state.json"
STATE_VERSION = 1

__all__ = [
    "RESUME_CHECKED_SETTINGS",
    "STATE_FILE_NAME",
    "EpicState",
    "atomic_write_json",
    "check_state_matches_run",
]

# Settings that change which rows a run drops: a state made with other values does not describe this run.
RESUME_CHECKED_SETTINGS = (
    "epic_enabled",
    "epic_fraction",
    "epic_interval",
    "epic_start_epoch",
    "epic_stop_epoch",
    "epic_greedy",
    "epic_metric",
    "epic_cluster_threshold",
    "epic_embedding",
    "epic_embedding_source",
    "epic_stochastic_epsilon",
    "epic_max_drop_fraction",
    "epic_drop_rule",
    "epic_drop_persistence",
    "epic_drop_rank_share",
)


def atomic_write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write ``payload`` as JSON to ``path`` atomically (readers never see a half-written file).

    Args:
        path: Destination file. Its folder is created if missing.
        payload: Any JSON-serialisable object.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass
class EpicState:
    """What EPIC has done so far in a run (mirrors ``epic_state.json``).

    Args:
        num_rows: Number of rows of the training set.
        dropped: Sorted row positions dropped so far (cumulative; a dropped row never returns).
        config: The ``epic_*`` settings of the run.
        epoch_start_steps: Global step at which each started epoch began (index = epoch).
        epoch_end_steps: Global step at which each finished epoch ended (index = epoch).
        rounds: One dict per selection round (see ``docs/api.md`` for the keys).
        version: Format version of the file.
    """

    num_rows: int = 0
    dropped: list[int] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    epoch_start_steps: list[int] = field(default_factory=list)
    epoch_end_steps: list[int] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    version: int = STATE_VERSION

    @property
    def kept(self) -> list[int]:
        """Sorted row positions still trained on."""
        dropped = set(self.dropped)
        return [i for i in range(self.num_rows) if i not in dropped]

    @property
    def num_dropped(self) -> int:
        """Number of rows dropped so far."""
        return len(self.dropped)

    def evidence(self) -> list[RoundEvidence]:
        """The isolation evidence of every round that recorded some, oldest first.

        A round record without ``isolated_rows`` (a custom ``select_rows``, or a file written before
        the evidence was kept) contributes nothing.
        """
        found = (RoundEvidence.from_record(r, i) for i, r in enumerate(self.rounds))
        return [e for e in found if e is not None]

    def suspicion(self) -> Suspicion:
        """Every row's suspicion from the recorded evidence (:func:`hf_epic.drop_rules.suspicion`)."""
        return suspicion(self.evidence(), self.num_rows)

    def round_dropped(self) -> list[int | None]:
        """For every row, the number of the round that dropped it (None for kept rows)."""
        out: list[int | None] = [None] * self.num_rows
        for i, record in enumerate(self.rounds):
            for row in record.get("newly_dropped") or []:
                if 0 <= int(row) < self.num_rows and out[int(row)] is None:
                    out[int(row)] = int(record.get("round", i + 1))
        return out

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (key order as in the contract)."""
        data = asdict(self)
        return {
            "version": data["version"],
            "num_rows": data["num_rows"],
            "dropped": data["dropped"],
            "config": data["config"],
            "epoch_start_steps": data["epoch_start_steps"],
            "epoch_end_steps": data["epoch_end_steps"],
            "rounds": data["rounds"],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EpicState:
        """Build a state from a dict produced by :meth:`to_dict` (or read from ``epic_state.json``).

        Args:
            data: The dict.

        Raises:
            ValueError: If the version is unknown or a required key is missing.
        """
        version = int(data.get("version", -1))
        if version != STATE_VERSION:
            raise ValueError(
                f"epic_state.json has version {version}, this hf-epic reads version {STATE_VERSION}; "
                "resume with the hf-epic release that wrote the checkpoint."
            )
        if "num_rows" not in data or "dropped" not in data:
            raise ValueError("epic_state.json lacks 'num_rows' or 'dropped'; the file is damaged.")
        return cls(
            num_rows=int(data["num_rows"]),
            dropped=sorted(int(i) for i in data["dropped"]),
            config=dict(data.get("config", {})),
            epoch_start_steps=[int(s) for s in data.get("epoch_start_steps", [])],
            epoch_end_steps=[int(s) for s in data.get("epoch_end_steps", [])],
            rounds=list(data.get("rounds", [])),
            version=version,
        )

    def save(self, path: str | os.PathLike) -> str:
        """Write the state atomically.

        Args:
            path: A file path, or a folder (then ``<folder>/epic_state.json`` is written).

        Returns:
            The file path written.
        """
        path = os.fspath(path)
        if os.path.isdir(path) or not path.endswith(".json"):
            path = os.path.join(path, STATE_FILE_NAME)
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> EpicState:
        """Read a state written by :meth:`save`.

        Args:
            path: The file, or the folder holding ``epic_state.json``.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, STATE_FILE_NAME)
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(
                f"{path} is not valid JSON ({error}); the file is damaged (e.g. truncated). Resume from an "
                "earlier checkpoint folder, or delete that checkpoint folder and resume again."
            ) from error
        if not isinstance(data, dict):
            raise ValueError(
                f"{path} holds a {type(data).__name__}, not an EPIC state object; the file is damaged."
            )
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from error


def check_state_matches_run(
    state: EpicState, num_rows: int, settings: dict[str, Any], source: str | None = None
) -> None:
    """Refuse a restored state that does not describe the run it is resumed into.

    Checks the row count, that every dropped position lies in ``[0, num_rows)``, that the recorded
    epoch boundaries are consistent, and that the settings in :data:`RESUME_CHECKED_SETTINGS` equal
    those the state was made with (a setting the state does not record counts as its default).

    Args:
        state: The restored state.
        num_rows: Rows of this run's training set.
        settings: This run's ``epic_*`` settings.
        source: Where the state came from (for the message).

    Raises:
        ValueError: Naming the mismatch and the fix.
    """
    from .epic_config import default_epic_settings

    where = f"the EPIC state from {source}" if source else "the restored EPIC state"
    if state.num_rows != num_rows:
        raise ValueError(
            f"{where} covers {state.num_rows} rows but the training set has {num_rows}; resume with the same "
            "training set (same rows, same order)."
        )
    bad = [i for i in state.dropped if not 0 <= i < num_rows]
    if bad or len(set(state.dropped)) != len(state.dropped):
        raise ValueError(
            f"{where} lists dropped rows outside [0, {num_rows}) or twice (e.g. {bad[:3]}); the file is damaged "
            "or from another training set. Resume from another checkpoint."
        )
    starts, ends = state.epoch_start_steps, state.epoch_end_steps
    ordered = all(a <= b for a, b in zip(starts, starts[1:])) and all(s <= e for s, e in zip(starts, ends))
    if len(ends) > len(starts) or not ordered:
        raise ValueError(
            f"{where} has inconsistent epoch boundaries (starts {starts[:5]}..., ends {ends[:5]}...); the file is "
            "damaged. Resume from another checkpoint."
        )
    for i, record in enumerate(state.rounds):
        rows = record.get("isolated_rows")
        if rows is None:
            continue
        scores = record.get("isolation_scores") or []
        outside = [r for r in rows if not 0 <= int(r) < num_rows]
        if outside or len(scores) != len(rows) or len(set(rows)) != len(rows):
            raise ValueError(
                f"{where}: round {record.get('round', i + 1)} lists isolated rows outside [0, {num_rows}) or "
                f"twice (e.g. {outside[:3]}), or {len(scores)} isolation scores for {len(rows)} rows; the file "
                "is damaged or from another training set. Resume from another checkpoint."
            )
    defaults = default_epic_settings()
    differ = []
    for name in RESUME_CHECKED_SETTINGS:
        made = state.config.get(name, defaults[name])
        now = settings.get(name, defaults[name])
        if made != now:
            differ.append(f"{name}={made!r} (this run: {now!r})")
    if differ:
        raise ValueError(
            f"{where} was made with other EPIC settings: {', '.join(differ)}. Resume with the settings it was "
            "made with, or train from the start (no resume_from_checkpoint) to use new ones."
        )
