"""The experiment layer the recipes and the benchmark share (imported lazily, one noun per module).

* :mod:`~hf_epic.experiments.args` - argument dataclasses for ``HfArgumentParser``;
* :mod:`~hf_epic.experiments.data` - the data-set registry and loading;
* :mod:`~hf_epic.experiments.models` - tiny and pretrained models, transforms, head surgery;
* :mod:`~hf_epic.experiments.backbone` - clean backbones, trained once and cached;
* :mod:`~hf_epic.experiments.poisons` - crafting through the attack registry, and the poison cache;
* :mod:`~hf_epic.experiments.defenses` - the defense registry;
* :mod:`~hf_epic.experiments.training` - the recipes' trainer, evaluation, summary and push;
* :mod:`~hf_epic.experiments.scoring` - clean accuracy, attack success, target margins;
* :mod:`~hf_epic.experiments.benchmark` - cells, the result store and the grid;
* :mod:`~hf_epic.experiments.report` - the benchmark's tables and plot.

Attacks register in :mod:`hf_epic.attacks.registry`, model kinds in :mod:`hf_epic.models`.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule that defines it
_LAZY: dict[str, str] = {
    "AttackArguments": "args",
    "BenchmarkArguments": "args",
    "BenchmarkConfig": "args",
    "DataArguments": "args",
    "ModelArguments": "args",
    "ScriptArguments": "args",
    "parse_recipe_args": "args",
    "parse_trials": "args",
    "DATASET_REGISTRY": "data",
    "dataset_label": "data",
    "dataset_names": "data",
    "label_names": "data",
    "load_splits": "data",
    "load_task": "data",
    "normalise_columns": "data",
    "register_dataset": "data",
    "split_source": "data",
    "build_classifier": "models",
    "freeze_all_but_head": "models",
    "FeatureProbe": "models",
    "load_pretrained": "models",
    "model_for": "models",
    "new_model": "models",
    "model_transform": "models",
    "pretrained_copy": "models",
    "reset_head": "models",
    "backbone_and_task_split": "backbone",
    "backbone_description": "backbone",
    "trial_backbone": "backbone",
    "ATTACK_PRESETS": "poisons",
    "DIGITS_ATTACK_KWARGS": "poisons",
    "HARD_DIGITS_ATTACK_KWARGS": "poisons",
    "attacker_model": "poisons",
    "craft_poisons": "poisons",
    "describe_poisons": "poisons",
    "poison_training_set": "poisons",
    "victim_setting": "poisons",
    "DEFENSE_REGISTRY": "defenses",
    "defense_names": "defenses",
    "get_defense": "defenses",
    "register_defense": "defenses",
    "COMMON_TRAINING_DEFAULTS": "training",
    "evaluate_runs": "training",
    "finish": "training",
    "training_defaults": "training",
    "evaluate_run": "training",
    "make_trainer": "training",
    "print_table": "training",
    "save_and_push": "training",
    "train": "training",
    "undefended_args": "training",
    "predict_classes": "scoring",
    "predict_logits": "scoring",
    "score_attack": "scoring",
    "target_margins": "scoring",
    "ResultStore": "benchmark",
    "cell_key": "benchmark",
    "craft_or_load": "benchmark",
    "run_benchmark": "benchmark",
    "run_cell": "benchmark",
    "summarize": "report",
    "write_report": "report",
    "Timer": "runtime",
    "banner": "runtime",
    "is_main_process": "runtime",
    "shutdown_distributed": "runtime",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_epic.experiments' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
