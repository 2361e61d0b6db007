"""Text classification under EPIC: a tiny BERT, variable-length rows, the stock padding collator."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from conftest import make_config, small_digits, tiny_vit, with_pixels
from transformers import DataCollatorWithPadding

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))

from tiny_text import build_text_dataset, build_tokenizer, tiny_bert  # noqa: E402

from hf_epic.epic_trainer import EpicTrainer  # noqa: E402

PLANTED = (11, 24, 37, 50, 63, 76)


class CountingPadding(DataCollatorWithPadding):
    """The stock padding collator, counting the batches it pads outside training (under no_grad)."""

    no_grad_calls = 0

    def __call__(self, features):
        if not torch.is_grad_enabled():
            type(self).no_grad_calls += 1
        return super().__call__(features)


def test_text_with_dynamic_padding_trains_under_epic(tmp_path):
    tokenizer = build_tokenizer(str(tmp_path / "tok"))
    train = build_text_dataset(tokenizer, 120, planted=PLANTED)
    lengths = [len(ids) for ids in train["input_ids"]]
    assert lengths[0] == lengths[1] and len(set(lengths)) > 5  # the first two rows alone look fixed-length
    args = make_config(
        tmp_path / "out",
        num_train_epochs=5,
        per_device_train_batch_size=16,
        learning_rate=5e-3,
        remove_unused_columns=True,
        epic_start_epoch=2,
        epic_interval=1,
        epic_fraction=0.2,
        epic_embedding_batch_size=32,
    )
    collator = CountingPadding(tokenizer)
    CountingPadding.no_grad_calls = 0
    trainer = EpicTrainer(
        model=tiny_bert(tokenizer),
        args=args,
        train_dataset=train,
        data_collator=collator,
        processing_class=tokenizer,
    )
    trainer.train()
    state = trainer.epic_state
    assert [r["epoch"] for r in state.rounds] == [2, 3, 4]
    # The input check and every round padded their batches with the trainer's collator (4 batches of 32).
    assert CountingPadding.no_grad_calls == 1 + 3 * 4
    assert trainer.state.epoch == 5.0 and trainer.state.global_step == trainer.state.max_steps
    assert state.rounds[-1]["poisons_dropped_total"] >= len(PLANTED) // 2
    assert state.num_dropped < 0.3 * 120


def test_embedding_pass_uses_the_dataloader_workers(tmp_path):
    """``dataloader_num_workers`` loads the embedding pass's rows in worker processes, as in training."""
    from hf_epic.models import image_transform

    pids = tmp_path / "pids"
    pids.mkdir()
    plain = image_transform(16, 1)

    def recording(batch):
        (pids / str(os.getpid())).touch()
        return plain(batch)

    raw = small_digits(64)
    args = make_config(tmp_path / "out", num_train_epochs=2, dataloader_num_workers=1)
    trainer = EpicTrainer(
        model=tiny_vit(0),
        args=args,
        train_dataset=with_pixels(raw),
        epic_embedding_dataset=raw.with_transform(recording),
    )
    trainer.train()
    assert len(trainer.epic_state.rounds) == 1
    seen = {int(p.name) for p in pids.iterdir()}
    assert os.getpid() in seen  # the input check reads two rows here
    assert seen - {os.getpid()}, "the embedding pass loaded no row in a DataLoader worker"


@pytest.mark.parametrize("bad", ["tuple"])
def test_a_collator_that_returns_no_dict_is_refused_before_training(tmp_path, bad):
    raw = small_digits(40)

    def tuple_collator(features):
        return tuple(features)

    trainer = EpicTrainer(
        model=tiny_vit(0),
        args=make_config(tmp_path),
        train_dataset=with_pixels(raw),
        data_collator=tuple_collator,
    )
    with pytest.raises(ValueError, match="EPIC needs a dict of model inputs"):
        trainer.train()
    assert trainer.state.global_step == 0
