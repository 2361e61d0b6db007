"""Train an image classifier from scratch on a poisoned training set, with EPIC.

The offline default poisons the plain digits (16x16, grayscale) by gradient matching (Witches' Brew)
against one test image; the attacker trains its own surrogate on the clean rows. A tiny ViT built from
a config trains on the poisoned set for 12 epochs under EPIC-0.2 (rounds every 2 epochs from epoch 4),
and the run ends with clean accuracy, attack success and what EPIC dropped. Commands (from the
repository root):

    # one process (CPU, or one GPU); recipes/accelerate_configs/cpu_2proc.yaml runs two CPU processes
    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml \\
        recipes/from_scratch.py --output_dir outputs/from_scratch

    # every GPU of the machine, a ResNet, EPIC-0.3, and the undefended run for comparison
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml \\
        recipes/from_scratch.py --output_dir outputs/from_scratch --model_kind cnn \\
        --epic_fraction 0.3 --compare_undefended

    # push the defended model, its card and plots to the Hub
    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml \\
        recipes/from_scratch.py --output_dir outputs/from_scratch \\
        --push_to_hub --hub_model_id <you>/digits-from-scratch-epic

``--digits_variant hard`` renders the digits in colour on textured backgrounds (use ``--model_kind cnn``
and more epochs there). Every ``TrainingArguments`` flag and every ``--epic_*`` flag of
``hf_epic.EpicConfig`` works here; ``python recipes/from_scratch.py --help`` lists them.
"""

from __future__ import annotations

from hf_epic import experiments as ex

SCRIPT_DEFAULTS = {"attack": "gradient_matching"}
TRAINING_DEFAULTS = ex.training_defaults("outputs/from_scratch", num_train_epochs=12, epic_start_epoch=4)


def main(argv: list[str] | None = None) -> None:
    """Run the recipe: parse, data, attack, model, train, evaluate, save and push."""
    timer = ex.Timer()
    args, training_args = ex.parse_recipe_args(SCRIPT_DEFAULTS, TRAINING_DEFAULTS, argv)
    train_rows, test, id2label = ex.load_task(args, training_args.seed)
    # The attacker trains its own surrogate on the clean rows (it does not know the victim's model).
    poisoned, spec = ex.poison_training_set(args, training_args, train_rows, test)
    model = ex.new_model(args, id2label)
    trainer = ex.train(ex.make_trainer(model, training_args, args, poisoned, test))
    rows = ex.evaluate_runs(trainer, args, poisoned, test, spec, lambda: ex.model_for(args, id2label))
    ex.finish(trainer, args, spec, rows, timer)


if __name__ == "__main__":
    main()
