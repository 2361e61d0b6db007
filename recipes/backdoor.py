"""Train on a backdoored data set with EPIC, and measure how often the trigger still works.

Offline default: BadNets stamps a small patch on 5% of the digits training rows (taken from the
other classes) and relabels them as the poison class; a tiny ResNet built from a config (timm,
``--model_kind cnn``) is trained from scratch on them for 40 epochs under EPIC-0.2 (rounds every
2 epochs from epoch 2). About 30 s on 2 CPU cores with ``--compare_undefended``. Measured here
in four runs (seeds 0, 0, 1, 2): undefended, the trigger works on 100% of triggered test images at
0.989-0.997 clean accuracy; with EPIC-0.2 on 0.0-4.6%, with 60-71 of the 72 poisons dropped, at
0.947-0.972 clean accuracy. Attack success is the share of triggered test images (true class
not the poison class) that the model classifies as the poison class. ``--attack sleeper_agent``
uses the clean-label hidden-trigger backdoor instead (slower: it retrains its surrogate).
Commands (from the repository root):

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

The default data set is scikit-learn's digits (``--digits_variant plain``); ``--model_kind vit``
trains a tiny ViT instead; ``--digits_variant hard`` renders the digits in colour on textured
backgrounds (much harder: use more epochs there).

Every ``TrainingArguments`` flag and every ``--epic_*`` flag of ``hf_epic.EpicConfig`` works here;
``python recipes/backdoor.py --help`` lists them.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    BACKDOOR_ATTACKS,
    COMMON_TRAINING_DEFAULTS,
    Timer,
    banner,
    build_model,
    dataset_label,
    evaluate_run,
    is_main_process,
    label_names,
    load_data,
    load_pretrained,
    make_trainer,
    parse_args,
    poisoned_training_set,
    print_table,
    save_and_push,
    shutdown_distributed,
    summary_row,
    undefended_args,
)

SCRIPT_DEFAULTS = {
    "digits_variant": "plain",
    "image_size": 16,
    "model_kind": "cnn",
    "attack": "badnets",
    "poison_class": 0,
    "poison_budget": 0.05,
}
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


def new_model(a, id2label: dict[int, str]):
    """The model to train: the given pretrained one, or a tiny model built from a config.

    Args:
        a: Script arguments.
        id2label: Class names.
    """
    if a.model_name_or_path:
        return load_pretrained(a.model_name_or_path, id2label)
    return build_model(a.model_kind, a, id2label)


def main() -> None:
    """Run the recipe."""
    timer = Timer()
    a, training_args = parse_args(SCRIPT_DEFAULTS, TRAINING_DEFAULTS)
    if a.attack not in BACKDOOR_ATTACKS:
        raise ValueError(
            f"--attack {a.attack} is not a backdoor; use {' or '.join(BACKDOOR_ATTACKS)} here, or "
            "recipes/from_scratch.py for targeted attacks."
        )

    banner("data")
    splits = load_data(a, seed=training_args.seed)
    train, test = splits["train"], splits["test"]
    id2label = label_names(train)
    print(f"{dataset_label(a)}: {len(train)} training rows, {len(test)} test rows, {len(id2label)} classes")

    banner("attack")
    poisoned, spec, reused = poisoned_training_set(a, training_args, train, test)
    trigger = spec.trigger or {}
    print(
        f"{spec.attack}: {len(spec.poison_indices)} poisoned rows labelled {spec.poison_class}, "
        f"trigger {trigger.get('size', '?')} px at {trigger.get('location', '?')}"
        + (" [cached]" if reused else "")
    )

    banner("model")
    model = new_model(a, id2label)
    print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} parameters")

    banner("training")
    trainer = make_trainer(model, training_args, a, poisoned, test)
    trainer.train()
    state = trainer.epic_state
    print(f"EPIC: {len(state.rounds)} rounds, {state.num_dropped} of {state.num_rows} rows dropped")

    banner("evaluation")
    metrics = evaluate_run(trainer, a, test, spec)
    rows = [summary_row(f"EPIC-{training_args.epic_fraction}", trainer, metrics, spec)]
    if a.compare_undefended:
        baseline = make_trainer(new_model(a, id2label), undefended_args(training_args), a, poisoned, test)
        baseline.train()
        rows.append(summary_row("no defense", baseline, evaluate_run(baseline, a, test, spec), spec))

    banner("save and push")
    save_and_push(trainer, training_args, a, spec, rows, a.model_name_or_path, dataset_label(a))
    if is_main_process():
        print_table(rows, timer())


if __name__ == "__main__":
    main()
    shutdown_distributed()
