"""Transfer learning on a poisoned data set: a frozen pretrained backbone, a new linear head, EPIC.

This is the setting of feature-space attacks (Bullseye Polytope, Feature Collision): the victim
trains only a linear classifier on top of public, frozen features, and the poisons are crafted
on those features. Offline default (no download): half of the digits training rows stay clean and
train a tiny ViT backbone built from a config (cached in ``<output_dir>/_backbone`` and reused);
the other half is poisoned, the backbone is frozen, and a fresh linear head is trained on the
poisoned rows under EPIC. Commands (from the repository root):

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

The default data set is scikit-learn's digits (``--digits_variant plain``), on which the tiny ViT
trains within minutes on a CPU; ``--digits_variant hard`` renders them in colour on textured
backgrounds (much harder: the tiny ViT barely learns it in a few epochs).

Every ``TrainingArguments`` flag and every ``--epic_*`` flag of ``hf_epic.EpicConfig`` works here;
``python recipes/transfer.py --help`` lists them.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    COMMON_TRAINING_DEFAULTS,
    FEATURE_ATTACKS,
    Timer,
    backbone_and_task_split,
    banner,
    dataset_label,
    evaluate_run,
    freeze_all_but_head,
    is_main_process,
    label_names,
    load_data,
    load_pretrained,
    make_trainer,
    parse_args,
    poisoned_training_set,
    print_table,
    reset_head,
    save_and_push,
    shutdown_distributed,
    summary_row,
    undefended_args,
)

SCRIPT_DEFAULTS = {
    "digits_variant": "plain",
    "image_size": 16,
    "attack": "gradient_matching",
    "poison_budget": 0.02,
    "source_fraction": 0.5,
    "backbone_epochs": 20,
}
TRAINING_DEFAULTS = {
    **COMMON_TRAINING_DEFAULTS,
    "output_dir": "outputs/transfer",
    "num_train_epochs": 10,
    "learning_rate": 1e-2,
    "weight_decay": 0.0,
    # the reference's transfer setting: EPIC-0.2 every epoch from the first, early rounds only
    "epic_fraction": 0.2,
    "epic_start_epoch": 1,
    "epic_interval": 1,
    "epic_stop_epoch": 6,
}


def linear_probe(source: str, id2label: dict[int, str], seed: int, offline: bool):
    """The frozen backbone with a fresh, trainable linear head.

    Args:
        source: Hub id, timm name or the cached backbone's folder.
        id2label: Class names.
        seed: Seed of the new head.
        offline: True for the cached backbone, whose trained head is re-initialised.
    """
    model = load_pretrained(source, id2label)
    if offline:
        reset_head(model, seed)
    trainable = freeze_all_but_head(model)
    print(f"{type(model).__name__}: backbone frozen, {trainable:,} trainable parameters in the head")
    return model


def main() -> None:
    """Run the recipe."""
    timer = Timer()
    a, training_args = parse_args(SCRIPT_DEFAULTS, TRAINING_DEFAULTS)

    banner("data")
    splits = load_data(a, seed=training_args.seed)
    train, test = splits["train"], splits["test"]
    id2label = label_names(train)
    print(f"{dataset_label(a)}: {len(train)} training rows, {len(test)} test rows, {len(id2label)} classes")

    banner("model")
    backbone, source, task, key = backbone_and_task_split(a.model_kind, a, training_args, train, id2label)
    offline = not a.model_name_or_path

    banner("attack")
    # The attacker knows the public frozen backbone and crafts the poisons on it.
    surrogate = backbone if offline or a.attack in FEATURE_ATTACKS else None
    poisoned, spec, reused = poisoned_training_set(a, training_args, task, test, surrogate, key)
    if spec is not None:
        print(
            f"{spec.attack}: {len(spec.poison_indices)} poisons of {len(poisoned)} rows in class "
            f"{spec.poison_class}, targets {spec.target_indices} (class {spec.target_class})"
            + (" [cached]" if reused else "")
        )

    banner("training")
    # No augmentation: a linear probe on fixed features, as in the transfer-learning benchmarks.
    trainer = make_trainer(
        linear_probe(source, id2label, training_args.seed, offline),
        training_args,
        a,
        poisoned,
        test,
        augment=False,
    )
    trainer.train()
    state = trainer.epic_state
    print(f"EPIC: {len(state.rounds)} rounds, {state.num_dropped} of {state.num_rows} rows dropped")

    banner("evaluation")
    metrics = evaluate_run(trainer, a, test, spec)
    rows = [summary_row(f"EPIC-{training_args.epic_fraction}", trainer, metrics, spec)]
    if a.compare_undefended:
        plain = linear_probe(source, id2label, training_args.seed, offline)
        baseline = make_trainer(plain, undefended_args(training_args), a, poisoned, test, augment=False)
        baseline.train()
        rows.append(summary_row("no defense", baseline, evaluate_run(baseline, a, test, spec), spec))

    banner("save and push")
    save_and_push(trainer, training_args, a, spec, rows, a.model_name_or_path, dataset_label(a))
    if is_main_process():
        print_table(rows, timer())


if __name__ == "__main__":
    main()
    shutdown_distributed()
