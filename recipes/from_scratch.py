"""Train an image classifier from scratch on a poisoned training set, with EPIC.

The offline default poisons the plain digits (16x16, grayscale) by gradient matching (Witches' Brew)
against one test image; the attacker trains its own surrogate on the clean rows. A tiny ViT built from
a config trains on the poisoned set under EPIC-0.2 (rounds every 2 epochs from epoch 4), and the run
ends with clean accuracy, attack success and what EPIC dropped. ``--digits_variant hard`` renders the
digits in colour on textured backgrounds (use ``--model_kind cnn`` and more epochs there). Every
``TrainingArguments`` flag and every ``--epic_*`` flag of ``hf_epic.EpicConfig`` works here;
``python recipes/from_scratch.py --help`` lists them. Commands (from the repository root):

    # one process (CPU, or one GPU)
    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml \\
        recipes/from_scratch.py --output_dir outputs/from_scratch

    # two CPU processes (DDP over gloo)
    accelerate launch --config_file recipes/accelerate_configs/cpu_2proc.yaml \\
        recipes/from_scratch.py --output_dir outputs/from_scratch_ddp

    # every GPU of the machine, a ResNet, EPIC-0.3, and the undefended run for comparison
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml \\
        recipes/from_scratch.py --output_dir outputs/from_scratch --model_kind cnn \\
        --epic_fraction 0.3 --compare_undefended

    # push the defended model, its card and plots to the Hub
    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml \\
        recipes/from_scratch.py --output_dir outputs/from_scratch \\
        --push_to_hub --hub_model_id <you>/digits-from-scratch-epic
"""

from __future__ import annotations

from hf_epic.experiments import (
    COMMON_TRAINING_DEFAULTS,
    Timer,
    banner,
    dataset_label,
    describe_poisons,
    evaluate_run,
    is_main_process,
    load_task,
    make_trainer,
    model_for,
    parse_recipe_args,
    poison_training_set,
    print_table,
    save_and_push,
    shutdown_distributed,
    train,
    undefended_args,
)

SCRIPT_DEFAULTS = {"attack": "gradient_matching"}
TRAINING_DEFAULTS = {
    **COMMON_TRAINING_DEFAULTS,
    "output_dir": "outputs/from_scratch",
    "num_train_epochs": 12,
    "learning_rate": 3e-3,
    "weight_decay": 0.05,
    "warmup_steps": 0.05,
    "epic_fraction": 0.2,
    "epic_start_epoch": 4,
    "epic_interval": 2,
}


def main(argv: list[str] | None = None) -> None:
    """Run the recipe."""
    timer = Timer()
    args, training_args = parse_recipe_args(SCRIPT_DEFAULTS, TRAINING_DEFAULTS, argv)

    banner("data")
    train_rows, test, id2label = load_task(args, training_args.seed)

    banner("attack")
    # The attacker trains its own surrogate on the clean rows (it does not know the victim's model).
    poisoned, spec, reused = poison_training_set(args, training_args, train_rows, test)
    print(describe_poisons(spec, len(poisoned), reused))

    banner("model")
    model = model_for(args, id2label)
    print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} parameters")

    banner("training")
    trainer = train(make_trainer(model, training_args, args, poisoned, test))

    banner("evaluation")
    rows = [evaluate_run(f"EPIC-{training_args.epic_fraction}", trainer, args, test, spec)]
    if args.compare_undefended:
        plain = make_trainer(model_for(args, id2label), undefended_args(training_args), args, poisoned, test)
        rows.append(evaluate_run("no defense", train(plain), args, test, spec))

    banner("save and push")
    save_and_push(trainer, training_args, args, spec, rows, dataset_label(args))
    if is_main_process():
        print_table(rows, timer())


if __name__ == "__main__":
    main()
    shutdown_distributed()
