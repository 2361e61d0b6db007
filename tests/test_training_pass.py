"""Embeddings recorded from the training forward pass (``epic_embedding_source="training_pass"``)."""

from __future__ import annotations

import pytest
import torch
from conftest import RecordingCollator, make_config, small_digits, tiny_cnn, tiny_vit, with_pixels

from hf_epic.embeddings import compute_gradient_embeddings
from hf_epic.epic_callback import EpicCallback
from hf_epic.epic_trainer import EpicTrainer

ROWS = 160


def _train(tmp_path, model=None, rows: int = ROWS, **overrides):
    settings = {
        "num_train_epochs": 3,
        "per_device_train_batch_size": 32,
        "epic_embedding_source": "training_pass",
        "epic_start_epoch": 1,
        "epic_interval": 1,
        **overrides,
    }
    data = small_digits(rows)
    trainer = EpicTrainer(
        model=model if model is not None else tiny_vit(0),
        args=make_config(tmp_path, **settings),
        train_dataset=with_pixels(data),
        data_collator=RecordingCollator(),
    )
    trainer.train()
    return trainer, data


def test_rounds_use_the_training_pass_and_run_no_embedding_pass(tmp_path):
    trainer, _ = _train(tmp_path, gradient_accumulation_steps=2)
    state = trainer.epic_state
    assert [r["epoch"] for r in state.rounds] == [1, 2]
    assert trainer.epic_callback.eval_passes == 0
    kept_before = ROWS
    for record in state.rounds:
        assert record["embedding_source"] == "training_pass"
        assert record["eval_pass_rows"] == 0
        # one process, gradient accumulation: every row trained on in the epoch is recorded exactly once
        assert record["recorded_rows"] == record["recorded_row_copies"] == kept_before
        kept_before = record["num_kept"]
    assert state.dropped and trainer.state.global_step == trainer.state.max_steps


@pytest.mark.parametrize("kind", ["logits_grad", "last_layer_grad"])
def test_recorded_embeddings_equal_the_training_forward(tmp_path, kind):
    """With weights that do not move (lr 0) and no dropout/augmentation, train-mode and eval-mode passes agree.

    Every row's recorded embedding (and loss) must then equal ``softmax - onehot`` of an eval pass on the
    same weights: dropped rows included (their embedding is the one recorded before they were dropped).
    """
    trainer, data = _train(
        tmp_path, learning_rate=0.0, epic_embedding=kind, epic_save_embeddings=True, epic_fraction=0.3
    )
    assert trainer.epic_callback.eval_passes == 0
    assert len(trainer.epic_state.rounds) == 2 and trainer.epic_state.dropped
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "epic_embeddings" / "round_002.safetensors"))
    reference = compute_gradient_embeddings(
        trainer.model, with_pixels(data), torch.tensor(data["label"]), kind=kind, batch_size=64
    )
    assert saved["embeddings"].shape == reference.embeddings.shape
    torch.testing.assert_close(saved["embeddings"], reference.embeddings, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(trainer.epic_callback._store_losses, reference.losses, atol=1e-5, rtol=1e-4)
    # the round selected on exactly these embeddings
    from hf_epic.selection import find_isolated

    first, second = trainer.epic_state.rounds
    again = find_isolated(saved["embeddings"], saved["labels"], 0.3, seed=1)
    assert sorted(set(again.dropped.tolist()) - set(first["newly_dropped"])) == second["newly_dropped"]


def test_kept_rows_the_epoch_missed_get_an_eval_pass(tmp_path):
    """dataloader_drop_last leaves rows out of an epoch: only those are embedded by an eval pass."""
    trainer, _ = _train(tmp_path, rows=150, dataloader_drop_last=True, num_train_epochs=2)
    record = trainer.epic_state.rounds[0]
    assert record["recorded_rows"] == 128  # 4 full batches of 32
    assert record["eval_pass_rows"] == 150 - 128
    assert trainer.epic_callback.eval_passes == 1


def test_batch_norm_model_and_eval_pass_default_unchanged(tmp_path):
    """The eval-pass mode (default) embeds every row each round and adds no key to the batches."""
    trainer, _ = _train(tmp_path, model=tiny_cnn(0), epic_embedding_source="eval_pass", num_train_epochs=2)
    record = trainer.epic_state.rounds[0]
    assert record["embedding_source"] == "eval_pass" and record["eval_pass_rows"] == ROWS
    assert record["recorded_rows"] is None and trainer.epic_callback.eval_passes == 1
    assert record["selection_classes_per_rank"] == [list(range(10))]


def test_training_pass_refused_on_a_plain_trainer(tmp_path):
    from transformers import Trainer

    args = make_config(tmp_path, num_train_epochs=1)
    trainer = Trainer(model=tiny_vit(0), args=args, train_dataset=with_pixels(small_digits(64)))
    trainer.add_callback(EpicCallback(embedding_source="training_pass"))
    with pytest.raises(ValueError, match="use hf_epic.EpicTrainer"):
        trainer.train()


def test_resume_mid_epoch_embeds_only_what_the_resumed_epoch_missed(tmp_path):
    """After a resume in the recording epoch, the rows trained before the checkpoint and the dropped rows
    (whose recordings are not in the checkpoint) are embedded by an eval pass; the rest is recorded."""

    def run(folder, resume=None):
        trainer = EpicTrainer(
            model=tiny_vit(0),
            args=make_config(
                folder,
                num_train_epochs=3,
                per_device_train_batch_size=16,
                save_strategy="steps",
                save_steps=8,  # mid epoch 1 (epoch 0 has 6 steps), which records for the round before epoch 2
                epic_fraction=0.3,
                epic_embedding_source="training_pass",
            ),
            train_dataset=with_pixels(small_digits(96)),
            data_collator=RecordingCollator(),
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    assert [r["eval_pass_rows"] for r in full.epic_state.rounds] == [0, 0]
    resumed = run(tmp_path / "resumed", str(tmp_path / "full" / "checkpoint-8"))
    first, second = resumed.epic_state.rounds
    assert first == full.epic_state.rounds[0]
    kept = first["num_kept"]
    assert second["recorded_rows"] == kept - 2 * 16  # the two batches trained before the checkpoint
    assert second["eval_pass_rows"] == 2 * 16 + first["num_dropped_total"]
    assert resumed.epic_callback.eval_passes == 1


def test_eval_pass_batches_like_trainer_evaluate(tmp_path):
    """Without epic_embedding_batch_size the embedding pass uses per_device_eval_batch_size."""
    calls = {}
    for eval_batch in (40, 80):
        collator = RecordingCollator()
        trainer = EpicTrainer(
            model=tiny_vit(0),
            args=make_config(
                tmp_path / str(eval_batch),
                num_train_epochs=2,
                per_device_eval_batch_size=eval_batch,
                epic_embedding_batch_size=None,
            ),
            train_dataset=with_pixels(small_digits(ROWS)),
            data_collator=collator,
        )
        trainer.train()
        assert trainer.epic_callback.eval_passes == 1
        calls[eval_batch] = collator.no_grad_calls
    assert calls[40] - calls[80] == ROWS // 40 - ROWS // 80  # 4 batches against 2 in the one pass


def test_text_with_dynamic_padding_and_removed_columns(tmp_path):
    """A tiny BERT, DataCollatorWithPadding, remove_unused_columns=True: the row positions survive both."""
    import os
    import sys

    from transformers import DataCollatorWithPadding

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
    from tiny_text import build_text_dataset, build_tokenizer, tiny_bert

    tokenizer = build_tokenizer(str(tmp_path / "tok"))
    train = build_text_dataset(tokenizer, 120, planted=(11, 24, 37, 50, 63, 76))
    trainer = EpicTrainer(
        model=tiny_bert(tokenizer),
        args=make_config(
            tmp_path / "out",
            num_train_epochs=3,
            per_device_train_batch_size=16,
            learning_rate=5e-3,
            remove_unused_columns=True,
            epic_embedding_source="training_pass",
        ),
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    )
    trainer.train()
    rounds = trainer.epic_state.rounds
    assert [r["eval_pass_rows"] for r in rounds] == [0, 0] and trainer.epic_callback.eval_passes == 0
    assert rounds[0]["recorded_rows"] == 120 and rounds[1]["recorded_rows"] == rounds[0]["num_kept"]
