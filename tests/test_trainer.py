"""EpicTrainer / EpicCallback end to end: real Trainer, real datasets, tiny models, CPU."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import RecordingCollator, make_config, small_digits, tiny_cnn, tiny_vit, with_pixels
from transformers import Trainer, TrainingArguments

from hf_epic.epic_callback import EpicCallback
from hf_epic.epic_trainer import ORIGINAL_ROW_COLUMN, EpicTrainer
from hf_epic.state import EpicState


def planted_digits(num_rows: int = 400):
    """Digits with one planted row in each of classes 0-4, relabelled to class + 5.

    Each planted row is alone in its new class (a 0 labelled 5, a 1 labelled 6, ...), so once the
    model has learnt the digits its gradient embedding is isolated: EPIC's target.

    Returns:
        ``(dataset, planted_rows)``.
    """
    labels = small_digits(num_rows)["label"]
    planted = tuple(labels.index(c, 10) for c in range(5))
    return small_digits(num_rows, {r: labels[r] + 5 for r in planted}), planted


def test_planted_rows_dropped_and_never_seen_again(tmp_path):
    raw, planted = planted_digits(400)
    fingerprint = raw._fingerprint
    train = with_pixels(raw)
    collator = RecordingCollator()
    args = make_config(tmp_path, num_train_epochs=4, epic_start_epoch=2, epic_interval=1, learning_rate=5e-3)
    trainer = EpicTrainer(model=tiny_cnn(0), args=args, train_dataset=train, data_collator=collator)
    trainer.train()
    state = trainer.epic_state

    # The planted rows are found (and the drop is selective: clean rows mostly stay).
    dropped = set(state.dropped)
    assert set(planted) <= dropped, f"planted rows {planted}, dropped {sorted(dropped)}"
    assert len(dropped - set(planted)) < 0.12 * 400
    assert [r["epoch"] for r in state.rounds] == [2, 3]
    assert sum(r["poisons_dropped"] for r in state.rounds) == len(planted)
    assert state.rounds[-1]["poisons_dropped_total"] == len(planted)

    # One batch per optimizer step (no accumulation): batch b is trained at global step b + 1.
    assert len(collator.batches) == trainer.state.global_step
    for record in state.rounds:
        gone = set(record["newly_dropped"])
        later = {row for batch in collator.batches[record["global_step"] :] for row in batch}
        assert not (gone & later), "a dropped row reached a batch after its round"
    # Every epoch iterates exactly the rows kept at that time, each once.
    kept = set(range(400))
    for epoch, (start, end) in enumerate(zip(state.epoch_start_steps, state.epoch_end_steps)):
        for record in state.rounds:
            if record["epoch"] == epoch:
                kept -= set(record["newly_dropped"])
        rows = [row for batch in collator.batches[start:end] for row in batch]
        assert sorted(rows) == sorted(kept)
        assert end - start == math.ceil(len(kept) / 32)

    # Trainer mechanics: whole epochs, consistent max_steps, linear LR reaches 0.
    assert trainer.state.epoch == 4.0
    assert trainer.state.global_step == trainer.state.max_steps
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    epic_logs = [h for h in trainer.state.log_history if "epic/dropped_new" in h]
    assert [h["epic/round"] for h in epic_logs] == [1, 2]
    assert "epic/poisons_dropped" in epic_logs[0]

    # State file, user's dataset untouched, cleaned view, tags.
    saved = EpicState.load(tmp_path / "epic_state.json")
    assert saved.dropped == state.dropped
    assert raw._fingerprint == fingerprint and raw.format["type"] is None
    assert "pixel_values" not in raw.column_names
    cleaned = trainer.cleaned_dataset()
    assert len(cleaned) == 400 - len(dropped)
    assert cleaned.with_format(None)[ORIGINAL_ROW_COLUMN] == state.kept
    assert cleaned[0]["pixel_values"].shape == (1, 16, 16)
    assert cleaned.with_format(None)["row_id"] == state.kept
    assert {"hf-epic", "epic", "data-poisoning-defense"} <= set(trainer.model.model_tags)


def test_gradient_accumulation_and_end_of_training_save(tmp_path):
    train = with_pixels(small_digits(200))
    args = make_config(
        tmp_path,
        num_train_epochs=3,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=3,
        save_strategy="steps",
        save_steps=1000,
        epic_start_epoch=1,
        epic_interval=1,
        epic_fraction=0.3,
    )
    epochs_at_end: list[float] = []

    class EpochEnds(EpicCallback.__mro__[1]):  # a plain TrainerCallback
        def on_epoch_end(self, args, state, control, **kwargs):
            epochs_at_end.append(state.epoch)

    trainer = EpicTrainer(model=tiny_vit(0), args=args, train_dataset=train, callbacks=[EpochEnds()])
    trainer.train()
    state = trainer.epic_state
    assert state.num_dropped > 0
    assert epochs_at_end == [1.0, 2.0, 3.0]
    kept = 200
    for epoch, (start, end) in enumerate(zip(state.epoch_start_steps, state.epoch_end_steps)):
        kept -= sum(len(r["newly_dropped"]) for r in state.rounds if r["epoch"] == epoch)
        assert end - start == math.ceil(math.ceil(kept / 16) / 3)
    assert trainer.state.global_step == trainer.state.max_steps
    # DefaultFlowCallback's end-of-training save fired at the (recomputed) last step.
    final = tmp_path / f"checkpoint-{trainer.state.global_step}"
    assert final.is_dir()
    assert json.loads((final / "epic_state.json").read_text())["dropped"] == state.dropped


def test_last_layer_grad_and_saved_embeddings(tmp_path):
    train = with_pixels(small_digits(150))
    args = make_config(
        tmp_path, num_train_epochs=2, epic_embedding="last_layer_grad", epic_save_embeddings=True
    )
    trainer = EpicTrainer(model=tiny_vit(0), args=args, train_dataset=train)
    trainer.train()
    from safetensors import safe_open

    path = tmp_path / "epic_embeddings" / "round_001.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"round": "1", "epoch": "1"}
        emb = handle.get_tensor("embeddings")
        newly = handle.get_tensor("newly_dropped")
        assert handle.get_tensor("is_poison").dtype == torch.bool
    assert emb.shape == (150, 10 * 32)  # C x H for the tiny ViT (hidden size 32)
    assert torch.nonzero(newly).flatten().tolist() == trainer.epic_state.rounds[0]["newly_dropped"]


def test_plain_trainer_with_callback_iterates_only_kept_rows(tmp_path):
    raw = small_digits(200)
    collator = RecordingCollator()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=3,
        per_device_train_batch_size=32,
        remove_unused_columns=False,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="no",
    )
    callback = EpicCallback(fraction=0.3, interval=1, start_epoch=1)
    trainer = Trainer(model=tiny_cnn(0), args=args, train_dataset=with_pixels(raw), data_collator=collator)
    trainer.add_callback(callback)
    trainer.train()
    state = callback.state
    assert state.num_dropped > 0 and len(state.rounds) == 2
    for record in state.rounds:
        start = state.epoch_start_steps[record["epoch"]]
        later = {row for batch in collator.batches[start:] for row in batch}
        assert not (set(record["newly_dropped"]) & later)
    assert sum(len(b) for b in collator.batches[state.epoch_start_steps[2] :]) == 200 - state.num_dropped
    assert any("epic/round" in h for h in trainer.state.log_history)
    assert os.path.isfile(tmp_path / "epic_state.json")


@pytest.mark.parametrize("builder", ["hf-vit", "timm-vit", "timm-resnet"])
def test_gradient_embeddings_match_a_hand_computed_gradient(builder):
    from hf_epic.embeddings import compute_gradient_embeddings
    from hf_epic.models import build_tiny_cnn, build_tiny_timm, build_tiny_vit

    torch.manual_seed(0)
    model = {"hf-vit": build_tiny_vit, "timm-vit": build_tiny_timm, "timm-resnet": build_tiny_cnn}[builder](
        10, 16, 1
    )
    raw = small_digits(12)
    view = with_pixels(raw)
    labels = torch.tensor(raw["label"])
    logits_grad = compute_gradient_embeddings(model, view, labels, kind="logits_grad", batch_size=5)
    last_layer = compute_gradient_embeddings(model, view, labels, kind="last_layer_grad", batch_size=5)
    assert logits_grad.rows.tolist() == list(range(12))
    if builder == "timm-vit":  # loading rows in DataLoader workers gives the same result
        workers = compute_gradient_embeddings(
            model, view, labels, kind="logits_grad", batch_size=5, num_workers=2
        )
        torch.testing.assert_close(workers.embeddings, logits_grad.embeddings)

    # The true gradient of each row's cross-entropy with respect to the classifier weight.
    from hf_epic.embeddings import find_classifier

    classifier = find_classifier(model)
    model.eval()
    for row in (0, 7, 11):
        model.zero_grad()
        pixels = view[row]["pixel_values"][None]
        loss = torch.nn.functional.cross_entropy(model(pixel_values=pixels).logits, labels[row : row + 1])
        loss.backward()
        torch.testing.assert_close(
            last_layer.embeddings[row], classifier.weight.grad.flatten(), rtol=1e-4, atol=1e-6
        )
        torch.testing.assert_close(logits_grad.embeddings[row], classifier.bias.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(logits_grad.losses[row], loss.detach(), rtol=1e-5, atol=1e-6)


def test_embedding_pass_uses_the_unaugmented_view(tmp_path):
    from hf_epic.models import image_transform

    raw = small_digits(120)
    seen: list[int] = []
    plain = image_transform(16, 1)

    def counting(batch):
        seen.extend(batch["row_id"])
        return plain(batch)

    args = make_config(tmp_path, num_train_epochs=3, epic_fraction=0.3)
    trainer = EpicTrainer(
        model=tiny_vit(0),
        args=args,
        train_dataset=with_pixels(raw, augment=True),
        epic_embedding_dataset=raw.with_transform(counting),
    )
    trainer.train()
    # Each of the 2 rounds embeds every row (dropped ones included) through the un-augmented view;
    # the input check reads 2 rows through it too.
    assert sorted(seen) == sorted([0, 1] + 2 * list(range(120)))
    assert len(trainer.epic_state.rounds) == 2


def test_model_card_gets_the_epic_section(tmp_path):
    train = with_pixels(small_digits(100))
    trainer = EpicTrainer(
        model=tiny_vit(0), args=make_config(tmp_path, num_train_epochs=2), train_dataset=train
    )
    trainer.train()
    trainer.create_model_card(model_name="tiny-epic")
    card = (tmp_path / "README.md").read_text()
    assert "## Trained with EPIC, a data-poisoning defense" in card
    assert "- hf-epic" in card and "- data-poisoning-defense" in card  # the model tags reach the metadata


def test_max_steps_is_honoured_while_the_set_shrinks(tmp_path):
    train = with_pixels(small_digits(100))
    args = make_config(
        tmp_path,
        max_steps=30,
        per_device_train_batch_size=16,
        epic_fraction=0.3,
        save_strategy="steps",
        save_steps=1000,
    )
    trainer = EpicTrainer(model=tiny_vit(0), args=args, train_dataset=train)
    trainer.train()
    state = trainer.epic_state
    assert trainer.state.global_step == 30 == trainer.state.max_steps
    assert len(state.rounds) >= 3 and state.num_dropped > 0  # more, shorter epochs than 30 // 7
    assert (tmp_path / "checkpoint-30" / "epic_state.json").is_file()
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_epic_disabled_trains_on_every_row_and_accepts_an_iterable_dataset(tmp_path):
    collator = RecordingCollator()
    args = make_config(tmp_path, num_train_epochs=2, epic_enabled=False)
    trainer = EpicTrainer(
        model=tiny_vit(0), args=args, train_dataset=with_pixels(small_digits(64)), data_collator=collator
    )
    trainer.train()
    assert trainer.epic_state.rounds == [] and trainer.epic_state.dropped == []
    assert sorted(r for b in collator.batches for r in b) == sorted(2 * list(range(64)))

    from hf_epic.models import image_transform

    transform = image_transform(16, 1)
    iterable = small_digits(64).to_iterable_dataset()
    iterable = iterable.map(transform, batched=True, remove_columns=["image", "row_id", "is_poison"])
    trainer = EpicTrainer(
        model=tiny_vit(0), args=make_config(tmp_path, max_steps=3, epic_enabled=False), train_dataset=iterable
    )
    trainer.train()
    assert trainer.state.global_step == 3


def test_batch_norm_model_never_gets_a_one_row_batch(tmp_path):
    """97 rows at batch 32 end every stock epoch on a one-row batch, which BatchNorm cannot train on
    ("Expected more than 1 value per channel"); EpicTrainer leaves one row out of such an epoch."""
    raw = small_digits(97)
    collator = RecordingCollator()
    args = make_config(tmp_path, num_train_epochs=2, epic_start_epoch=1, epic_interval=1)
    trainer = EpicTrainer(
        model=tiny_cnn(0), args=args, train_dataset=with_pixels(raw), data_collator=collator
    )
    trainer.train()

    assert min(len(batch) for batch in collator.batches) > 1
    first_epoch = [
        row for batch in collator.batches[: trainer.epic_state.epoch_end_steps[0]] for row in batch
    ]
    assert len(first_epoch) == len(set(first_epoch)) == 96
    # Without BatchNorm nothing is left out: all 97 rows are iterated in the first epoch.
    collator = RecordingCollator()
    args = make_config(tmp_path / "vit", num_train_epochs=1, epic_enabled=False)
    EpicTrainer(model=tiny_vit(0), args=args, train_dataset=with_pixels(raw), data_collator=collator).train()
    assert sorted(row for batch in collator.batches for row in batch) == list(range(97))


# ------------------------------------------------------------------ any classifier returning logits


class PlainClassifier(torch.nn.Module):
    """A plain ``nn.Module`` (no ``config``) returning ``{"loss", "logits"}``, as Trainer accepts."""

    def __init__(self, body: torch.nn.Module | None = None, num_labels: int = 10) -> None:
        super().__init__()
        self.body = (
            body
            if body is not None
            else torch.nn.Sequential(
                torch.nn.Flatten(),
                torch.nn.Linear(16 * 16, 32),
                torch.nn.ReLU(),
                torch.nn.Linear(32, num_labels),
            )
        )

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        logits = self.body(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = torch.nn.functional.cross_entropy(logits, labels)
        return out


def _raw_timm_classifier() -> PlainClassifier:
    import timm

    body = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=10,
        img_size=16,
        patch_size=4,
        in_chans=1,
        embed_dim=32,
        depth=1,
        num_heads=2,
    )
    return PlainClassifier(body)


@pytest.mark.parametrize("kind", ["plain-module", "raw-timm", "hf-vit", "timm-wrapper"])
def test_any_classifier_returning_logits_trains_under_epic(tmp_path, kind):
    from conftest import tiny_timm_vit

    torch.manual_seed(0)
    builders = {
        "plain-module": PlainClassifier,
        "raw-timm": _raw_timm_classifier,
        "hf-vit": lambda: tiny_vit(0),
        "timm-wrapper": lambda: tiny_timm_vit(0),
    }
    model = builders[kind]()
    raw, planted = planted_digits(120)
    args = make_config(tmp_path, num_train_epochs=3, epic_fraction=0.3, epic_embedding="last_layer_grad")
    collator = RecordingCollator()  # passes only pixel_values and labels to the model, as a user's would
    trainer = EpicTrainer(model=model, args=args, train_dataset=with_pixels(raw), data_collator=collator)
    trainer.train()
    state = trainer.epic_state
    assert trainer.epic_callback.num_labels == 10
    last_epoch = [row for batch in collator.batches[state.epoch_start_steps[2] :] for row in batch]
    assert sorted(last_epoch) == state.kept
    assert [r["epoch"] for r in state.rounds] == [1, 2] and state.num_dropped > 0
    assert trainer.state.epoch == 3.0 and trainer.state.global_step == trainer.state.max_steps


def test_plain_module_labels_are_checked_against_its_logits(tmp_path):
    raw = small_digits(40)
    train = with_pixels(raw)
    trainer = EpicTrainer(
        model=PlainClassifier(num_labels=5),
        args=make_config(tmp_path),
        train_dataset=train,
        data_collator=RecordingCollator(),
    )
    with pytest.raises(ValueError, match="the model has 5 classes"):
        trainer.train()
    assert trainer.state.global_step == 0


# ------------------------------------------------------------------ EPIC off is a plain Trainer


@pytest.mark.parametrize(("epochs", "accumulation"), [(2, 1), (2.5, 1), (2, 3), (2.5, 3)])
def test_epic_disabled_trains_exactly_like_trainer(tmp_path, epochs, accumulation):
    raw = small_digits(72)
    common = {
        "num_train_epochs": epochs,
        "per_device_train_batch_size": 16,
        "gradient_accumulation_steps": accumulation,
        "learning_rate": 3e-3,
        "lr_scheduler_type": "linear",
        "remove_unused_columns": False,
        "report_to": [],
        "disable_tqdm": True,
        "use_cpu": True,
        "save_strategy": "no",
        "seed": 0,
    }
    runs = []
    for name in ("trainer", "epic"):
        collator = RecordingCollator()
        if name == "trainer":
            args = TrainingArguments(output_dir=str(tmp_path / name), **common)
            trainer = Trainer(
                model=tiny_vit(0), args=args, train_dataset=with_pixels(raw), data_collator=collator
            )
        else:
            args = make_config(tmp_path / name, epic_enabled=False, **common)
            trainer = EpicTrainer(
                model=tiny_vit(0), args=args, train_dataset=with_pixels(raw), data_collator=collator
            )
        trainer.train()
        runs.append((trainer, collator))
    (plain, plain_batches), (epic, epic_batches) = runs
    updates_per_epoch = math.ceil(math.ceil(72 / 16) / accumulation)
    assert plain.state.global_step == math.ceil(epochs * updates_per_epoch)
    assert epic.state.global_step == plain.state.global_step
    assert epic.state.max_steps == plain.state.max_steps
    assert epic.state.epoch == plain.state.epoch
    assert epic_batches.batches == plain_batches.batches
    assert epic.lr_scheduler.get_last_lr() == plain.lr_scheduler.get_last_lr()
    for key, value in plain.model.state_dict().items():
        assert torch.equal(epic.model.state_dict()[key], value), key


def test_fractional_epochs_under_epic_end_after_the_share_of_the_last_epoch(tmp_path):
    raw = small_digits(100)
    collator = RecordingCollator()
    args = make_config(
        tmp_path, num_train_epochs=2.5, per_device_train_batch_size=16, epic_fraction=0.3, epic_start_epoch=1
    )
    trainer = EpicTrainer(
        model=tiny_vit(0), args=args, train_dataset=with_pixels(raw), data_collator=collator
    )
    trainer.train()
    state = trainer.epic_state
    assert len(state.epoch_start_steps) == 3 and len(state.rounds) == 2
    kept = 100 - state.num_dropped
    last_epoch_steps = trainer.state.global_step - state.epoch_start_steps[2]
    assert last_epoch_steps == math.ceil(0.5 * math.ceil(kept / 16))
    assert trainer.state.global_step == trainer.state.max_steps
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    assert 2.0 < trainer.state.epoch < 3.0


# ------------------------------------------------------------------ the per-class drop cap


def test_epic_never_removes_a_whole_class(tmp_path, caplog):
    """A huge cluster threshold makes every row isolated: EPIC keeps the lowest-loss row of each class."""
    raw = small_digits(60)
    args = make_config(tmp_path, num_train_epochs=2, epic_cluster_threshold=10_000)
    trainer = EpicTrainer(model=tiny_vit(0), args=args, train_dataset=with_pixels(raw))
    with caplog.at_level("WARNING", logger="hf_epic.epic_callback"):
        trainer.train()
    state = trainer.epic_state
    labels = torch.tensor(raw["label"])
    kept_labels = labels[state.kept].tolist()
    assert sorted(kept_labels) == sorted(set(labels.tolist()))  # exactly one row of each class
    record = state.rounds[0]
    assert sum(record["capped_per_class"].values()) == len(set(labels.tolist()))
    assert all(share < 1.0 for share in record["dropped_share_per_class"].values())
    assert "every class keeps at least one row) kept rows EPIC selected" in caplog.text
    assert trainer.state.global_step == trainer.state.max_steps


def test_max_drop_fraction_caps_each_class_and_is_reported(tmp_path, caplog):
    raw = small_digits(80)
    args = make_config(
        tmp_path, num_train_epochs=3, epic_cluster_threshold=10_000, epic_max_drop_fraction=0.25
    )
    trainer = EpicTrainer(model=tiny_vit(0), args=args, train_dataset=with_pixels(raw))
    with caplog.at_level("INFO", logger="hf_epic.epic_callback"):
        trainer.train()
    state = trainer.epic_state
    labels = torch.tensor(raw["label"])
    counts = torch.bincount(labels)
    gone = torch.bincount(labels[state.dropped], minlength=len(counts))
    assert torch.equal(gone, torch.floor(0.25 * counts).long())  # every class at its cap, never beyond
    assert state.rounds[1]["newly_dropped"] == []  # the second round finds every class at its cap
    assert state.config["epic_max_drop_fraction"] == 0.25
    assert EpicState.load(tmp_path / "epic_state.json").config["epic_max_drop_fraction"] == 0.25
    shares = state.rounds[0]["dropped_share_per_class"]
    assert shares["0"] == pytest.approx(float(gone[0] / counts[0]), abs=1e-4)
    logs = [h for h in trainer.state.log_history if "epic/max_class_dropped_share" in h]
    assert logs[0]["epic/max_class_dropped_share"] == pytest.approx(max(shares.values()))
    assert "more than half of epic_max_drop_fraction=0.25" in caplog.text
    assert "share of each class dropped: 0:" in caplog.text
    trainer.create_model_card(model_name="tiny-epic")
    card = (tmp_path / "README.md").read_text()
    assert "At most 25 % of any class could be removed" in card


# ------------------------------------------------------------------ epic/* figures reach report_to


def test_epic_figures_reach_a_report_to_integration(tmp_path, monkeypatch):
    from transformers import TrainerCallback
    from transformers.integrations import integration_utils

    log_file = tmp_path / "tracker.jsonl"

    class FileTracker(TrainerCallback):
        """A minimal tracking integration: appends every logged dict to a JSON-lines file."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero:
                with open(log_file, "a") as handle:
                    handle.write(json.dumps({"step": state.global_step, **(logs or {})}) + "\n")

    monkeypatch.setitem(integration_utils.INTEGRATION_TO_CALLBACK, "file-tracker", FileTracker)
    args = make_config(tmp_path, num_train_epochs=3, report_to=["file-tracker"])
    trainer = EpicTrainer(model=tiny_vit(0), args=args, train_dataset=with_pixels(small_digits(60)))
    trainer.train()
    tracked = [json.loads(line) for line in log_file.read_text().splitlines()]
    epic = [t for t in tracked if "epic/round" in t]
    assert [t["epic/round"] for t in epic] == [1, 2]
    assert [t["epic/dropped_total"] for t in epic] == [
        r["num_dropped_total"] for r in trainer.epic_state.rounds
    ]
    assert {"epic/kept", "epic/poisons_dropped", "epic/max_class_dropped_share"} <= set(epic[0])


# ------------------------------------------------------------------ baselines inside a real Trainer


@pytest.mark.parametrize("name", ["random", "high-loss", "low-confidence"])
def test_baseline_defense_runs_inside_a_real_trainer(tmp_path, name):
    from hf_epic.baselines import baseline_callback

    raw = small_digits(80)
    schedule = [{0: 2, 3: 1}, {5: 2}]
    args = make_config(tmp_path, num_train_epochs=3)
    callback = baseline_callback(name, args, schedule=schedule, seed=1)
    collator = RecordingCollator()
    trainer = EpicTrainer(
        model=tiny_vit(0),
        args=args,
        train_dataset=with_pixels(raw),
        data_collator=collator,
        epic_callback=callback,
    )
    trainer.train()
    state = trainer.epic_state
    got = [{int(c): n for c, n in r["newly_dropped_per_class"].items()} for r in state.rounds]
    assert got == schedule
    labels = raw["label"]
    assert sorted(labels[i] for i in state.dropped) == [0, 0, 3, 5, 5]
    last_epoch = [row for batch in collator.batches[state.epoch_start_steps[2] :] for row in batch]
    assert sorted(last_epoch) == state.kept
