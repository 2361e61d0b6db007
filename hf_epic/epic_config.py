"""``EpicConfig``: ``TrainingArguments`` plus the EPIC settings (all prefixed ``epic_``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from transformers import TrainingArguments

__all__ = ["EpicConfig", "default_epic_settings", "validate_epic_settings"]

GREEDY_CHOICES = ("lazy", "stochastic")
METRIC_CHOICES = ("euclidean", "cosine")
EMBEDDING_CHOICES = ("logits_grad", "last_layer_grad")


def _bad(name: str, value: Any, need: str, fix: str) -> ValueError:
    return ValueError(f"{name}={value!r} is invalid: {need}. {fix}")


def validate_epic_settings(values: Mapping[str, Any]) -> None:
    """Check EPIC settings and raise a ValueError that says what to change.

    Args:
        values: A mapping with every ``epic_*`` field of :class:`EpicConfig`.

    Raises:
        ValueError: On the first invalid setting.
        TypeError: When a setting has the wrong type.
    """
    for name in ("epic_interval", "epic_start_epoch", "epic_cluster_threshold", "epic_memory_budget_mb"):
        if isinstance(values[name], bool) or not isinstance(values[name], int):
            raise TypeError(f"{name} must be an int, got {type(values[name]).__name__}; pass e.g. {name}=2.")
    fraction = values["epic_fraction"]
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not 0.0 < float(fraction) < 1.0
    ):
        raise _bad(
            "epic_fraction",
            fraction,
            "it is the share of each class kept as medoids and must lie strictly between 0 and 1",
            "Use 0.1, 0.2 or 0.3 (EPIC-0.1/0.2/0.3); to switch EPIC off set epic_enabled=False.",
        )
    if values["epic_interval"] < 1:
        raise _bad(
            "epic_interval", values["epic_interval"], "it must be >= 1 epoch", "Pass epic_interval=1 or more."
        )
    if values["epic_start_epoch"] < 1:
        raise _bad(
            "epic_start_epoch",
            values["epic_start_epoch"],
            "the first round needs at least one trained epoch (gradients of an untrained model say nothing)",
            "Pass epic_start_epoch=1 or more.",
        )
    stop = values["epic_stop_epoch"]
    if stop is not None:
        if isinstance(stop, bool) or not isinstance(stop, int):
            raise TypeError(f"epic_stop_epoch must be an int or None, got {type(stop).__name__}.")
        if stop <= values["epic_start_epoch"]:
            raise _bad(
                "epic_stop_epoch",
                stop,
                f"no round would run, since it is not after epic_start_epoch={values['epic_start_epoch']}",
                "Pass a larger epic_stop_epoch, or None for no stop.",
            )
    if values["epic_greedy"] not in GREEDY_CHOICES:
        raise _bad(
            "epic_greedy", values["epic_greedy"], f"choose one of {GREEDY_CHOICES}", "Use 'lazy' (default)."
        )
    if values["epic_metric"] not in METRIC_CHOICES:
        raise _bad(
            "epic_metric",
            values["epic_metric"],
            f"choose one of {METRIC_CHOICES}",
            "Use 'euclidean' (default).",
        )
    if values["epic_embedding"] not in EMBEDDING_CHOICES:
        raise _bad(
            "epic_embedding",
            values["epic_embedding"],
            f"choose one of {EMBEDDING_CHOICES}",
            "Use 'logits_grad' (the reference's) or 'last_layer_grad'.",
        )
    if values["epic_cluster_threshold"] < 1:
        raise _bad(
            "epic_cluster_threshold",
            values["epic_cluster_threshold"],
            "clusters of size <= threshold are dropped and every cluster holds its medoid",
            "Pass 1 (default: drop medoids no other row chose) or more.",
        )
    batch = values["epic_embedding_batch_size"]
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise _bad(
            "epic_embedding_batch_size",
            batch,
            "it must be a positive int",
            "Pass e.g. 256, or None to use per_device_eval_batch_size.",
        )
    if values["epic_memory_budget_mb"] < 1:
        raise _bad(
            "epic_memory_budget_mb", values["epic_memory_budget_mb"], "it must be >= 1", "Pass e.g. 1024."
        )
    eps = values["epic_stochastic_epsilon"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < float(eps) < 1.0:
        raise _bad(
            "epic_stochastic_epsilon", eps, "it must lie strictly between 0 and 1", "Use the default 0.01."
        )


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
            "help": "Similarity of gradient embeddings: 'euclidean' (exp(-d/D), the reference's) or 'cosine'."
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
            "help": "Batch size of the embedding pass (None: the larger of per_device_eval_batch_size and 256)."
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

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_epic_settings(self.epic_settings())

    def epic_settings(self) -> dict[str, Any]:
        """Return the ``epic_*`` fields as a plain dict (the ``config`` of ``epic_state.json``)."""
        return {f.name: getattr(self, f.name) for f in fields(EpicConfig) if f.name.startswith("epic_")}


def default_epic_settings() -> dict[str, Any]:
    """Return the default value of every ``epic_*`` field of :class:`EpicConfig`."""
    return {f.name: f.default for f in fields(EpicConfig) if f.name.startswith("epic_")}
