"""Attack success rate (ASR) of a data-poisoning attack, targeted or backdoor.

Shipped as a local `evaluate` module; load it with
``evaluate.load("path/to/attack_success_rate.py", config_name="targeted" | "backdoor")`` or
``hf_epic.metrics.load_metric("attack_success_rate", config_name=...)``.
"""

import datasets
import evaluate

_DESCRIPTION = """
Attack success rate, the headline number of a poisoning study.

* ``targeted`` (default): a trial is one (target image, poison class) pair; it succeeds when the model
  trained on the poisoned set classifies the target as the poison class. ASR = successful trials /
  trials.
* ``backdoor``: the trigger is stamped on test images; ASR = fraction of the triggered images whose TRUE
  class is not the poison class that the model classifies as the poison class. Images of the poison
  class are left out (they would count as successes without any attack).
"""

_KWARGS_DESCRIPTION = """
Args (config ``targeted``):
    predictions (`list` of `int`): the class predicted for the target image, one per trial.
    references (`list` of `int`): the poison (adversarial) class of that trial.
Args (config ``backdoor``):
    predictions (`list` of `int`): the class predicted for each triggered test image.
    references (`list` of `int`): the TRUE class of each of those images.
    poison_class (`int`, keyword passed to `compute`): the class the trigger should send images to.
Returns:
    attack_success_rate (`float`): successes / evaluated, in [0, 1].
    num_success (`int`): successful trials (targeted) or images (backdoor).
    num_evaluated (`int`): trials (targeted), or triggered images not of the poison class (backdoor).
Examples:
    >>> asr = hf_epic.metrics.load_metric("attack_success_rate")
    >>> asr.compute(predictions=[3, 5, 3], references=[3, 3, 3])["attack_success_rate"]
    0.6666666666666666
    >>> bd = hf_epic.metrics.load_metric("attack_success_rate", config_name="backdoor")
    >>> bd.compute(predictions=[7, 7, 1, 7], references=[0, 1, 1, 7], poison_class=7)["attack_success_rate"]
    0.6666666666666666
"""

_CITATION = """
@inproceedings{schwarzschild2021toxic,
  title={Just How Toxic is Data Poisoning? A Unified Benchmark for Backdoor and Data Poisoning Attacks},
  author={Schwarzschild, Avi and Goldblum, Micah and Gupta, Arjun and Dickerson, John P and Goldstein, Tom},
  booktitle={International Conference on Machine Learning},
  year={2021}
}
"""

_CONFIGS = ("targeted", "backdoor")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AttackSuccessRate(evaluate.Metric):
    """Targeted-trial or backdoor attack success rate."""

    def _info(self) -> evaluate.MetricInfo:
        """Describe the inputs; the config name picks targeted or backdoor scoring."""
        if self.config_name not in (*_CONFIGS, "default"):
            raise ValueError(
                f"attack_success_rate has no config {self.config_name!r}: use config_name='targeted' "
                "(one prediction per trial) or config_name='backdoor' (one per triggered test image)."
            )
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(
        self, predictions: list[int], references: list[int], poison_class: int | None = None
    ) -> dict:
        """Score the attack.

        Args:
            predictions: predicted classes (per trial, or per triggered image).
            references: poison class per trial (targeted) or true class per image (backdoor).
            poison_class: backdoor only: the class the trigger targets.

        Returns:
            ``attack_success_rate``, ``num_success`` and ``num_evaluated``.
        """
        if self.config_name == "backdoor":
            if poison_class is None:
                raise ValueError(
                    "attack_success_rate (backdoor) needs the trigger's class: call "
                    "compute(predictions=..., references=<true labels>, poison_class=<int>)."
                )
            pairs = [(int(p), int(r)) for p, r in zip(predictions, references) if int(r) != int(poison_class)]
            num_success = sum(p == int(poison_class) for p, _ in pairs)
            what = "triggered test images whose true class is not the poison class"
        else:
            if poison_class is not None:
                raise ValueError(
                    "poison_class is only used by the 'backdoor' config; for targeted trials pass the "
                    "poison class of each trial as `references`."
                )
            pairs = [(int(p), int(r)) for p, r in zip(predictions, references)]
            num_success = sum(p == r for p, r in pairs)
            what = "trials"
        if not pairs:
            raise ValueError(f"attack_success_rate has nothing to score: got no {what}.")
        return {
            "attack_success_rate": num_success / len(pairs),
            "num_success": num_success,
            "num_evaluated": len(pairs),
        }
