"""Train an image classifier from scratch on a poisoned training set, with EPIC.

The offline default poisons the digits training split with a gradient-matching (Witches' Brew)
attack against one test image, trains a tiny ViT built from a config with EPIC, and prints clean
accuracy, attack success and what EPIC dropped. Commands (run from the repository root):

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

The default data set is scikit-learn's digits (``--digits_variant plain``), on which the tiny ViT
trains within minutes on a CPU; ``--digits_variant hard`` renders them in colour on textured
backgrounds (much harder: use ``--model_kind cnn`` and more epochs there).

Every ``TrainingArguments`` flag and every ``--epic_*`` flag of ``hf_epic.EpicConfig`` works here;
``python recipes/from_scratch.py --help`` lists them.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
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

SCRIPT_DEFAULTS = {"digits_variant": "plain", "image_size": 16, "attack": "gradient_matching"}
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


def main() -> None:
    """Run the recipe."""
    timer = Timer()
    a, training_args = parse_args(SCRIPT_DEFAULTS, TRAINING_DEFAULTS)

    banner("data")
    splits = load_data(a, seed=training_args.seed)
    train, test = splits["train"], splits["test"]
    id2label = label_names(train)
    print(f"{dataset_label(a)}: {len(train)} training rows, {len(test)} test rows, {len(id2label)} classes")

    banner("attack")
    # The attacker trains its own surrogate on the clean rows (it does not know the victim's model).
    poisoned, spec, reused = poisoned_training_set(a, training_args, train, test)
    if spec is not None:
        print(
            f"{spec.attack}: {len(spec.poison_indices)} poisons in class {spec.poison_class}, "
            f"targets {spec.target_indices} (class {spec.target_class})" + (" [cached]" if reused else "")
        )

    banner("model")
    if a.model_name_or_path:
        model = load_pretrained(a.model_name_or_path, id2label)
    else:
        model = build_model(a.model_kind, a, id2label)
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
        fresh = load_pretrained(a.model_name_or_path, id2label) if a.model_name_or_path else None
        fresh = fresh or build_model(a.model_kind, a, id2label)
        baseline = make_trainer(fresh, undefended_args(training_args), a, poisoned, test)
        baseline.train()
        rows.append(summary_row("no defense", baseline, evaluate_run(baseline, a, test, spec), spec))

    banner("save and push")
    save_and_push(trainer, training_args, a, spec, rows, a.model_name_or_path, dataset_label(a))
    if is_main_process():
        print_table(rows, timer())


if __name__ == "__main__":
    main()
    shutdown_distributed()
