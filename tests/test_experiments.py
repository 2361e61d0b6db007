"""The experiment layer: registries feed every choice, every shared flag has one name, and an attack and a
defense defined in this file alone run through a recipe and a benchmark cell."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import load_script
from test_recipes import TINY

from hf_epic import EpicConfig
from hf_epic.attacks import ATTACK_REGISTRY, AttackSettings, attack_names, craft_badnets, register_attack
from hf_epic.epic_callback import EpicCallback
from hf_epic.experiments.args import BenchmarkArguments, BenchmarkConfig, ScriptArguments
from hf_epic.experiments.defenses import DEFENSE_REGISTRY, defense_names, register_defense
from hf_epic.models import model_kinds

ROOT = Path(__file__).resolve().parents[1]
NEW_ATTACK, NEW_DEFENSE = "corner_patch", "drop-3-highest-loss"
BENCHMARK_ONLY = {
    "trials",
    "attacks",
    "defenses",
    "num_threads",
    "optimizer",
    "finetune_learning_rate",
    "baseline_reference",
    "attack_kwargs",
    "attack_seed_offset",
    "progress",
}
"""Benchmark settings no recipe has (the grid, and the cells' own training choices)."""


@dataclasses.dataclass
class CornerPatchSettings(AttackSettings):
    """Settings of the test's attack."""

    budget: float = 0.05
    patch_size: int = 2


def craft_corner_patch(train_ds, *, budget=0.05, patch_size=2, poison_class=None, seed=0):
    """A BadNets variant with a 2-pixel patch, under its own name."""
    poisoned, spec = craft_badnets(
        train_ds, budget=budget, patch_size=patch_size, poison_class=poison_class, seed=seed
    )
    return poisoned, dataclasses.replace(spec, attack=NEW_ATTACK)


class DropHighestLoss(EpicCallback):
    """Each round drops the 3 highest-loss rows not dropped before."""

    calls = 0

    def select_rows(self, embeddings, labels, losses, already_dropped):
        DropHighestLoss.calls += 1
        dropped = set(already_dropped.tolist())
        fresh = [int(i) for i in torch.argsort(losses, descending=True) if int(i) not in dropped][:3]
        return torch.tensor(sorted(fresh), dtype=torch.long)


@pytest.fixture
def new_attack_and_defense():
    """Register the attack and the defense of this file (and unregister them afterwards)."""
    register_attack(NEW_ATTACK, kind="backdoor", needs="nothing", settings=CornerPatchSettings)(
        craft_corner_patch
    )
    register_defense(
        NEW_DEFENSE, group="baseline", callback=lambda args, schedule, seed: DropHighestLoss(args)
    )
    DropHighestLoss.calls = 0
    try:
        yield
    finally:
        ATTACK_REGISTRY.remove(NEW_ATTACK)
        DEFENSE_REGISTRY.remove(NEW_DEFENSE)


def test_a_new_attack_and_defense_run_through_a_recipe_and_a_benchmark_cell(new_attack_and_defense, tmp_path):
    from hf_epic.experiments import evaluate_run, load_task, make_trainer, model_for, parse_recipe_args, train
    from hf_epic.experiments.benchmark import run_benchmark

    # the choices are the registries': the new names parse where the old lists would have refused them
    bench = load_script("recipes/benchmark.py")
    grid, _ = bench.build_parser().parse_args_into_dataclasses(
        args=["--attacks", NEW_ATTACK, "--defenses", "none", NEW_DEFENSE]
    )
    assert grid.attacks == [NEW_ATTACK] and grid.defenses == ["none", NEW_DEFENSE]

    # a recipe, end to end, with the new attack
    out = tmp_path / "recipe"
    load_script("recipes/backdoor.py").main([*TINY, "--attack", NEW_ATTACK, "--output_dir", str(out)])
    spec = json.loads((out / "poison_spec.json").read_text())
    results = json.loads((out / "recipe_results.json").read_text())
    assert spec["attack"] == NEW_ATTACK and spec["trigger"]["size"] == 2
    assert results["rows"][0]["num_poisons"] == len(spec["poison_indices"]) == 10

    # the recipes' trainer under the new defense
    args, training_args = parse_recipe_args(
        {"model_kind": "cnn", "attack": NEW_ATTACK}, {"output_dir": str(tmp_path / "defended"), "report_to": "none"},
        argv=[*TINY, "--remove_unused_columns", "false"],
    )  # fmt: skip
    train_rows, test, id2label = load_task(args, training_args.seed)
    trainer = make_trainer(
        model_for(args, id2label), training_args, args, train_rows, test, defense=NEW_DEFENSE
    )
    row = evaluate_run("new defense", train(trainer), args, test, None)
    # one round (after epoch 1 of 2), chosen by the new defense's callback
    assert DropHighestLoss.calls == 1 and row["rows_dropped"] == 3 and row["rounds"] == 1

    # a benchmark cell with both
    config = BenchmarkConfig(
        max_train_rows=200, max_eval_rows=100, num_train_epochs=2, epic_start_epoch=1, epic_interval=1
    )
    records = run_benchmark(
        config,
        trials=[0],
        attacks=[NEW_ATTACK],
        defenses=["none", NEW_DEFENSE],
        output_dir=tmp_path / "bench",
    )
    by_defense = {r["defense"]: r for r in records}
    assert set(by_defense) == {"none", NEW_DEFENSE}
    assert by_defense[NEW_DEFENSE]["num_dropped"] == 3 and by_defense[NEW_DEFENSE]["round_epochs"] == [1]
    assert DropHighestLoss.calls == 2
    assert by_defense["none"]["num_dropped"] == 0 and by_defense["none"]["attack_kind"] == "backdoor"
    assert f"| {NEW_ATTACK} | {NEW_DEFENSE} | 1 |" in (tmp_path / "bench" / "results.md").read_text()


def _flags(parser) -> set[str]:
    return {s[2:] for s in parser._option_string_actions if s.startswith("--") and "-" not in s[2:]}


def test_every_flag_the_recipes_and_the_benchmark_share_has_one_name():
    from transformers import HfArgumentParser

    recipe = _flags(HfArgumentParser((ScriptArguments, EpicConfig)))
    benchmark = _flags(load_script("recipes/benchmark.py").build_parser())
    assert benchmark >= BENCHMARK_ONLY
    # every other benchmark setting is a recipe flag under the same name
    assert benchmark - BENCHMARK_ONLY - {"help"} <= recipe, sorted(benchmark - BENCHMARK_ONLY - recipe)
    for name in ("max_train_rows", "model_kind", "backbone_epochs", "epic_start_epoch", "num_train_epochs"):
        assert name in benchmark and name in recipe
    # the former second names of those settings are gone from both
    for alias in ("epic_start", "epic_stop", "model", "train_size", "test_size", "pretrain_epochs", "epochs"):
        assert alias not in benchmark and alias not in recipe
    for alias in ("batch_size", "dataset", "num_workers"):
        assert alias not in benchmark


def test_choices_come_from_the_registries():
    from transformers import HfArgumentParser

    parser = HfArgumentParser((ScriptArguments, EpicConfig))
    actions = parser._option_string_actions
    assert list(actions["--attack"].choices) == [*attack_names(), "none"]
    assert (
        list(actions["--model_kind"].choices) == list(model_kinds()) == ["vit", "vit-p7", "timm-vit", "cnn"]
    )
    bench = HfArgumentParser((BenchmarkArguments, BenchmarkConfig))._option_string_actions
    assert list(bench["--defenses"].choices) == list(defense_names())
    assert list(bench["--baseline_reference"].choices) == list(defense_names("epic"))
    assert attack_names("targeted") == ("gradient_matching", "bullseye_polytope", "feature_collision")
    assert attack_names("backdoor") == ("sleeper_agent", "badnets")
    assert defense_names() == (
        "none", "epic-0.1", "epic-0.2", "epic-0.3", "epic-0.2-persistent", "epic-0.2-ranked", "random",
        "high-loss", "low-confidence", "clean-control", "clean-epic-0.2",
    )  # fmt: skip
    with pytest.raises(ValueError, match="already registered"):
        register_defense("none", group="none")
    with pytest.raises(ValueError, match="Unknown attack 'mixup'; choose from gradient_matching"):
        ATTACK_REGISTRY.get("mixup")


def test_every_public_name_of_the_experiment_layer_resolves():
    import hf_epic.experiments as ex

    for name in ex.__all__:
        assert getattr(ex, name) is not None, name
    with pytest.raises(AttributeError, match="has no attribute 'harness'"):
        ex.harness  # noqa: B018


def test_the_docs_name_every_registered_entry():
    """docs/api.md lists the attacks, defenses, model kinds, data sets and drop rules the registries hold."""
    from hf_epic.drop_rules import available_drop_rules
    from hf_epic.experiments import dataset_names

    api = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    names = [*attack_names(), *defense_names(), *model_kinds(), *dataset_names(), *available_drop_rules()]
    missing = [name for name in names if f"`{name}`" not in api and f"craft_{name}" not in api]
    assert not missing, f"docs/api.md does not name {missing}; add them where the registries are listed"
