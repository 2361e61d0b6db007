"""Fine-tune a pretrained Vision Transformer on a poisoned data set, with EPIC. The main recipe.

Offline default (no download): half of the plain digits training rows stay clean and train a tiny ViT
backbone built from a config for 100 epochs (cached in ``<output_dir>/_backbone`` and reused by later
runs); the other half is poisoned (8% of its rows) by gradient matching against ten test images,
crafted on that backbone (the attacker knows the public pretrained weights), and the whole ViT is
fine-tuned on it for 20 epochs with a new head, under EPIC in the paper's fine-tuning setting (subset
fraction 0.6 from epoch 5, every epoch). The run ends with clean accuracy, attack success and what EPIC
dropped, and writes a model card with plots. Commands (from the repository root):

    # one process (CPU, or one GPU); recipes/accelerate_configs/cpu_2proc.yaml runs two CPU processes
    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml \\
        recipes/finetune_vit.py --output_dir outputs/finetune_vit

    # real pretrained weights (needs the internet): ViT-B/16 from ImageNet-21k, at 224 pixels
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml \\
        recipes/finetune_vit.py --output_dir outputs/vit_b16_digits \\
        --model_name_or_path google/vit-base-patch16-224-in21k --image_size 224 \\
        --learning_rate 1e-4 --per_device_train_batch_size 32 --num_train_epochs 10

    # compare with undefended fine-tuning, and push the defended model, card and plots
    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml \\
        recipes/finetune_vit.py --output_dir outputs/finetune_vit --compare_undefended \\
        --push_to_hub --hub_model_id <you>/vit-digits-epic

Full fine-tuning washes out much of a poison crafted on the backbone, so compare with
``--compare_undefended`` over several seeds before reading one run. Every ``TrainingArguments`` flag
and every ``--epic_*`` flag works here; ``python recipes/finetune_vit.py --help`` lists them.
"""

from __future__ import annotations

from hf_epic import experiments as ex

ATTACK_DEFAULTS = {"poison_budget": 0.08, "num_targets": 10, "attack_steps": 250, "attack_restarts": 4}
SCRIPT_DEFAULTS = {**ATTACK_DEFAULTS, "backbone_epochs": 100}
# the EPIC paper's fine-tuning setting: subset fraction 0.6, from epoch 5, every epoch
EPIC_DEFAULTS = {"epic_fraction": 0.6, "epic_start_epoch": 5, "epic_interval": 1}
TRAINING_DEFAULTS = ex.training_defaults(
    "outputs/finetune_vit", num_train_epochs=20, learning_rate=1e-3, **EPIC_DEFAULTS
)


def main(argv: list[str] | None = None) -> None:
    """Run the recipe: parse, data, backbone, attack, fine-tune, evaluate, save and push."""
    timer = ex.Timer()
    args, training_args = ex.parse_recipe_args(SCRIPT_DEFAULTS, TRAINING_DEFAULTS, argv)
    seed, offline = training_args.seed, not args.model_name_or_path
    train_rows, test, id2label = ex.load_task(args, seed)
    backbone, source, task, key = ex.backbone_and_task_split("vit", args, training_args, train_rows, id2label)
    # White-box on the pretrained weights (the attacker knows the public backbone).
    surrogate = ex.attacker_model(args, backbone)
    poisoned, spec = ex.poison_training_set(args, training_args, task, test, surrogate, key)

    def fresh_vit():
        """The backbone with a new head (the offline backbone's trained head is re-initialised)."""
        return ex.pretrained_copy(source, id2label, seed, new_head=offline)

    trainer = ex.train(ex.make_trainer(fresh_vit(), training_args, args, poisoned, test))
    rows = ex.evaluate_runs(trainer, args, poisoned, test, spec, undefended_model=fresh_vit)
    ex.finish(trainer, args, spec, rows, timer)


if __name__ == "__main__":
    main()
