"""How well a defense's dropped rows match the poisons: precision, recall, F1, clean rows dropped.

Shipped as a local `evaluate` module; load it with ``evaluate.load("path/to/poison_detection.py")`` or
``hf_epic.metrics.load_metric("poison_detection")``.
"""

import datasets
import evaluate

_DESCRIPTION = """
Treats a defense's dropped rows as its "this is a poison" predictions and scores them against the
ground-truth ``is_poison`` column of the poisoned training set, one entry per training row.

Undefined ratios (0/0) take the value of ``zero_division`` (default 0.0), as in scikit-learn:
* nothing dropped -> precision = zero_division (the defense flagged nothing, so it found nothing);
* no poisons in the set -> recall = zero_division;
* precision + recall = 0 -> F1 = 0.0;
* no clean rows -> clean_dropped_fraction = zero_division.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `bool`/`int`): 1 when the defense dropped the row, else 0 (one per training row).
    references (`list` of `bool`/`int`): 1 when the row is a poison (`is_poison`), else 0.
    zero_division (`float`, keyword passed to `compute`, default 0.0): value of an undefined ratio.
Returns:
    precision (`float`): poisons dropped / rows dropped.
    recall (`float`): poisons dropped / poisons.
    f1 (`float`): harmonic mean of precision and recall.
    clean_dropped_fraction (`float`): clean rows dropped / clean rows.
    num_dropped, poisons_dropped, clean_dropped, num_poisons, num_clean, num_rows (`int`).
Examples:
    >>> pd = hf_epic.metrics.load_metric("poison_detection")
    >>> out = pd.compute(predictions=[1, 1, 0, 0, 1], references=[1, 0, 1, 0, 0])
    >>> out["precision"], out["recall"], out["clean_dropped_fraction"]
    (0.3333333333333333, 0.5, 0.6666666666666666)
"""

_CITATION = """
@inproceedings{yang2022epic,
  title={Not All Poisons are Created Equal: Robust Training against Data Poisoning},
  author={Yang, Yu and Liu, Tian Yu and Mirzasoleiman, Baharan},
  booktitle={International Conference on Machine Learning},
  year={2022}
}
"""


def _ratio(numerator: int, denominator: int, zero_division: float) -> float:
    """Return numerator / denominator, or ``zero_division`` when the denominator is 0.

    Args:
        numerator: the count on top.
        denominator: the count below.
        zero_division: the value of 0/0.
    """
    return numerator / denominator if denominator else float(zero_division)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PoisonDetection(evaluate.Metric):
    """Precision / recall / F1 of dropped rows against ``is_poison``."""

    def _info(self) -> evaluate.MetricInfo:
        """Describe the inputs: per-row 0/1 flags."""
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int8"), "references": datasets.Value("int8")}
            ),
        )

    def _compute(self, predictions: list[int], references: list[int], zero_division: float = 0.0) -> dict:
        """Score the dropped rows.

        Args:
            predictions: 1 where the row was dropped.
            references: 1 where the row is a poison.
            zero_division: value of an undefined ratio.

        Returns:
            precision, recall, f1, clean_dropped_fraction and the raw counts.
        """
        bad = sorted({int(v) for v in [*predictions, *references]} - {0, 1})
        if bad:
            raise ValueError(
                f"poison_detection expects 0/1 (or bool) flags per training row, got values {bad[:5]}: "
                "pass predictions=<row was dropped> and references=<row is a poison>, not row indices."
            )
        if not predictions:
            raise ValueError("poison_detection got no rows: pass one dropped flag and one is_poison per row.")
        poisons_dropped = sum(1 for p, r in zip(predictions, references) if p and r)
        num_dropped = sum(1 for p in predictions if p)
        num_poisons = sum(1 for r in references if r)
        num_rows = len(predictions)
        clean_dropped = num_dropped - poisons_dropped
        num_clean = num_rows - num_poisons
        precision = _ratio(poisons_dropped, num_dropped, zero_division)
        recall = _ratio(poisons_dropped, num_poisons, zero_division)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        return {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "clean_dropped_fraction": _ratio(clean_dropped, num_clean, zero_division),
            "num_dropped": num_dropped,
            "poisons_dropped": poisons_dropped,
            "clean_dropped": clean_dropped,
            "num_poisons": num_poisons,
            "num_clean": num_clean,
            "num_rows": num_rows,
        }
