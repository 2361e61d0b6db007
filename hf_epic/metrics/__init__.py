"""Evaluation metrics for poisoning studies, shipped as local ``evaluate`` modules.

Hub metric scripts cannot be downloaded offline, so each metric lives in this package as
``<name>/<name>.py`` and is loaded by path. Names: ``attack_success_rate`` (configs ``targeted`` and
``backdoor``), ``poison_detection``, ``clean_accuracy``.
"""

from pathlib import Path

import evaluate

METRIC_NAMES = ("attack_success_rate", "poison_detection", "clean_accuracy")


def metric_path(name: str) -> str:
    """Return the file path of a shipped metric module.

    Args:
        name: one of ``METRIC_NAMES``.

    Returns:
        The absolute path of ``<name>/<name>.py``, which ``evaluate.load`` accepts.
    """
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown metric {name!r}: hf_epic ships {', '.join(METRIC_NAMES)}.")
    return str(Path(__file__).resolve().parent / name / f"{name}.py")


def load_metric(name: str, config_name: str | None = None, **kwargs) -> evaluate.EvaluationModule:
    """Load a shipped metric offline with ``evaluate.load`` on its local file.

    Args:
        name: one of ``METRIC_NAMES``.
        config_name: ``"targeted"`` (default) or ``"backdoor"`` for ``attack_success_rate``.
        **kwargs: passed on to ``evaluate.load`` (e.g. ``experiment_id``).

    Returns:
        The loaded ``evaluate.Metric``.
    """
    return evaluate.load(metric_path(name), config_name=config_name, **kwargs)


__all__ = ["METRIC_NAMES", "load_metric", "metric_path"]
