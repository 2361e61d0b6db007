"""Fine-tune a pretrained Vision Transformer on a poisoned data set, with EPIC. The main recipe.

Offline default (no download): half of the plain digits training rows stay clean and train a tiny ViT
backbone built from a config for 100 epochs (cached in ``<output_dir>/_backbone`` and reused by later
runs); the other half is poisoned (8% of its rows) by gradient matching against ten test images,
crafted on that backbone (the attacker knows the public pretrained weights), and the whole ViT is
fine-tuned on it for 20 epochs with a new head, under EPIC in the paper's fine-tuning setting (subset
fraction 0.6 from epoch 5, every epoch). The run ends with clean accuracy, attack success and what EPIC
dropped, and writes a model card with plots. Full fine-tuning washes out much of a poison crafted on
the backbone, so compare with ``--compare_undefended`` over several seeds before reading one run.
Every ``TrainingArguments`` flag and every ``--epic_*`` flag works here; ``--help`` lists them.
Commands (from the repository root):

    # one process (CPU, or one GPU)
    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml \\
        recipes/finetune_vit.py --output_dir outputs/finetune_vit

    # two CPU processes (DDP over gloo)
    accelerate launch --config_file recipes/accelerate_configs/cpu_2proc.yaml \\
        recipes/finetune_vit.py --output_dir outputs/finetune_vit_ddp

    # real pretrained weights (needs the internet): ViT-B/16 from ImageNet-21k, at 224 pixels
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml \\
        recipes/finetune_vit.py --output_dir outputs/vit_b16_digits \\
        --model_name_or_path google/vit-base-patch16-224-in21k --image_size 224 \\
        --learning_rate 1e-4 --per_device_train_batch_size 32 --num_train_epochs 10

    # compare with undefended fine-tuning, and push the defended model, card and plots
    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml \\
        recipes/finetune_vit.py --output_dir outputs/finetune_vit --compare_undefended \\
        --push_to_hub --hub_model_id <you>/vit-digits-epic
"""

from __future__ import annotations

from hf_epic.experiments import (
    COMMON_TRAINING_DEFAULTS,
    Timer,
    attacker_model,
    backbone_and_task_split,
    banner,
    dataset_label,
    describe_poisons,
    evaluate_run,
    is_main_process,
    load_task,
    make_trainer,
    parse_recipe_args,
    poison_training_set,
    pretrained_copy,
    print_table,
    save_and_push,
    shutdown_distributed,
    train,
    undefended_args,
)

SCRIPT_DEFAULTS = {
    "attack": "gradient_matching",
    "poison_budget": 0.08,
    "num_targets": 10,
    "attack_steps": 250,
    "attack_restarts": 4,
    "backbone_epochs": 100,
}
TRAINING_DEFAULTS = {
    **COMMON_TRAINING_DEFAULTS,
    "output_dir": "outputs/finetune_vit",
    "num_train_epochs": 20,
    "learning_rate": 1e-3,
    "weight_decay": 0.05,
    "warmup_steps": 0.05,
    "epic_fraction": 0.6,
    "epic_start_epoch": 5,
    "epic_interval": 1,
}


def main(argv: list[str] | None = None) -> None:
    """Run the recipe."""
    timer = Timer()
    args, training_args = parse_recipe_args(SCRIPT_DEFAULTS, TRAINING_DEFAULTS, argv)
    seed, offline = training_args.seed, not args.model_name_or_path

    banner("data")
    train_rows, test, id2label = load_task(args, seed)

    banner("model")
    backbone, source, task, key = backbone_and_task_split("vit", args, training_args, train_rows, id2label)

    banner("attack")
    # White-box on the pretrained weights (the attacker knows the public backbone).
    surrogate = attacker_model(args, backbone)
    poisoned, spec, reused = poison_training_set(args, training_args, task, test, surrogate, key)
    print(describe_poisons(spec, len(poisoned), reused))

    banner("training")
    model = pretrained_copy(source, id2label, seed, new_head=offline)
    trainer = train(make_trainer(model, training_args, args, poisoned, test))

    banner("evaluation")
    rows = [evaluate_run(f"EPIC-{training_args.epic_fraction}", trainer, args, test, spec)]
    if args.compare_undefended:
        plain = pretrained_copy(source, id2label, seed, new_head=offline)
        baseline = make_trainer(plain, undefended_args(training_args), args, poisoned, test)
        rows.append(evaluate_run("no defense", train(baseline), args, test, spec))

    banner("save and push")
    save_and_push(trainer, training_args, args, spec, rows, dataset_label(args))
    if is_main_process():
        print_table(rows, timer())


if __name__ == "__main__":
    main()
    shutdown_distributed()
