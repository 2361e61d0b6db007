"""``EpicConfig``: ``TrainingArguments`` plus the EPIC settings (all prefixed ``epic_``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from transformers import TrainingArguments

from .drop_rules import available_drop_rules
from .kernels import available_kernels
from .registry import LiveChoices

__all__ = ["EpicConfig", "default_epic_settings", "validate_epic_settings"]

GREEDY_CHOICES = ("lazy", "stochastic")
METRIC_CHOICES = LiveChoices(available_kernels)  # the registered similarity kernels (hf_epic.kernels)
DROP_RULE_CHOICES = LiveChoices(available_drop_rules)  # the registered drop rules (hf_epic.drop_rules)
EMBEDDING_CHOICES = ("logits_grad", "last_layer_grad")
EMBEDDING_SOURCE_CHOICES = ("eval_pass", "training_pass")


def _bad(name: str, value: Any, need: str, fix: str) -> ValueError:
    return ValueError(f"{name}={value!r} is invalid: {need}. {fix}")


def _wrong_type(name: str, value: Any, need: str, example: str) -> TypeError:
    hint = ""
    if isinstance(value, str):
        hint = (
            " (a string is not converted: 'False' would read as true)"
            if need.startswith("a bool")
            else (" (a string is not converted)")
        )
    return TypeError(
        f"{name}={value!r} has type {type(value).__name__}, but it must be {need}{hint}; pass e.g. {name}={example}."
    )


def _as_bool(name: str, value: Any, example: str) -> bool:
    """Accept Python and numpy booleans; refuse strings, numbers and None."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise _wrong_type(name, value, "a bool (True or False)", example)


def _as_int(name: str, value: Any, example: str, optional: bool = False) -> int | None:
    """Accept Python and numpy integers (not bools, not floats); None only when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    need = "an int or None" if optional else "an int"
    raise _wrong_type(name, value, need, example)


def _as_float(name: str, value: Any, example: str) -> float:
    """Accept Python and numpy ints and floats (not bools); refuse NaN."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
        number = float(value)
        if number != number:
            raise _bad(name, value, "it is not a number (NaN)", f"Pass e.g. {name}={example}.")
        return number
    raise _wrong_type(name, value, "a number (float)", example)


def _as_choice(name: str, value: Any, choices: tuple[str, ...], fix: str) -> str:
    if not isinstance(value, str):
        raise _wrong_type(name, value, f"a str, one of {choices}", repr(choices[0]))
    if value not in choices:
        raise _bad(name, value, f"choose one of {choices}", fix)
    return str(value)


def validate_epic_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """Check EPIC settings and raise an error that names the setting and says what to change.

    Numpy scalars are accepted where they mean the same value (``np.float32(0.2)``, ``np.int64(2)``,
    ``np.bool_(True)``) and converted to the Python type.

    Args:
        values: A mapping with every ``epic_*`` field of :class:`EpicConfig`.

    Returns:
        The settings with every value converted to its Python type.

    Raises:
        ValueError: On the first value out of range.
        TypeError: On the first value of the wrong type (a string for a bool, None for a number, ...).
    """
    out = dict(values)
    out["epic_enabled"] = _as_bool("epic_enabled", values["epic_enabled"], "False")
    out["epic_save_embeddings"] = _as_bool("epic_save_embeddings", values["epic_save_embeddings"], "True")
    for name in ("epic_interval", "epic_start_epoch", "epic_cluster_threshold", "epic_memory_budget_mb"):
        out[name] = _as_int(name, values[name], "2")
    out["epic_stop_epoch"] = _as_int("epic_stop_epoch", values["epic_stop_epoch"], "10", optional=True)
    out["epic_embedding_batch_size"] = _as_int(
        "epic_embedding_batch_size", values["epic_embedding_batch_size"], "256", optional=True
    )
    fraction = _as_float("epic_fraction", values["epic_fraction"], "0.2")
    if not 0.0 < fraction < 1.0:
        raise _bad(
            "epic_fraction",
            values["epic_fraction"],
            "it is the share of each class kept as medoids and must lie strictly between 0 and 1",
            "Use 0.1, 0.2 or 0.3 (EPIC-0.1/0.2/0.3); to switch EPIC off set epic_enabled=False.",
        )
    out["epic_fraction"] = fraction
    if out["epic_interval"] < 1:
        raise _bad(
            "epic_interval", values["epic_interval"], "it must be >= 1 epoch", "Pass epic_interval=1 or more."
        )
    if out["epic_start_epoch"] < 1:
        raise _bad(
            "epic_start_epoch",
            values["epic_start_epoch"],
            "the first round needs at least one trained epoch (gradients of an untrained model say nothing)",
            "Pass epic_start_epoch=1 or more.",
        )
    stop = out["epic_stop_epoch"]
    if stop is not None and stop <= out["epic_start_epoch"]:
        raise _bad(
            "epic_stop_epoch",
            stop,
            f"no round would run, since it is not after epic_start_epoch={out['epic_start_epoch']}",
            "Pass a larger epic_stop_epoch, or None for no stop.",
        )
    out["epic_greedy"] = _as_choice(
        "epic_greedy", values["epic_greedy"], GREEDY_CHOICES, "Use 'lazy' (default)."
    )
    out["epic_metric"] = _as_choice(
        "epic_metric", values["epic_metric"], tuple(METRIC_CHOICES), "Use 'euclidean' (default)."
    )
    out["epic_embedding"] = _as_choice(
        "epic_embedding",
        values["epic_embedding"],
        EMBEDDING_CHOICES,
        "Use 'logits_grad' (the reference's) or 'last_layer_grad'.",
    )
    out["epic_embedding_source"] = _as_choice(
        "epic_embedding_source",
        values["epic_embedding_source"],
        EMBEDDING_SOURCE_CHOICES,
        "Use 'eval_pass' (default, the reference's) or 'training_pass'.",
    )
    if out["epic_cluster_threshold"] < 1:
        raise _bad(
            "epic_cluster_threshold",
            values["epic_cluster_threshold"],
            "clusters of size <= threshold are dropped and every cluster holds its medoid",
            "Pass 1 (default: drop medoids no other row chose) or more.",
        )
    batch = out["epic_embedding_batch_size"]
    if batch is not None and batch < 1:
        raise _bad(
            "epic_embedding_batch_size",
            batch,
            "it must be a positive int",
            "Pass e.g. 256, or None to use per_device_eval_batch_size.",
        )
    if out["epic_memory_budget_mb"] < 1:
        raise _bad(
            "epic_memory_budget_mb", values["epic_memory_budget_mb"], "it must be >= 1", "Pass e.g. 1024."
        )
    eps = _as_float("epic_stochastic_epsilon", values["epic_stochastic_epsilon"], "0.01")
    if not 0.0 < eps < 1.0:
        raise _bad(
            "epic_stochastic_epsilon",
            values["epic_stochastic_epsilon"],
            "it must lie strictly between 0 and 1",
            "Use the default 0.01.",
        )
    out["epic_stochastic_epsilon"] = eps
    cap = _as_float("epic_max_drop_fraction", values["epic_max_drop_fraction"], "0.5")
    if not 0.0 < cap <= 1.0:
        raise _bad(
            "epic_max_drop_fraction",
            values["epic_max_drop_fraction"],
            "it is the largest share of each class EPIC may remove over the whole run, in (0, 1]",
            "Pass e.g. 0.5, or 1.0 for no cap (EPIC still keeps at least one row of every class).",
        )
    out["epic_max_drop_fraction"] = cap
    out["epic_drop_rule"] = _as_choice(
        "epic_drop_rule",
        values["epic_drop_rule"],
        tuple(DROP_RULE_CHOICES),
        "Use 'first_isolation' (default, the reference's), 'persistent', 'ranked', or register a rule "
        "with hf_epic.drop_rules.register_drop_rule.",
    )
    out["epic_drop_persistence"] = _as_int("epic_drop_persistence", values["epic_drop_persistence"], "2")
    if out["epic_drop_persistence"] < 1:
        raise _bad(
            "epic_drop_persistence",
            values["epic_drop_persistence"],
            "it is the number of consecutive rounds a row must be isolated before it is dropped",
            "Pass 1 or more (2 by default; 1 drops at the first isolation).",
        )
    share = _as_float("epic_drop_rank_share", values["epic_drop_rank_share"], "0.005")
    if not 0.0 < share <= 1.0:
        raise _bad(
            "epic_drop_rank_share",
            values["epic_drop_rank_share"],
            "it is the largest share of each class the 'ranked' rule drops per round, in (0, 1]",
            "Pass e.g. 0.005.",
        )
    out["epic_drop_rank_share"] = share
    return out


@dataclass
class EpicConfig(TrainingArguments):
    """``TrainingArguments`` with the EPIC defense settings.

    Epochs are counted as completed training epochs: with ``epic_start_epoch=2`` and
    ``epic_interval=2`` selection rounds run after epochs 2, 4, 6, ... (before the 3rd, 5th, 7th
    epoch is trained), until ``epic_stop_epoch`` (exclusive) or the end of training.

    Example:
        >>> from hf_epic import EpicConfig
        >>> cfg = EpicConfig(output_dir="out", num_train_epochs=10, epic_fraction=0.2, epic_start_epoch=2)

    Every field also shows in ``HfArgumentParser(EpicConfig)`` command lines (``--epic_fraction 0.2``).
    """

    epic_enabled: bool = field(
        default=True, metadata={"help": "Run EPIC selection rounds. False trains like a plain Trainer."}
    )
    epic_fraction: float = field(
        default=0.2,
        metadata={
            "help": "Share of each class chosen as medoids per round (EPIC-0.1/0.2/0.3). "
            "Larger values drop more isolated rows. Strictly between 0 and 1."
        },
    )
    epic_interval: int = field(default=2, metadata={"help": "Epochs between two selection rounds (T)."})
    epic_start_epoch: int = field(
        default=1, metadata={"help": "Completed training epochs before the first selection round (>= 1)."}
    )
    epic_stop_epoch: int | None = field(
        default=None,
        metadata={"help": "No selection round once this many epochs are completed (None: never stop)."},
    )
    epic_greedy: str = field(
        default="lazy",
        metadata={
            "help": "Facility-location optimiser: 'lazy' (lazy greedy) or 'stochastic' (stochastic greedy)."
        },
    )
    epic_metric: str = field(
        default="euclidean",
        metadata={
            "help": "Similarity of gradient embeddings: 'euclidean' (exp(-d/D), the reference's), 'cosine', or "
            "another kernel registered in hf_epic.kernels.",
            "choices": METRIC_CHOICES,
        },
    )
    epic_cluster_threshold: int = field(
        default=1,
        metadata={"help": "Rows in clusters of at most this many members are dropped (1: isolated medoids)."},
    )
    epic_embedding: str = field(
        default="logits_grad",
        metadata={
            "help": "Gradient embedding: 'logits_grad' (softmax minus one-hot, C dims, the reference's) or "
            "'last_layer_grad' (its outer product with the classifier's input features, C x H dims)."
        },
    )
    epic_embedding_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Batch size of the embedding pass (None: per_device_eval_batch_size, as Trainer.evaluate)."
        },
    )
    epic_embedding_source: str = field(
        default="eval_pass",
        metadata={
            "help": "Where a round's embeddings come from. 'eval_pass' (the reference's): an extra eval-mode, "
            "un-augmented pass over every row before the round. 'training_pass': recorded from the forward "
            "pass the Trainer already runs in the epoch before a round (needs EpicTrainer), so a round costs "
            "selection only; the embeddings then come from train mode (dropout, the training transform) and "
            "from weights that change during that epoch. Dropped rows, which that epoch never sees, keep "
            "their last recorded embedding; kept rows the epoch did not see (a resume mid-epoch, "
            "dataloader_drop_last) are embedded by an eval pass over just them. On the poisoning benchmark it "
            "drops fewer poisons than the eval pass (about half on digits, three quarters on Fashion-MNIST) and "
            "leaves attack success higher (docs/results/embedding_sources.md), so the eval pass stays the default."
        },
    )
    epic_save_embeddings: bool = field(
        default=False,
        metadata={
            "help": "Save each round's embeddings to <output_dir>/epic_embeddings/round_NNN.safetensors."
        },
    )
    epic_memory_budget_mb: int = field(
        default=1024,
        metadata={
            "help": "Memory budget (MiB) of the selection's similarity blocks; larger classes are tiled."
        },
    )
    epic_stochastic_epsilon: float = field(
        default=0.01, metadata={"help": "Epsilon of stochastic greedy (sample size n/k*log(1/eps))."}
    )
    epic_max_drop_fraction: float = field(
        default=1.0,
        metadata={
            "help": "Largest share of each class EPIC may remove over the whole run, in (0, 1]. A round that "
            "would pass it drops the highest-loss rows up to the cap. Whatever the cap, at least one row of "
            "every class is kept. A warning is logged once a class has lost more than half the cap."
        },
    )
    epic_drop_rule: str = field(
        default="first_isolation",
        metadata={
            "help": "Which isolated rows a round drops: 'first_isolation' (every isolated row, the reference's), "
            "'persistent' (rows isolated in epic_drop_persistence consecutive rounds), 'ranked' (per class the "
            "most isolated rows, at most epic_drop_rank_share of the class per round), or another rule "
            "registered in hf_epic.drop_rules.",
            "choices": DROP_RULE_CHOICES,
        },
    )
    epic_drop_persistence: int = field(
        default=2,
        metadata={
            "help": "'persistent' rule: consecutive rounds a row must be isolated before it is dropped (>= 1)."
        },
    )
    epic_drop_rank_share: float = field(
        default=0.005,
        metadata={
            "help": "'ranked' rule: largest share of each class dropped per round, in (0, 1]; the rows with "
            "the highest isolation score go first (0.005: the setting chosen and scored in "
            "docs/results/drop_rules.md)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, value in validate_epic_settings(self.epic_settings()).items():
            setattr(self, name, value)

    def epic_settings(self) -> dict[str, Any]:
        """Return the ``epic_*`` fields as a plain dict (the ``config`` of ``epic_state.json``)."""
        return {f.name: getattr(self, f.name) for f in fields(EpicConfig) if f.name.startswith("epic_")}


def default_epic_settings() -> dict[str, Any]:
    """Return the default value of every ``epic_*`` field of :class:`EpicConfig`."""
    return {f.name: f.default for f in fields(EpicConfig) if f.name.startswith("epic_")}
