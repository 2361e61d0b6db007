"""Resuming an EpicTrainer run from a mid-training checkpoint reproduces the uninterrupted run."""

from __future__ import annotations

import pytest
import torch
from conftest import RecordingCollator, make_config, small_digits, tiny_timm_vit, tiny_vit, with_pixels

from hf_epic.epic_trainer import EpicTrainer
from hf_epic.state import EpicState

BUILDERS = {"hf-vit": tiny_vit, "timm-vit": tiny_timm_vit}


def _run(output_dir, builder, model_seed: int, resume: str | None = None):
    train = with_pixels(small_digits(96))
    collator = RecordingCollator()
    args = make_config(
        output_dir,
        num_train_epochs=3,
        per_device_train_batch_size=16,
        save_strategy="steps",
        save_steps=8,  # step 8 is in the middle of epoch 1, after round 1 (epoch 0 has 6 steps)
        epic_start_epoch=1,
        epic_interval=1,
        epic_fraction=0.3,
    )
    trainer = EpicTrainer(model=builder(model_seed), args=args, train_dataset=train, data_collator=collator)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, collator


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_resume_mid_epoch_matches_uninterrupted(tmp_path, name):
    builder = BUILDERS[name]
    full, full_batches = _run(tmp_path / "full", builder, model_seed=0)
    checkpoint = tmp_path / "full" / "checkpoint-8"
    saved = EpicState.load(checkpoint)
    assert len(saved.rounds) == 1 and saved.num_dropped > 0
    assert saved.epoch_start_steps == [0, 6] and saved.epoch_end_steps == [6]

    # A different initial model: the resumed run must really load the checkpoint's weights.
    resumed, resumed_batches = _run(tmp_path / "resumed", builder, model_seed=1, resume=str(checkpoint))

    assert resumed.epic_state.dropped == full.epic_state.dropped
    assert [r["newly_dropped"] for r in resumed.epic_state.rounds] == [
        r["newly_dropped"] for r in full.epic_state.rounds
    ]
    assert resumed.epic_state.epoch_start_steps == full.epic_state.epoch_start_steps
    # Same batch order after the checkpoint (batch b is trained at global step b + 1).
    assert resumed_batches.batches == full_batches.batches[8:]
    assert resumed.state.global_step == full.state.global_step == full.state.max_steps
    assert resumed.state.epoch == 3.0
    full_sd, resumed_sd = full.model.state_dict(), resumed.model.state_dict()
    assert full_sd.keys() == resumed_sd.keys()
    for key in full_sd:
        torch.testing.assert_close(resumed_sd[key], full_sd[key], rtol=1e-5, atol=1e-6, msg=key)


def test_resume_from_epoch_end_checkpoint_and_true(tmp_path):
    train = with_pixels(small_digits(120))
    args = make_config(tmp_path, num_train_epochs=2, save_strategy="epoch", epic_fraction=0.3)
    first = EpicTrainer(model=tiny_vit(0), args=args, train_dataset=train)
    first.train()
    state_at_end = EpicState.load(tmp_path / f"checkpoint-{first.state.global_step}")
    assert state_at_end.epoch_end_steps[-1] == first.state.global_step
    # Resuming a finished run (resume_from_checkpoint=True picks the last checkpoint) trains nothing more.
    again = EpicTrainer(model=tiny_vit(1), args=args, train_dataset=train)
    again.train(resume_from_checkpoint=True)
    assert again.epic_state.dropped == first.epic_state.dropped
    assert again.state.global_step == first.state.global_step
    for key, value in first.model.state_dict().items():
        torch.testing.assert_close(again.model.state_dict()[key], value)


@pytest.mark.parametrize("damage", ["trainer_state_missing", "epic_state_truncated"])
def test_resume_true_skips_a_checkpoint_cut_short_during_its_save(tmp_path, caplog, damage):
    import shutil

    train = with_pixels(small_digits(96))
    args = make_config(tmp_path, num_train_epochs=2, per_device_train_batch_size=16, save_strategy="epoch")
    full = EpicTrainer(model=tiny_vit(0), args=args, train_dataset=train)
    full.train()
    first, last = (tmp_path / f"checkpoint-{step}" for step in full.epic_state.epoch_end_steps)
    # A process killed while saving the last checkpoint: the folder exists, a file is missing or cut off.
    if damage == "trainer_state_missing":
        (last / "trainer_state.json").unlink()
    else:
        text = (last / "epic_state.json").read_text()
        (last / "epic_state.json").write_text(text[: len(text) // 2])
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)
    resumed = EpicTrainer(model=tiny_vit(1), args=args, train_dataset=train)
    with caplog.at_level("WARNING", logger="hf_epic.epic_trainer"):
        resumed.train(resume_from_checkpoint=True)
    assert f"Skipping {last}" in caplog.text
    # It resumed from the complete checkpoint of epoch 1 and trained epoch 2 again, as the full run did.
    assert resumed.epic_state.epoch_start_steps == full.epic_state.epoch_start_steps
    assert resumed.epic_state.dropped == full.epic_state.dropped
    assert resumed.state.global_step == full.state.global_step
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert first.is_dir()


def test_resume_with_other_epic_settings_is_refused_before_training(tmp_path):
    train = with_pixels(small_digits(96))
    args = make_config(tmp_path, num_train_epochs=2, per_device_train_batch_size=16, save_strategy="epoch")
    EpicTrainer(model=tiny_vit(0), args=args, train_dataset=train).train()
    other = make_config(
        tmp_path, num_train_epochs=3, per_device_train_batch_size=16, save_strategy="epoch", epic_fraction=0.3
    )
    trainer = EpicTrainer(model=tiny_vit(0), args=other, train_dataset=train)
    with pytest.raises(ValueError, match=r"epic_fraction=0\.2 \(this run: 0\.3\)"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 0
    # Resuming on another training set is refused as well, naming the row counts.
    smaller = EpicTrainer(model=tiny_vit(0), args=args, train_dataset=train.select(range(90)))
    with pytest.raises(ValueError, match="covers 96 rows but the training set has 90"):
        smaller.train(resume_from_checkpoint=True)


def test_resume_restores_the_isolation_evidence_a_persistent_rule_needs(tmp_path):
    """Round 2 of the 'persistent' rule drops rows isolated in rounds 1 and 2: a run resumed between
    the two rounds reads round 1's evidence from the checkpoint and drops what the full run drops."""

    def run(folder, resume=None):
        args = make_config(
            folder,
            num_train_epochs=3,
            per_device_train_batch_size=16,
            save_strategy="epoch",
            epic_fraction=0.3,
            epic_drop_rule="persistent",
        )
        trainer = EpicTrainer(model=tiny_vit(0), args=args, train_dataset=with_pixels(small_digits(96)))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path)
    rounds = full.epic_state.rounds
    assert len(rounds) == 2 and rounds[0]["newly_dropped"] == []  # one isolation is not enough
    twice = sorted(set(rounds[0]["isolated_rows"]) & set(rounds[1]["isolated_rows"]))
    assert twice and rounds[1]["newly_dropped"] == twice
    checkpoint = tmp_path / f"checkpoint-{full.epic_state.epoch_end_steps[1]}"
    saved = EpicState.load(checkpoint)
    assert len(saved.rounds) == 1 and saved.rounds[0]["isolated_rows"] == rounds[0]["isolated_rows"]
    resumed = run(tmp_path, resume=str(checkpoint))
    assert resumed.epic_state.rounds[1]["newly_dropped"] == twice
    assert resumed.epic_state.rounds[1]["isolation_scores"] == rounds[1]["isolation_scores"]
    assert resumed.suspicion_scores() == full.suspicion_scores()
