"""hf-epic: the EPIC data-poisoning defense, built into the Hugging Face training stack.

Public API (imported lazily, so ``import hf_epic.selection`` stays free of HF imports)::

    from hf_epic import EpicConfig, EpicTrainer, EpicCallback      # training
    from hf_epic import find_isolated, SelectionResult            # the selection engine
    from hf_epic import partition_classes, merge_results          # selection over several processes
    from hf_epic import available_kernels, register_kernel        # similarity kernels
    from hf_epic import available_drop_rules, register_drop_rule  # which isolated rows are dropped
    from hf_epic import render_model_card, make_epic_plots        # model cards and plots
    from hf_epic import load_fashion_mnist, load_digits_dataset   # data that loads offline
    from hf_epic.attacks import craft_gradient_matching, ...      # poisoning attacks (registered)
    from hf_epic import experiments                               # what the recipes and benchmark share
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY: dict[str, str] = {
    "find_isolated": "selection",
    "SelectionResult": "selection",
    "partition_classes": "selection",
    "merge_results": "selection",
    "available_kernels": "kernels",
    "register_kernel": "kernels",
    "available_drop_rules": "drop_rules",
    "register_drop_rule": "drop_rules",
    "EpicConfig": "epic_config",
    "EpicCallback": "epic_callback",
    "EpicTrainer": "epic_trainer",
    "EpicState": "state",
    "compute_gradient_embeddings": "embeddings",
    "KeptRowsSampler": "sampler",
    "render_model_card": "model_card",
    "update_model_card": "model_card",
    "make_epic_plots": "plots",
    "load_digits_dataset": "data",
    "load_fashion_mnist": "fashion_mnist",
}

__all__ = [
    "EpicCallback",
    "EpicConfig",
    "EpicState",
    "EpicTrainer",
    "KeptRowsSampler",
    "SelectionResult",
    "__version__",
    "available_drop_rules",
    "available_kernels",
    "compute_gradient_embeddings",
    "find_isolated",
    "load_digits_dataset",
    "load_fashion_mnist",
    "make_epic_plots",
    "merge_results",
    "partition_classes",
    "register_drop_rule",
    "register_kernel",
    "render_model_card",
    "update_model_card",
]

if TYPE_CHECKING:  # pragma: no cover
    from .data import load_digits_dataset
    from .drop_rules import available_drop_rules, register_drop_rule
    from .embeddings import compute_gradient_embeddings
    from .epic_callback import EpicCallback
    from .epic_config import EpicConfig
    from .epic_trainer import EpicTrainer
    from .fashion_mnist import load_fashion_mnist
    from .kernels import available_kernels, register_kernel
    from .model_card import render_model_card, update_model_card
    from .plots import make_epic_plots
    from .sampler import KeptRowsSampler
    from .selection import SelectionResult, find_isolated, merge_results, partition_classes
    from .state import EpicState


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_epic' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
