"""EpicConfig validation, the command line, the JSON state, the sampler, and bad inputs to EpicTrainer."""

from __future__ import annotations

import dataclasses
import json

import datasets
import pytest
import torch
from conftest import make_config, small_digits, tiny_vit, with_pixels
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments, ViTModel

from hf_epic.epic_callback import EpicCallback
from hf_epic.epic_config import EpicConfig
from hf_epic.epic_trainer import EpicTrainer
from hf_epic.sampler import KeptRowsSampler
from hf_epic.state import EpicState

# ------------------------------------------------------------------ EpicConfig


def test_every_epic_field_has_help_and_parses_from_the_command_line():
    epic_fields = [f for f in dataclasses.fields(EpicConfig) if f.name.startswith("epic_")]
    assert len(epic_fields) >= 12
    help_text = HfArgumentParser(EpicConfig).format_help()
    for f in epic_fields:
        assert f.metadata.get("help"), f.name
        assert f"--{f.name}" in help_text
    (cfg,) = HfArgumentParser(EpicConfig).parse_args_into_dataclasses(
        [
            "--output_dir",
            "out",
            "--epic_fraction",
            "0.3",
            "--epic_embedding",
            "last_layer_grad",
            "--epic_stop_epoch",
            "9",
        ]
    )
    assert (cfg.epic_fraction, cfg.epic_embedding, cfg.epic_stop_epoch) == (0.3, "last_layer_grad", 9)
    assert cfg.epic_settings()["epic_fraction"] == 0.3


@pytest.mark.parametrize(
    ("field", "value", "error", "words"),
    [
        ("epic_fraction", 0.0, ValueError, "strictly between 0 and 1"),
        ("epic_fraction", 1.5, ValueError, "epic_enabled=False"),
        ("epic_interval", 0, ValueError, "epic_interval=1"),
        ("epic_interval", 1.5, TypeError, "must be an int"),
        ("epic_start_epoch", 0, ValueError, "epic_start_epoch=1"),
        ("epic_stop_epoch", 1, ValueError, "larger epic_stop_epoch"),
        ("epic_greedy", "naive", ValueError, "'lazy'"),
        ("epic_metric", "manhattan", ValueError, "'euclidean'"),
        ("epic_embedding", "features", ValueError, "'logits_grad'"),
        ("epic_cluster_threshold", 0, ValueError, "Pass 1"),
        ("epic_embedding_batch_size", 0, ValueError, "positive int"),
        ("epic_memory_budget_mb", 0, ValueError, ">= 1"),
        ("epic_stochastic_epsilon", 1.0, ValueError, "strictly between 0 and 1"),
        ("epic_drop_rule", "first", ValueError, "'first_isolation'"),
        ("epic_drop_persistence", 0, ValueError, "Pass 1 or more"),
        ("epic_drop_persistence", 2.0, TypeError, "must be an int"),
        ("epic_drop_rank_share", 0.0, ValueError, "in (0, 1]"),
        ("epic_drop_rank_share", 1.5, ValueError, "Pass e.g. 0.005"),
    ],
)
def test_config_rejects_bad_values_with_the_fix(tmp_path, field, value, error, words):
    with pytest.raises(error, match=field) as info:
        EpicConfig(output_dir=str(tmp_path), **{field: value})
    assert words in str(info.value)


def test_callback_settings_by_short_name():
    callback = EpicCallback(fraction=0.1, interval=3, start_epoch=2, stop_epoch=8)
    assert callback.settings["epic_fraction"] == 0.1
    assert [e for e in range(12) if callback.is_round_epoch(e)] == [2, 5]
    with pytest.raises(TypeError, match="unknown EPIC setting 'fractoin'"):
        EpicCallback(fractoin=0.1)
    with pytest.raises(ValueError, match="epic_fraction"):
        EpicCallback(fraction=2.0)


# ------------------------------------------------------------------ state and sampler


def test_state_round_trip_is_atomic_json(tmp_path):
    state = EpicState(num_rows=5, dropped=[3, 1], config={"epic_fraction": 0.2}, epoch_start_steps=[0, 4])
    state.rounds.append({"round": 1, "epoch": 1, "newly_dropped": [1, 3]})
    path = state.save(tmp_path)
    assert path.endswith("epic_state.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epic_state.json"]  # no temporary left behind
    data = json.loads((tmp_path / "epic_state.json").read_text())
    assert list(data)[:3] == ["version", "num_rows", "dropped"]
    loaded = EpicState.load(tmp_path)
    assert loaded.dropped == [1, 3] and loaded.kept == [0, 2, 4] and loaded.rounds == state.rounds
    data["version"] = 99
    with pytest.raises(ValueError, match="version 99"):
        EpicState.from_dict(data)


def test_sampler_orders_depend_only_on_seed_epoch_and_kept_set():
    sampler = KeptRowsSampler(10, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(10)) and list(KeptRowsSampler(10, seed=3)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_kept([9, 0, 4, 4])
    assert len(sampler) == 3 and sorted(sampler) == [0, 4, 9]
    assert not hasattr(sampler, "generator")
    with pytest.raises(ValueError, match="kept row positions"):
        sampler.set_kept([10])


# ------------------------------------------------------------------ bad inputs: clear errors, no training


class StepCounter(TrainerCallback):
    """Counts training steps begun (must stay 0 when inputs are rejected)."""

    def __init__(self) -> None:
        self.steps = 0

    def on_step_begin(self, args, state, control, **kwargs):
        self.steps += 1


def _expect_rejection(tmp_path, train, error, match, model=None, **trainer_kwargs):
    counter = StepCounter()
    with pytest.raises(error, match=match):
        trainer = EpicTrainer(
            model=model if model is not None else tiny_vit(0),
            args=make_config(tmp_path),
            train_dataset=train,
            callbacks=[counter],
            **trainer_kwargs,
        )
        trainer.train()
    assert counter.steps == 0


def test_iterable_dataset_is_rejected(tmp_path):
    iterable = small_digits(40).to_iterable_dataset()
    _expect_rejection(tmp_path, iterable, TypeError, "IterableDataset")


def test_missing_label_column_is_rejected(tmp_path):
    train = with_pixels(small_digits(40).rename_column("label", "digit"))
    _expect_rejection(tmp_path, train, ValueError, "rename_column")


def test_non_integer_label_column_is_rejected(tmp_path):
    raw = small_digits(40)
    raw = raw.cast_column("label", datasets.Value("int64")).cast_column("label", datasets.Value("float32"))
    _expect_rejection(tmp_path, with_pixels(raw), ValueError, "integer class labels")


def test_label_outside_the_models_classes_is_rejected(tmp_path):
    raw = small_digits(40).cast_column("label", datasets.Value("int64"))
    raw = raw.map(lambda row, i: {"label": 12 if i == 7 else row["label"]}, with_indices=True)
    _expect_rejection(
        tmp_path, with_pixels(raw), ValueError, "row 7 has label 12 but the model has 10 classes"
    )


def test_too_few_examples_are_rejected(tmp_path):
    raw = small_digits(40)
    labels = raw["label"]
    threes = [i for i, y in enumerate(labels) if y == 3]
    lonely = raw.select([i for i in range(40) if labels[i] != 3 or i == threes[0]])
    _expect_rejection(
        tmp_path, with_pixels(lonely), ValueError, r"class\(es\) \[3\] have a single training row"
    )
    _expect_rejection(tmp_path, with_pixels(raw.select([0])), ValueError, "at least")


def test_model_without_logits_is_rejected(tmp_path):
    vit = tiny_vit(0)
    base = ViTModel(vit.config, add_pooling_layer=False)
    _expect_rejection(tmp_path, with_pixels(small_digits(40)), ValueError, "without 2-D 'logits'", model=base)


def test_mismatched_embedding_dataset_is_rejected(tmp_path):
    train = with_pixels(small_digits(40))
    _expect_rejection(
        tmp_path,
        train,
        ValueError,
        "epic_embedding_dataset has 30 rows",
        epic_embedding_dataset=train.select(range(30)),
    )


def test_transform_with_remove_unused_columns_is_rejected(tmp_path):
    trainer = EpicTrainer(
        model=tiny_vit(0),
        args=make_config(tmp_path, remove_unused_columns=True),
        train_dataset=with_pixels(small_digits(40)),
    )
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        trainer.train()


def test_plain_training_arguments_need_a_callback(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(TypeError, match="EpicConfig"):
        EpicTrainer(model=tiny_vit(0), args=args, train_dataset=with_pixels(small_digits(40)))
    # With an explicit callback a plain TrainingArguments is fine.
    trainer = EpicTrainer(
        model=tiny_vit(0),
        args=args,
        train_dataset=with_pixels(small_digits(40)),
        epic_callback=EpicCallback(fraction=0.2),
    )
    assert trainer.epic_callback.settings["epic_fraction"] == 0.2


def test_user_dataset_is_not_modified_by_a_rejected_or_successful_run(tmp_path):
    raw = small_digits(60)
    before = (raw._fingerprint, raw.format, raw.column_names)
    view = with_pixels(raw)
    view_format = dict(view.format)
    trainer = EpicTrainer(
        model=tiny_vit(0), args=make_config(tmp_path, num_train_epochs=2), train_dataset=view
    )
    trainer.train()
    assert (raw._fingerprint, raw.format, raw.column_names) == before
    assert view.format == view_format and len(view) == 60
    assert torch.is_tensor(view[0]["pixel_values"])


def test_epic_trainer_names_missing_trainer_internals(monkeypatch):
    """An incompatible transformers (no ``Trainer._run_epoch``) is refused up front with the fix."""
    import transformers

    from hf_epic import epic_trainer

    monkeypatch.delattr(transformers.Trainer, "_run_epoch")
    with pytest.raises(ImportError, match=r"_run_epoch.*pip install -U"):
        epic_trainer._check_transformers_version()


# ------------------------------------------------------------------ types of every setting


@pytest.mark.parametrize(
    ("field", "value", "error", "words"),
    [
        ("epic_enabled", "false", TypeError, "a bool (True or False)"),
        ("epic_enabled", 0, TypeError, "epic_enabled=False"),
        ("epic_save_embeddings", "yes", TypeError, "a bool"),
        ("epic_fraction", None, TypeError, "a number"),
        ("epic_fraction", "0.2", TypeError, "epic_fraction=0.2"),
        ("epic_fraction", True, TypeError, "a number"),
        ("epic_fraction", float("nan"), ValueError, "NaN"),
        ("epic_interval", None, TypeError, "must be an int"),
        ("epic_start_epoch", "1", TypeError, "must be an int"),
        ("epic_cluster_threshold", 1.0, TypeError, "must be an int"),
        ("epic_memory_budget_mb", None, TypeError, "must be an int"),
        ("epic_stop_epoch", "5", TypeError, "an int or None"),
        ("epic_embedding_batch_size", 2.0, TypeError, "an int or None"),
        ("epic_greedy", None, TypeError, "a str"),
        ("epic_metric", 1, TypeError, "a str"),
        ("epic_embedding", None, TypeError, "a str"),
        ("epic_stochastic_epsilon", None, TypeError, "a number"),
        ("epic_max_drop_fraction", None, TypeError, "a number"),
        ("epic_max_drop_fraction", 0.0, ValueError, "Pass e.g. 0.5"),
        ("epic_max_drop_fraction", 1.5, ValueError, "in (0, 1]"),
    ],
)
def test_config_rejects_wrong_types_naming_the_field_and_the_fix(tmp_path, field, value, error, words):
    with pytest.raises(error, match=field) as info:
        EpicConfig(output_dir=str(tmp_path), **{field: value})
    assert words in str(info.value)
    # The callback checks the same way.
    with pytest.raises(error, match=field):
        EpicCallback(**{field: value})


def test_numpy_scalars_are_accepted_as_the_same_number(tmp_path):
    import numpy as np

    cfg = EpicConfig(
        output_dir=str(tmp_path),
        epic_enabled=np.bool_(True),
        epic_fraction=np.float64(0.3),
        epic_interval=np.int64(2),
        epic_start_epoch=np.int32(1),
        epic_stop_epoch=np.int64(9),
        epic_embedding_batch_size=np.int16(64),
        epic_stochastic_epsilon=np.float32(0.5),
        epic_max_drop_fraction=np.float64(0.5),
        epic_greedy=np.str_("stochastic"),
    )
    settings = cfg.epic_settings()
    assert settings["epic_fraction"] == 0.3 and type(settings["epic_fraction"]) is float
    assert settings["epic_interval"] == 2 and type(settings["epic_interval"]) is int
    assert type(settings["epic_enabled"]) is bool and type(settings["epic_stop_epoch"]) is int
    assert settings["epic_stochastic_epsilon"] == 0.5 and settings["epic_greedy"] == "stochastic"
    json.dumps(settings)  # stored in epic_state.json as plain JSON
    callback = EpicCallback(fraction=np.float32(0.25), interval=np.int64(3))
    assert callback.settings["epic_fraction"] == 0.25 and type(callback.settings["epic_interval"]) is int


# ------------------------------------------------------------------ columns, state file, callbacks


def test_label_and_labels_columns_that_differ_are_refused(tmp_path):
    raw = small_digits(40)
    shifted = [(y + 1) % 10 for y in raw["label"]]
    both = raw.add_column("labels", shifted).cast_column("labels", datasets.Value("int64"))
    _expect_rejection(tmp_path, with_pixels(both), ValueError, "both a 'label' and a 'labels' column")
    # Equal columns are not ambiguous: EPIC runs and selects on those labels.
    same = raw.add_column("labels", list(raw["label"])).cast_column("labels", datasets.Value("int64"))
    trainer = EpicTrainer(
        model=tiny_vit(0), args=make_config(tmp_path, num_train_epochs=2), train_dataset=with_pixels(same)
    )
    trainer.train()
    assert trainer.epic_callback.labels.tolist() == raw["label"] and len(trainer.epic_state.rounds) == 1


def test_is_poison_column_that_is_not_boolean_is_refused_or_read_as_a_marker(tmp_path):
    raw = small_digits(40).remove_columns("is_poison")
    as_text = raw.add_column("is_poison", ["yes" if i < 3 else "no" for i in range(40)])
    _expect_rejection(tmp_path, with_pixels(as_text), ValueError, r"is_poison.*cast_column\('is_poison'")
    as_count = raw.add_column("is_poison", [2 if i < 3 else 0 for i in range(40)])
    _expect_rejection(tmp_path, with_pixels(as_count), ValueError, "integers other than 0 and 1")
    # 0/1 integers mean False/True: the rounds count poisons.
    as_int = raw.add_column("is_poison", [int(i < 3) for i in range(40)])
    trainer = EpicTrainer(
        model=tiny_vit(0), args=make_config(tmp_path, num_train_epochs=2), train_dataset=with_pixels(as_int)
    )
    trainer.train()
    assert trainer.epic_callback.is_poison.tolist() == [i < 3 for i in range(40)]
    assert trainer.epic_state.rounds[0]["poisons_dropped"] is not None


def test_truncated_state_file_error_names_the_file(tmp_path):
    EpicState(num_rows=5, dropped=[1]).save(tmp_path)
    path = tmp_path / "epic_state.json"
    path.write_text(path.read_text()[:20])
    with pytest.raises(ValueError, match=r"epic_state\.json is not valid JSON.*earlier checkpoint") as info:
        EpicState.load(tmp_path)
    assert str(path) in str(info.value)
    path.write_text(json.dumps({"version": 1, "num_rows": 5}))
    with pytest.raises(ValueError, match=rf"{path}.*lacks 'num_rows' or 'dropped'"):
        EpicState.load(path)


def test_a_second_epic_callback_is_refused(tmp_path):
    train = with_pixels(small_digits(40))
    with pytest.raises(ValueError, match="epic_callback=<your EpicCallback>"):
        EpicTrainer(
            model=tiny_vit(0), args=make_config(tmp_path), train_dataset=train, callbacks=[EpicCallback()]
        )
    with pytest.raises(ValueError, match="already runs its own EpicCallback"):
        EpicTrainer(
            model=tiny_vit(0), args=make_config(tmp_path), train_dataset=train, callbacks=[EpicCallback]
        )
    trainer = EpicTrainer(model=tiny_vit(0), args=make_config(tmp_path), train_dataset=train)
    with pytest.raises(ValueError, match="already runs its own EpicCallback"):
        trainer.add_callback(EpicCallback(fraction=0.3))
    counter = StepCounter()
    trainer.add_callback(counter)
    trainer.callback_handler.callbacks.append(EpicCallback(fraction=0.3))  # around add_callback
    with pytest.raises(ValueError, match="already runs its own EpicCallback"):
        trainer.train()
    assert counter.steps == 0


def test_restored_state_is_checked_against_the_run(tmp_path):
    train = with_pixels(small_digits(40))
    args = make_config(tmp_path, num_train_epochs=2)

    def resume_with(state: EpicState, match: str) -> None:
        folder = tmp_path / "state"
        state.save(folder)
        callback = EpicCallback(args)
        callback.load_state(folder)
        with pytest.raises(ValueError, match=match):
            callback.prepare(args, tiny_vit(0), train)

    good = args.epic_settings()
    resume_with(EpicState(num_rows=41, config=good), "covers 41 rows but the training set has 40")
    resume_with(EpicState(num_rows=40, dropped=[3, 40], config=good), r"outside \[0, 40\)")
    resume_with(
        EpicState(num_rows=40, config=good, epoch_start_steps=[0, 2], epoch_end_steps=[2, 4, 6]),
        "inconsistent epoch boundaries",
    )
    resume_with(
        EpicState(num_rows=40, config={**good, "epic_fraction": 0.3}),
        r"epic_fraction=0\.3 \(this run: 0\.2\).*Resume with the settings it was made with",
    )
    # The same settings (a state without a newer setting counts as its default) are accepted.
    older = {k: v for k, v in good.items() if k != "epic_max_drop_fraction"}
    folder = tmp_path / "ok"
    EpicState(num_rows=40, dropped=[3], config={**older, "epic_embedding_batch_size": 7}).save(folder)
    callback = EpicCallback(args)
    callback.load_state(folder)
    callback.prepare(args, tiny_vit(0), train)
    assert callback.state.dropped == [3]


def test_find_isolated_with_fraction_one_warns_that_every_row_goes():
    from hf_epic.selection import find_isolated

    embeddings = torch.randn(12, 3)
    labels = torch.tensor([0] * 6 + [1] * 6)
    with pytest.warns(UserWarning, match=r"fraction=1\.0\) makes every row its own medoid"):
        result = find_isolated(embeddings, labels, 1.0)
    assert len(result.dropped) == 12
