"""The argument dataclasses every script parses with ``HfArgumentParser``, one name per setting.

* :class:`DataArguments` - the data set, its rendering and row limits (recipes and benchmark);
* :class:`ModelArguments` - the model: a pretrained one or a tiny kind, and the clean backbone (recipes);
* :class:`AttackArguments` - the attack a recipe poisons its training set with;
* :class:`ScriptArguments` - the three above plus ``compare_undefended``: a recipe's settings beside
  :class:`~hf_epic.EpicConfig` (every ``TrainingArguments`` flag plus ``--epic_*``);
* :class:`BenchmarkConfig` - everything that decides a benchmark cell's result, with the training and
  EPIC settings named as in ``TrainingArguments`` / ``EpicConfig``;
* :class:`BenchmarkArguments` - the benchmark's grid (trials x attacks x defenses) and output folder.

Choices (attacks, defenses, model kinds, data sets) come from the registries.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from ..attacks import attack_names
from ..epic_config import EMBEDDING_CHOICES, EMBEDDING_SOURCE_CHOICES, METRIC_CHOICES, EpicConfig
from ..models import model_kinds
from ..registry import LiveChoices
from .data import dataset_names
from .defenses import defense_names

__all__ = [
    "AttackArguments",
    "BenchmarkArguments",
    "BenchmarkConfig",
    "DataArguments",
    "ModelArguments",
    "ScriptArguments",
    "parse_recipe_args",
    "parse_trials",
]

DIGITS_VARIANTS = ("plain", "hard")


@dataclass
class DataArguments:
    """The data set and how much of it is used."""

    dataset_name: str = field(
        default="digits",
        metadata={
            "help": f"Registered data set ({', '.join(dataset_names())}), a save_to_disk folder of a "
            "DatasetDict, or a Hub data set id (needs the internet)."
        },
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of a data set's files where its loader reads them (fashion_mnist: the four IDX "
            "files; default: Debian's /usr/share/datasets/fashion-mnist, else the Hub)."
        },
    )
    digits_variant: str = field(
        default="plain",
        metadata={"help": "Rendering of --dataset_name digits.", "choices": list(DIGITS_VARIANTS)},
    )
    digits_renders: int | None = field(
        default=None,
        metadata={"help": "Renderings of each training digit (default: 3 for hard, 1 for plain)."},
    )
    image_size: int = field(
        default=16, metadata={"help": "Side of the model's square input (224 for ViT-B/16)."}
    )
    num_channels: int | None = field(
        default=None,
        metadata={"help": "1 (grayscale) or 3 (RGB); default: as the data set's images.", "choices": [1, 3]},
    )
    max_train_rows: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_rows: int | None = field(default=None, metadata={"help": "Use only the first N test rows."})

    def __post_init__(self) -> None:
        from hf_epic.data import check_renders  # the loader's own check, so a bad value fails here

        check_renders("digits_renders", self.digits_renders)
        if self.num_channels is not None and self.num_channels not in (1, 3):
            raise ValueError(f"--num_channels {self.num_channels}: use 1 (grayscale) or 3 (RGB).")
        if self.image_size < 8:
            raise ValueError(
                f"--image_size {self.image_size} is too small; use 16 for digits, 224 for ViT-B/16."
            )


@dataclass
class ModelArguments:
    """The model a recipe trains, and the clean backbone it starts from when it has none."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Pretrained model: a Hub id (google/vit-base-patch16-224-in21k), a timm name "
            "(timm/vit_tiny_patch16_224.augreg_in21k or vit_tiny_patch16_224) or a local folder. "
            "Default: a tiny model built from a config (fine-tuning/transfer first train it on a clean "
            "source split and cache it in <output_dir>/_backbone)."
        },
    )
    model_kind: str = field(
        default="vit",
        metadata={
            "help": "Tiny model built from a config when no --model_name_or_path.",
            "choices": LiveChoices(model_kinds),
        },
    )
    source_fraction: float = field(
        default=0.5,
        metadata={"help": "Offline fine-tuning/transfer: share of the rows kept clean for the backbone."},
    )
    backbone_epochs: int = field(default=6, metadata={"help": "Epochs of the clean backbone."})
    backbone_learning_rate: float = field(
        default=3e-3, metadata={"help": "Learning rate of the clean backbone."}
    )


@dataclass
class AttackArguments:
    """The attack a recipe poisons its training set with (each flag reaches the attacks that take it)."""

    attack: str = field(
        default="gradient_matching",
        metadata={
            "help": "Poisoning attack, or 'none'.",
            "choices": LiveChoices(attack_names, extra=["none"]),
        },
    )
    poison_budget: float = field(
        default=0.01, metadata={"help": "Poisons as a fraction of the training rows."}
    )
    poison_epsilon: float = field(
        default=16 / 255, metadata={"help": "l_inf bound of the perturbations, in [0, 1]."}
    )
    poison_class: int | None = field(default=None, metadata={"help": "Class of the poisons (None: chosen)."})
    num_targets: int = field(default=1, metadata={"help": "Targets of a targeted attack."})
    attack_steps: int = field(default=80, metadata={"help": "Optimisation steps of the attack."})
    attack_restarts: int = field(default=1, metadata={"help": "Random restarts of the attack."})
    surrogate_epochs: int = field(
        default=6, metadata={"help": "Epochs of the attacker's surrogate when no backbone is given to it."}
    )
    attack_seed: int = field(default=0, metadata={"help": "Seed of the attack."})

    def attack_settings(self, with_model: bool) -> dict[str, Any]:
        """The attack settings these flags set (each attack takes those it has).

        Args:
            with_model: The attack gets a model to craft against (then it trains no surrogate).
        """
        return {
            "poison_class": self.poison_class,
            "num_targets": self.num_targets,
            "budget": self.poison_budget,
            "epsilon": self.poison_epsilon,
            "steps": self.attack_steps,
            "restarts": self.attack_restarts,
            "surrogate_epochs": None if with_model else self.surrogate_epochs,
            "progress": False,
            "seed": self.attack_seed,
        }


@dataclass
class ScriptArguments(DataArguments, ModelArguments, AttackArguments):
    """A recipe's settings beside the training ones (those are ``EpicConfig``)."""

    compare_undefended: bool = field(
        default=False, metadata={"help": "Also train without EPIC on the same poisoned set and compare."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.source_fraction < 1.0:
            raise ValueError(
                f"--source_fraction {self.source_fraction} must lie strictly between 0 and 1, e.g. 0.5."
            )
        if not 0.0 < self.poison_budget < 1.0:
            raise ValueError(
                f"--poison_budget {self.poison_budget} is a fraction of the rows; use e.g. 0.01."
            )
        for name in ("max_train_rows", "max_eval_rows"):
            value = getattr(self, name)
            if value is not None and value < 20:
                raise ValueError(f"--{name} {value} leaves too few rows to train or score; use at least 20.")


def parse_recipe_args(
    script_defaults: dict[str, Any],
    training_defaults: dict[str, Any],
    argv: list[str] | None = None,
    attack_kind: str | None = None,
) -> tuple[ScriptArguments, EpicConfig]:
    """Parse ``HfArgumentParser((ScriptArguments, EpicConfig))`` with a recipe's defaults, and seed every
    generator from ``--seed`` (the recipes build models and transforms before the ``Trainer``, which
    seeds only when it is built; without this a run would depend on torch's random start-up seed).

    Args:
        script_defaults: Defaults for ``ScriptArguments`` fields.
        training_defaults: Defaults for ``EpicConfig`` fields (output_dir, epochs, learning rate, ...).
        argv: Arguments to parse (default: the command line).
        attack_kind: Accept only attacks of this kind (``"targeted"`` or ``"backdoor"``) and ``none``.
    """
    from transformers import HfArgumentParser, set_seed

    parser = HfArgumentParser((ScriptArguments, EpicConfig))
    if attack_kind is not None:
        parser._option_string_actions["--attack"].choices = LiveChoices(
            lambda: attack_names(attack_kind), extra=["none"]
        )
    # On a machine without a visible GPU, run on the CPU explicitly: the Trainer then also joins a
    # multi-process CPU launch (recipes/accelerate_configs/cpu_2proc.yaml) instead of ignoring it.
    parser.set_defaults(use_cpu=not torch.cuda.is_available())
    parser.set_defaults(**script_defaults, **training_defaults)
    script_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    set_seed(training_args.seed)
    return script_args, training_args


@dataclass
class BenchmarkConfig(DataArguments):
    """Everything that decides a benchmark cell's result (trial, attack and defense aside).

    The data fields are :class:`DataArguments`'; training and EPIC fields carry their
    ``TrainingArguments`` / ``EpicConfig`` names. ``attack_kwargs=None`` resolves to the data set's
    preset (:data:`hf_epic.experiments.poisons.ATTACK_PRESETS`).
    """

    num_channels: int | None = field(
        default=1, metadata={"help": "1 (grayscale) or 3 (RGB).", "choices": [1, 3]}
    )
    model_kind: str = field(
        default="cnn",
        metadata={"help": "Tiny victim model built from a config.", "choices": LiveChoices(model_kinds)},
    )
    num_train_epochs: int = field(default=40, metadata={"help": "Training epochs per cell."})
    per_device_train_batch_size: int = field(
        default=64,
        metadata={"help": "Batch size (the last incomplete batch of every epoch is dropped: BatchNorm)."},
    )
    optimizer: str = field(
        default="adamw",
        metadata={
            "help": "'sgd' (momentum 0.9, Nesterov) or 'adamw'; cosine decay.",
            "choices": ["sgd", "adamw"],
        },
    )
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.05, metadata={"help": "Weight decay."})
    epic_interval: int = field(default=2, metadata={"help": "Epochs between EPIC selection rounds (T)."})
    epic_start_epoch: int = field(default=2, metadata={"help": "First epoch at which EPIC selects."})
    epic_stop_epoch: int | None = field(
        default=None,
        metadata={"help": "No EPIC round once this many epochs are done (default: until the end)."},
    )
    epic_embedding: str = field(
        default="logits_grad",
        metadata={"help": "EPIC's gradient embedding.", "choices": list(EMBEDDING_CHOICES)},
    )
    epic_metric: str = field(
        default="euclidean", metadata={"help": "EPIC's similarity.", "choices": METRIC_CHOICES}
    )
    epic_embedding_source: str = field(
        default="eval_pass",
        metadata={
            "help": "Where EPIC's embeddings come from: an eval-mode pass per round (the reference's) or the "
            "training forward pass of the epoch before a round.",
            "choices": list(EMBEDDING_SOURCE_CHOICES),
        },
    )
    epic_cluster_threshold: int = field(
        default=1, metadata={"help": "EPIC drops rows in clusters of at most this many members."}
    )
    baseline_reference: str = field(
        default="epic-0.2",
        metadata={
            "help": "The EPIC defense whose drop schedule the baselines copy.",
            "choices": LiveChoices(lambda: defense_names("epic")),
        },
    )
    attack_kwargs: dict[str, dict[str, Any]] | str | None = field(
        default=None,
        metadata={
            "help": 'JSON: attack -> its settings, e.g. \'{"gradient_matching": {"epsilon": 0.0627}}\' '
            "(default: the data set's preset, hf_epic.experiments.poisons.ATTACK_PRESETS)."
        },
    )
    seed: int = field(
        default=0, metadata={"help": "Base seed; a cell's training seed is seed * 1000 + trial."}
    )
    attack_seed_offset: int = field(
        default=0,
        metadata={
            "help": "Added to each trial's seed for the attack alone (0: the surrogate starts from the "
            "victim's initial weights; e.g. 1000000: an attacker who does not know the victim's seed)."
        },
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader workers."})
    progress: bool = field(default=False, metadata={"help": "Show crafting and training progress bars."})
    backbone_epochs: int = field(
        default=12,
        metadata={"help": "Clean epochs of the backbone the transfer / fine-tuning attacks craft against."},
    )
    finetune_learning_rate: float = field(
        default=1e-4, metadata={"help": "Learning rate of the victim in the fine-tuning setting."}
    )

    def __post_init__(self) -> None:
        """Validate the settings before any time is spent (and resolve ``attack_kwargs=None``)."""
        super().__post_init__()
        from .poisons import preset_attack_kwargs

        if isinstance(self.attack_kwargs, str):
            try:
                self.attack_kwargs = json.loads(self.attack_kwargs)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f'--attack_kwargs is not valid JSON ({err}); e.g. \'{{"badnets": {{"budget": 0.05}}}}\'.'
                ) from None
        if self.attack_kwargs is None:
            self.attack_kwargs = preset_attack_kwargs(self)
        if not isinstance(self.attack_kwargs, dict) or not all(
            isinstance(v, dict) for v in self.attack_kwargs.values()
        ):
            raise ValueError(
                f"attack_kwargs={self.attack_kwargs!r}: pass a dict of attack name -> dict of settings."
            )
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer={self.optimizer!r}: use 'sgd' or 'adamw'.")
        if self.model_kind not in model_kinds():
            raise ValueError(f"model_kind={self.model_kind!r}: use one of {', '.join(model_kinds())}.")
        if self.baseline_reference not in defense_names("epic"):
            raise ValueError(
                f"baseline_reference={self.baseline_reference!r}: the baselines copy an EPIC run's drop "
                f"schedule; use one of {', '.join(defense_names('epic'))}."
            )
        if isinstance(self.attack_seed_offset, bool) or not isinstance(self.attack_seed_offset, int):
            raise ValueError(
                f"attack_seed_offset={self.attack_seed_offset!r}: pass an int (0 shares the victim's seed)."
            )
        for name in ("num_train_epochs", "per_device_train_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: pass a positive integer.")
        if self.epic_interval < 1 or self.epic_start_epoch < 1:
            raise ValueError("epic_interval and epic_start_epoch must be >= 1 (epochs are counted from 1).")
        if self.epic_stop_epoch is not None and self.epic_stop_epoch <= self.epic_start_epoch:
            raise ValueError(
                f"epic_stop_epoch={self.epic_stop_epoch} is not after epic_start_epoch={self.epic_start_epoch}: "
                "EPIC would never run; pass epic_stop_epoch > epic_start_epoch, or None."
            )
        from hf_epic.epic_config import default_epic_settings, validate_epic_settings

        # the EPIC options passed on unchanged get EpicConfig's own checks and messages
        passed_on = ("epic_embedding", "epic_embedding_source", "epic_metric", "epic_cluster_threshold")
        validate_epic_settings({**default_epic_settings(), **{k: getattr(self, k) for k in passed_on}})
        unknown = sorted(set(self.attack_kwargs) - set(attack_names()))
        if unknown:
            raise ValueError(
                f"attack_kwargs names unknown attacks {unknown}; known: {', '.join(attack_names())}."
            )

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


def parse_trials(text: str) -> list[int]:
    """Parse ``--trials``: ``N`` means trials 0..N-1; ``a-b`` a range; ``1,4,7`` a list."""
    text = str(text).strip()
    try:
        if "," in text:
            trials = [int(t) for t in text.split(",") if t.strip()]
        elif "-" in text:
            first, last = (int(t) for t in text.split("-", 1))
            trials = list(range(first, last + 1))
        else:
            trials = list(range(int(text)))
    except ValueError:
        raise ValueError(f"--trials {text!r}: pass a count (12), a range (3-7) or a list (0,4,9).") from None
    if not trials or min(trials) < 0:
        raise ValueError(f"--trials {text!r}: pass one or more non-negative trial numbers, e.g. 12.")
    return trials


@dataclass
class BenchmarkArguments:
    """The benchmark's grid and where it writes."""

    trials: str = field(default="12", metadata={"help": "Count N (trials 0..N-1), range a-b, or list a,b,c."})
    attacks: list[str] = field(
        default_factory=lambda: list(attack_names()),
        metadata={"help": "Attacks to run.", "choices": LiveChoices(attack_names)},
    )
    defenses: list[str] = field(
        default_factory=lambda: list(defense_names()),
        metadata={"help": "Defenses (and clean-set controls) to run.", "choices": LiveChoices(defense_names)},
    )
    output_dir: str = field(default="bench_out", metadata={"help": "Results, caches and the report go here."})
    num_threads: int | None = field(
        default=None,
        metadata={
            "help": "torch CPU threads (1 is fastest on a shared, oversubscribed CPU; default: torch's)."
        },
    )

    def __post_init__(self) -> None:
        self.trial_numbers = parse_trials(self.trials)
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"--num_threads {self.num_threads}: pass 1 or more.")
