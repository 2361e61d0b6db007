"""The recipes: their command lines parse, their configs load, and they run end to end."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import load_script
from huggingface_hub import ModelCard

from hf_epic.experiments import parse_recipe_args

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
NAMES = ("finetune_vit", "from_scratch", "transfer", "backdoor")
FASHION_MNIST_FILES = (Path("/usr/share/datasets/fashion-mnist") / "train-images-idx3-ubyte.gz").is_file()


def load_recipe(name: str):
    """Import a recipe file as a module (its main() is not run)."""
    return load_script(f"recipes/{name}.py")


def docstring_commands(module) -> list[list[str]]:
    """The ``accelerate launch`` commands of a recipe's docstring, split into words."""
    text = module.__doc__.replace("\\\n", " ")
    commands = [line.strip() for line in text.splitlines() if "accelerate launch" in line]
    return [shlex.split(c.replace("<you>", "someone")) for c in commands]


@pytest.mark.parametrize("name", NAMES)
def test_docstring_commands_are_ready_to_paste(name: str) -> None:
    """Every command names an existing accelerate config and flags the recipe's parser accepts."""
    module = load_recipe(name)
    commands = docstring_commands(module)
    assert len(commands) >= 3
    script = f"recipes/{name}.py"
    assert any("--push_to_hub" in c for c in commands)
    for words in commands:
        config = words[words.index("--config_file") + 1]
        assert (ROOT / config).is_file(), config
        argv = words[words.index(script) + 1 :]
        _, training_args = parse_recipe_args(
            module.SCRIPT_DEFAULTS,
            module.TRAINING_DEFAULTS,
            argv=argv,
        )
        assert training_args.output_dir.startswith("outputs/")


@pytest.mark.parametrize("name", NAMES)
def test_defaults_parse_into_script_arguments_and_epic_config(name: str) -> None:
    from hf_epic import EpicConfig

    module = load_recipe(name)
    a, training_args = parse_recipe_args(module.SCRIPT_DEFAULTS, module.TRAINING_DEFAULTS, argv=[])
    assert isinstance(training_args, EpicConfig)
    assert training_args.output_dir == f"outputs/{name}"
    assert training_args.remove_unused_columns is False and training_args.epic_enabled
    # the main recipe's default is Fashion-MNIST (make demo); the others run on the tiny digits
    assert a.dataset_name == ("fashion_mnist" if name == "finetune_vit" else "digits")
    assert a.model_name_or_path is None
    for key, value in module.TRAINING_DEFAULTS.items():
        if key != "report_to":
            assert getattr(training_args, key) == value, key
    # command-line flags override the recipe's defaults
    a, training_args = parse_recipe_args(
        module.SCRIPT_DEFAULTS,
        module.TRAINING_DEFAULTS,
        argv=["--epic_fraction", "0.3", "--attack", "none"],
    )
    assert training_args.epic_fraction == 0.3 and a.attack == "none"


def test_bad_recipe_arguments_fail_before_any_work() -> None:
    module = load_recipe("finetune_vit")
    with pytest.raises(SystemExit):  # argparse: the choices are the attack registry's names
        parse_recipe_args(module.SCRIPT_DEFAULTS, module.TRAINING_DEFAULTS, argv=["--attack", "nonsense"])
    with pytest.raises(ValueError, match="--source_fraction"):
        parse_recipe_args(module.SCRIPT_DEFAULTS, module.TRAINING_DEFAULTS, argv=["--source_fraction", "1.5"])
    with pytest.raises(ValueError, match="epic_fraction"):
        parse_recipe_args(module.SCRIPT_DEFAULTS, module.TRAINING_DEFAULTS, argv=["--epic_fraction", "2"])


def test_accelerate_configs() -> None:
    from accelerate.commands.config.config_args import ClusterConfig

    configs = {p.stem: yaml.safe_load(p.read_text()) for p in (RECIPES / "accelerate_configs").glob("*.yaml")}
    assert set(configs) == {"single_gpu", "multi_gpu", "cpu_2proc"}
    assert configs["single_gpu"]["num_processes"] == 1 and configs["single_gpu"]["distributed_type"] == "NO"
    assert configs["multi_gpu"]["distributed_type"] == "MULTI_GPU"
    # two CPU processes need MULTI_GPU with the GPUs hidden (MULTI_CPU starts one process)
    assert (
        configs["cpu_2proc"]["distributed_type"] == "MULTI_GPU" and configs["cpu_2proc"]["num_processes"] == 2
    )
    for path in (RECIPES / "accelerate_configs").glob("*.yaml"):
        ClusterConfig.from_yaml_file(str(path))  # accelerate itself accepts the file


def run_recipe(name: str, output_dir: Path, *args: str, launcher: list[str] | None = None) -> str:
    """Run a recipe in a subprocess (offline) and return its stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        *(launcher or [sys.executable]),
        str(RECIPES / f"{name}.py"),
        "--output_dir",
        str(output_dir),
        *args,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


TINY = [
    "--max_train_rows", "200",
    "--max_eval_rows", "60",
    "--num_train_epochs", "2",
    "--epic_start_epoch", "1",
    "--epic_interval", "1",
    "--poison_budget", "0.05",
    "--per_device_train_batch_size", "32",
]  # fmt: skip


def check_run(out: Path, stdout: str, num_rows: int) -> dict:
    """What every recipe run must leave behind; returns the results file."""
    for banner in ("data", "attack", "model", "training", "evaluation", "save and push"):
        assert f" {banner} =" in stdout
    assert "| run | clean accuracy | attack success | rows dropped | poisons dropped |" in stdout
    state = json.loads((out / "epic_state.json").read_text())
    assert state["num_rows"] == num_rows and len(state["rounds"]) >= 1
    results = json.loads((out / "recipe_results.json").read_text())
    row = results["rows"][0]
    assert row["rows_dropped"] == len(state["dropped"]) and row["num_rows"] == num_rows
    assert row["poisons_dropped"] == state["rounds"][-1]["poisons_dropped_total"]
    assert 0.0 <= row["clean_accuracy"] <= 1.0 and 0.0 <= row["attack_success_rate"] <= 1.0
    card = ModelCard.load(out / "README.md")
    assert {"hf-epic", "epic", "data-poisoning-defense"} <= set(card.data.tags)
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert metrics["accuracy"] == pytest.approx(row["clean_accuracy"], abs=1e-6)
    assert metrics["attack_success_rate"] == pytest.approx(row["attack_success_rate"], abs=1e-6)
    assert card.text.count("<!-- hf-epic:start -->") == 1 and "### Attack in the training data" in card.text
    assert (out / "epic_plots" / "epic_poisons_vs_clean.png").is_file()
    assert (out / "poison_spec.json").is_file() and (out / "model.safetensors").is_file()
    return results


@pytest.mark.multiprocess
def test_backdoor_recipe_end_to_end(tmp_path: Path) -> None:
    """BadNets (no crafting optimisation) + tiny ViT + EPIC, through the real script."""
    out = tmp_path / "backdoor"
    stdout = run_recipe("backdoor", out, *TINY, "--epic_save_embeddings")
    results = check_run(out, stdout, num_rows=200)
    spec = json.loads((out / "poison_spec.json").read_text())
    assert spec["attack"] == "badnets" and len(spec["poison_indices"]) == 10
    assert results["rows"][0]["num_poisons"] == 10
    assert (out / "epic_plots" / "epic_embeddings_pca.png").is_file()
    assert "trigger | type=patch" in ModelCard.load(out / "README.md").text


@pytest.mark.multiprocess
@pytest.mark.skipif(
    not FASHION_MNIST_FILES,
    reason="Debian's dataset-fashion-mnist is missing: `make install` installs it as root",
)
def test_finetune_recipe_on_fashion_mnist_caches_backbone_and_poisons(tmp_path: Path) -> None:
    """The main recipe on a Fashion-MNIST subset: both rows by default; backbone and poisons reused."""
    out = tmp_path / "finetune"
    args = [*TINY, "--backbone_epochs", "1", "--attack_steps", "3", "--max_train_rows", "300"]
    first = run_recipe("finetune_vit", out, *args)
    check_run(out, first, num_rows=100)  # two thirds of the rows are the clean source split
    assert "zalando-datasets/fashion_mnist: 300 training rows" in first
    assert "trained now" in first and "[cached]" not in first
    rows = json.loads((out / "recipe_results.json").read_text())["rows"]
    assert [r["run"] for r in rows] == ["EPIC-0.2", "no defense"] and rows[1]["rows_dropped"] == 0
    assert re.search(r"\| no defense \| [0-9.]+ \| [0-9.]+ \| 0 of 100", first)
    # the card names the base model and the real data set, and shows both runs
    card = ModelCard.load(out / "README.md").text
    assert "trained from scratch" not in card
    assert "fine-tuned version of a tiny `vit-p7` backbone trained for 1 epoch on 200 clean" in card
    assert "zalando-datasets/fashion_mnist" in card and "bullseye_polytope" in card
    assert re.search(r"\| EPIC-0.2 \| [0-9.]+ \| [0-9.]+ \| \d+ of 100 \| \d+ of 5 \|", card)
    assert re.search(r"\| no defense \| [0-9.]+ \| [0-9.]+ \| 0 of 100 \| 0 of 5 \|", card)
    second = run_recipe("finetune_vit", out, *args, "--compare_undefended", "false")
    assert "reused from the cache" in second and "[cached]" in second
    assert [r["run"] for r in json.loads((out / "recipe_results.json").read_text())["rows"]] == ["EPIC-0.2"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_backdoor_recipe_on_two_cpu_processes(tmp_path: Path) -> None:
    """The cpu_2proc accelerate config really starts two processes, and the recipe completes."""
    out = tmp_path / "ddp"
    accelerate = Path(sys.executable).parent / "accelerate"
    config = RECIPES / "accelerate_configs" / "cpu_2proc.yaml"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    launcher = [str(accelerate), "launch", "--config_file", str(config)]
    env_backup = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        stdout = run_recipe("backdoor", out, *TINY, "--per_device_train_batch_size", "16", launcher=launcher)
    finally:
        if env_backup is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES")
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = env_backup
    check_run(out, stdout, num_rows=200)
    assert stdout.count(" training =") == 1  # banners come from the main process only
    assert json.loads((out / "recipe_results.json").read_text())["world_size"] == 2


@pytest.mark.slow
@pytest.mark.multiprocess
def test_backdoor_recipe_epic_drops_most_poisons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the recipe is for, at its defaults (1.5-3 min on 2 CPU cores): undefended the trigger works,
    and EPIC removes most poisons, far above their share of the training set.

    Whether the attack success then falls is not asserted: with the 10-25 % of poisons that stay, it
    went from 100 % to 9 % in one run and stayed at 100 % in another (71 and 56 of 72 poisons dropped).
    Tiny runs (a few hundred rows, a few epochs) show neither: the backdoor often does not take hold."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny models: extra threads only contend (~20x slower here)
    out = tmp_path / "backdoor_effect"
    run_recipe("backdoor", out, "--compare_undefended")
    defended, undefended = json.loads((out / "recipe_results.json").read_text())["rows"]
    assert undefended["run"] == "no defense" and undefended["rows_dropped"] == 0
    assert undefended["attack_success_rate"] > 0.9
    assert defended["poisons_dropped"] >= 0.7 * defended["num_poisons"]
    poison_share = defended["num_poisons"] / defended["num_rows"]
    assert defended["poisons_dropped"] / defended["rows_dropped"] > 1.5 * poison_share
    assert defended["attack_success_rate"] <= undefended["attack_success_rate"]


def test_parsing_seeds_every_generator_from_the_seed_flag() -> None:
    """A recipe builds models and transforms before its Trainer: the parse seeds them, so --seed decides."""
    import torch

    module = load_recipe("transfer")
    draws = []
    for noise in (1, 2):
        torch.manual_seed(noise)  # whatever state the process starts in
        parse_recipe_args(module.SCRIPT_DEFAULTS, module.TRAINING_DEFAULTS, argv=["--seed", "7"])
        draws.append((torch.initial_seed(), torch.rand(3)))
    assert draws[0][0] == draws[1][0] == 7 and torch.equal(draws[0][1], draws[1][1])
