"""Train on a backdoored data set with EPIC, and measure how often the trigger still works.

Offline default: BadNets stamps a small patch on 5% of the plain digits training rows (taken from the
other classes) and relabels them as class 0; a tiny ResNet built from a config (timm, ``--model_kind
cnn``) trains on them from scratch for 40 epochs under EPIC-0.2 (rounds every 2 epochs from epoch 2).
Attack success is the share of triggered test images (true class not the poison class) classified as
the poison class. ``--attack sleeper_agent`` uses the clean-label hidden-trigger backdoor instead (it
trains its own surrogate); ``--model_kind vit`` trains a tiny ViT. Every ``TrainingArguments`` flag and
every ``--epic_*`` flag works here; ``python recipes/backdoor.py --help`` lists them. Commands (from the
repository root):

    # one process (CPU, or one GPU)
    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml \\
        recipes/backdoor.py --output_dir outputs/backdoor

    # two CPU processes (DDP over gloo)
    accelerate launch --config_file recipes/accelerate_configs/cpu_2proc.yaml \\
        recipes/backdoor.py --output_dir outputs/backdoor_ddp

    # Sleeper Agent on every GPU, compared with undefended training
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml \\
        recipes/backdoor.py --output_dir outputs/sleeper_agent --attack sleeper_agent \\
        --compare_undefended

    # push the defended model, its card and plots to the Hub
    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml \\
        recipes/backdoor.py --output_dir outputs/backdoor \\
        --push_to_hub --hub_model_id <you>/digits-backdoor-epic
"""

from __future__ import annotations

from hf_epic.attacks import attack_names
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

SCRIPT_DEFAULTS = {"model_kind": "cnn", "attack": "badnets", "poison_class": 0, "poison_budget": 0.05}
TRAINING_DEFAULTS = {
    **COMMON_TRAINING_DEFAULTS,
    "output_dir": "outputs/backdoor",
    "num_train_epochs": 40,
    "learning_rate": 3e-3,
    "weight_decay": 0.05,
    "warmup_steps": 0.05,
    "epic_fraction": 0.2,
    "epic_start_epoch": 2,
    "epic_interval": 2,
}


def main(argv: list[str] | None = None) -> None:
    """Run the recipe."""
    timer = Timer()
    args, training_args = parse_recipe_args(SCRIPT_DEFAULTS, TRAINING_DEFAULTS, argv)
    if args.attack not in attack_names("backdoor"):
        raise ValueError(
            f"--attack {args.attack} is not a backdoor; use one of {', '.join(attack_names('backdoor'))} "
            "here, or recipes/from_scratch.py for targeted attacks."
        )

    banner("data")
    train_rows, test, id2label = load_task(args, training_args.seed)

    banner("attack")
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
