"""Clean accuracy: the fraction of clean (untriggered, unpoisoned) test examples classified correctly.

Shipped as a local `evaluate` module because Hub metric scripts cannot be fetched offline; load it with
``evaluate.load("path/to/clean_accuracy.py")`` or ``hf_epic.metrics.load_metric("clean_accuracy")``.
"""

import datasets
import evaluate

_DESCRIPTION = """
Clean accuracy is the fraction of test examples whose predicted class equals the true class. In data
poisoning studies it is reported beside the attack success rate: a defense that stops an attack by
wrecking the model is no defense.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class of each clean test example.
    references (`list` of `int`): true class of each clean test example.
Returns:
    clean_accuracy (`float`): correct / total, in [0, 1].
    num_examples (`int`): how many examples were scored.
    num_correct (`int`): how many were classified correctly.
Examples:
    >>> metric = hf_epic.metrics.load_metric("clean_accuracy")
    >>> metric.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2])
    {'clean_accuracy': 0.75, 'num_examples': 4, 'num_correct': 3}
"""

_CITATION = """
@inproceedings{schwarzschild2021toxic,
  title={Just How Toxic is Data Poisoning? A Unified Benchmark for Backdoor and Data Poisoning Attacks},
  author={Schwarzschild, Avi and Goldblum, Micah and Gupta, Arjun and Dickerson, John P and Goldstein, Tom},
  booktitle={International Conference on Machine Learning},
  year={2021}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CleanAccuracy(evaluate.Metric):
    """Fraction of clean test examples classified correctly."""

    def _info(self) -> evaluate.MetricInfo:
        """Describe the module's inputs (integer predictions and references)."""
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions: list[int], references: list[int]) -> dict:
        """Compute the accuracy.

        Args:
            predictions: predicted class per example.
            references: true class per example.

        Returns:
            ``clean_accuracy``, ``num_examples`` and ``num_correct``.
        """
        if len(predictions) == 0:
            raise ValueError(
                "clean_accuracy got no examples: pass at least one prediction/reference pair "
                "(is the clean test split empty?)."
            )
        num_correct = sum(int(p) == int(r) for p, r in zip(predictions, references))
        return {
            "clean_accuracy": num_correct / len(predictions),
            "num_examples": len(predictions),
            "num_correct": num_correct,
        }
