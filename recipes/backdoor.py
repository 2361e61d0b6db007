"""Train on a backdoored data set with EPIC, and measure how often the trigger still works.

Offline default: BadNets stamps a small patch on 5% of the plain digits training rows (taken from the
other classes) and relabels them as class 0; a tiny ResNet built from a config (timm) trains on them
from scratch for 40 epochs under EPIC-0.2 (rounds every 2 epochs from epoch 2). Commands (from the
repository root):

    # two CPU processes (DDP over gloo); single_gpu.yaml instead runs one process
    accelerate launch --config_file recipes/accelerate_configs/cpu_2proc.yaml \\
        recipes/backdoor.py --output_dir outputs/backdoor

    # Sleeper Agent (clean-label, hidden trigger) on every GPU, compared with undefended training
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml \\
        recipes/backdoor.py --output_dir outputs/sleeper_agent --attack sleeper_agent --compare_undefended

    # push the defended model, its card and plots to the Hub
    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml \\
        recipes/backdoor.py --output_dir outputs/backdoor \\
        --push_to_hub --hub_model_id <you>/digits-backdoor-epic

Attack success is the share of triggered test images (true class not the poison class) classified as
the poison class. Only backdoors are accepted here (``recipes/from_scratch.py`` takes targeted
attacks); ``--model_kind vit`` trains a tiny ViT. Every ``TrainingArguments`` flag and every
``--epic_*`` flag works here; ``python recipes/backdoor.py --help`` lists them.
"""

from __future__ import annotations

from hf_epic import experiments as ex

SCRIPT_DEFAULTS = {"model_kind": "cnn", "attack": "badnets", "poison_class": 0, "poison_budget": 0.05}
TRAINING_DEFAULTS = ex.training_defaults("outputs/backdoor", num_train_epochs=40, epic_start_epoch=2)


def main(argv: list[str] | None = None) -> None:
    """Run the recipe: parse, data, model, attack, train, evaluate, save and push."""
    timer = ex.Timer()
    # only backdoors here (recipes/from_scratch.py takes the targeted attacks)
    args, training_args = ex.parse_recipe_args(
        SCRIPT_DEFAULTS, TRAINING_DEFAULTS, argv, attack_kind="backdoor"
    )
    train_rows, test, id2label = ex.load_task(args, training_args.seed)
    model = ex.new_model(args, id2label)
    poisoned, spec = ex.poison_training_set(args, training_args, train_rows, test)
    trainer = ex.train(ex.make_trainer(model, training_args, args, poisoned, test))
    rows = ex.evaluate_runs(trainer, args, poisoned, test, spec, lambda: ex.model_for(args, id2label))
    ex.finish(trainer, args, spec, rows, timer)


if __name__ == "__main__":
    main()
