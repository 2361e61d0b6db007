"""Transfer learning on a poisoned data set: a frozen pretrained backbone, a new linear head, EPIC.

This is the setting of feature-space attacks (Bullseye Polytope, Feature Collision): the victim trains
only a linear classifier on top of public, frozen features, and the poisons are crafted on those
features. Offline default (no download): half of the plain digits training rows stay clean and train a
tiny ViT backbone built from a config (cached in ``<output_dir>/_backbone`` and reused); the other half
is poisoned (2% of its rows, gradient matching on the backbone), the backbone is frozen, and a fresh
linear head is trained on the poisoned rows under EPIC-0.2 in the reference's transfer setting (every
epoch from the first, no round after epoch 6). Commands (from the repository root):

    # two CPU processes (DDP over gloo); single_gpu.yaml instead runs one process
    accelerate launch --config_file recipes/accelerate_configs/cpu_2proc.yaml \\
        recipes/transfer.py --output_dir outputs/transfer

    # real pretrained features (needs the internet), Bullseye Polytope poisons
    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml \\
        recipes/transfer.py --output_dir outputs/transfer_vit_b16 --attack bullseye_polytope \\
        --model_name_or_path google/vit-base-patch16-224-in21k --image_size 224

    # compare with the undefended linear probe, and push the result
    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml \\
        recipes/transfer.py --output_dir outputs/transfer --compare_undefended \\
        --push_to_hub --hub_model_id <you>/digits-linear-probe-epic

``--digits_variant hard`` renders the digits in colour on textured backgrounds (much harder: the tiny
ViT barely learns it in a few epochs). Every ``TrainingArguments`` flag and every ``--epic_*`` flag
works here; ``python recipes/transfer.py --help`` lists them.
"""

from __future__ import annotations

from hf_epic import experiments as ex

SCRIPT_DEFAULTS = {"poison_budget": 0.02, "backbone_epochs": 20}
# the reference's transfer setting: EPIC-0.2 every epoch from the first, no round after epoch 6
TRAINING_DEFAULTS = ex.training_defaults(
    "outputs/transfer", num_train_epochs=10, learning_rate=1e-2, weight_decay=0.0, warmup_steps=0,
    epic_start_epoch=1, epic_interval=1, epic_stop_epoch=6,
)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Run the recipe: parse, data, backbone, attack, linear probe, evaluate, save and push."""
    timer = ex.Timer()
    args, training_args = ex.parse_recipe_args(SCRIPT_DEFAULTS, TRAINING_DEFAULTS, argv)
    seed, offline = training_args.seed, not args.model_name_or_path
    train_rows, test, id2label = ex.load_task(args, seed)
    backbone, source, task, key = ex.backbone_and_task_split(
        args.model_kind, args, training_args, train_rows, id2label
    )
    # The attacker knows the public frozen backbone and crafts the poisons on it.
    poisoned, spec = ex.poison_training_set(
        args, training_args, task, test, ex.attacker_model(args, backbone), key
    )

    def linear_probe():
        """The frozen backbone with a fresh, trainable linear head."""
        model = ex.pretrained_copy(source, id2label, seed, new_head=offline)
        trainable = ex.freeze_all_but_head(model)
        print(f"{type(model).__name__}: backbone frozen, {trainable:,} trainable parameters in the head")
        return model

    # No augmentation: a linear probe on fixed features, as in the transfer-learning benchmarks.
    trainer = ex.train(ex.make_trainer(linear_probe(), training_args, args, poisoned, test, augment=False))
    rows = ex.evaluate_runs(trainer, args, poisoned, test, spec, linear_probe, augment=False)
    ex.finish(trainer, args, spec, rows, timer, ex.backbone_description(args, key))


if __name__ == "__main__":
    main()
