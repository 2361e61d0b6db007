"""Transfer learning on a poisoned data set: a frozen pretrained backbone, a new linear head, EPIC.

This is the setting of feature-space attacks (Bullseye Polytope, Feature Collision): the victim trains
only a linear classifier on top of public, frozen features, and the poisons are crafted on those
features. Offline default (no download): half of the plain digits training rows stay clean and train a
tiny ViT backbone built from a config (cached in ``<output_dir>/_backbone`` and reused); the other half
is poisoned (2% of its rows, gradient matching on the backbone), the backbone is frozen, and a fresh
linear head is trained on the poisoned rows under EPIC-0.2 in the reference's transfer setting (every
epoch from the first, no round after epoch 6). Every ``TrainingArguments`` flag and every ``--epic_*``
flag works here; ``python recipes/transfer.py --help`` lists them. Commands (from the repository root):

    # one process (CPU, or one GPU)
    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml \\
        recipes/transfer.py --output_dir outputs/transfer

    # two CPU processes (DDP over gloo)
    accelerate launch --config_file recipes/accelerate_configs/cpu_2proc.yaml \\
        recipes/transfer.py --output_dir outputs/transfer_ddp

    # real pretrained features (needs the internet), Bullseye Polytope poisons
    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml \\
        recipes/transfer.py --output_dir outputs/transfer_vit_b16 \\
        --model_name_or_path google/vit-base-patch16-224-in21k --image_size 224 \\
        --attack bullseye_polytope --per_device_train_batch_size 64

    # compare with the undefended linear probe, and push the result
    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml \\
        recipes/transfer.py --output_dir outputs/transfer --compare_undefended \\
        --push_to_hub --hub_model_id <you>/digits-linear-probe-epic
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
    freeze_all_but_head,
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

SCRIPT_DEFAULTS = {"attack": "gradient_matching", "poison_budget": 0.02, "backbone_epochs": 20}
TRAINING_DEFAULTS = {
    **COMMON_TRAINING_DEFAULTS,
    "output_dir": "outputs/transfer",
    "num_train_epochs": 10,
    "learning_rate": 1e-2,
    "weight_decay": 0.0,
    "epic_fraction": 0.2,
    "epic_start_epoch": 1,
    "epic_interval": 1,
    "epic_stop_epoch": 6,
}


def linear_probe(source: str, id2label: dict[int, str], seed: int, offline: bool):
    """The frozen backbone with a fresh, trainable linear head."""
    model = pretrained_copy(source, id2label, seed, new_head=offline)
    trainable = freeze_all_but_head(model)
    print(f"{type(model).__name__}: backbone frozen, {trainable:,} trainable parameters in the head")
    return model


def main(argv: list[str] | None = None) -> None:
    """Run the recipe."""
    timer = Timer()
    args, training_args = parse_recipe_args(SCRIPT_DEFAULTS, TRAINING_DEFAULTS, argv)
    seed, offline = training_args.seed, not args.model_name_or_path

    banner("data")
    train_rows, test, id2label = load_task(args, seed)

    banner("model")
    backbone, source, task, key = backbone_and_task_split(
        args.model_kind, args, training_args, train_rows, id2label
    )

    banner("attack")
    # The attacker knows the public frozen backbone and crafts the poisons on it.
    surrogate = attacker_model(args, backbone)
    poisoned, spec, reused = poison_training_set(args, training_args, task, test, surrogate, key)
    print(describe_poisons(spec, len(poisoned), reused))

    banner("training")
    # No augmentation: a linear probe on fixed features, as in the transfer-learning benchmarks.
    model = linear_probe(source, id2label, seed, offline)
    trainer = train(make_trainer(model, training_args, args, poisoned, test, augment=False))

    banner("evaluation")
    rows = [evaluate_run(f"EPIC-{training_args.epic_fraction}", trainer, args, test, spec)]
    if args.compare_undefended:
        plain = linear_probe(source, id2label, seed, offline)
        baseline = make_trainer(plain, undefended_args(training_args), args, poisoned, test, augment=False)
        rows.append(evaluate_run("no defense", train(baseline), args, test, spec))

    banner("save and push")
    save_and_push(trainer, training_args, args, spec, rows, dataset_label(args))
    if is_main_process():
        print_table(rows, timer())


if __name__ == "__main__":
    main()
    shutdown_distributed()
