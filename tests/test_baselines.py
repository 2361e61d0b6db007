"""Baseline defenses: same rounds and per-class counts as EPIC, rows chosen by random / loss / confidence."""

import json

import pytest
import torch

from hf_epic.baselines import (
    HighLossDropCallback,
    LowConfidenceDropCallback,
    RandomDropCallback,
    baseline_callback,
    confidence_from_gradient_embeddings,
    schedule_from_epic_state,
    select_per_class,
)
from hf_epic.state import EpicState


def _logit_grads(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """EPIC's embedding softmax - onehot from given probabilities."""
    return probs - torch.nn.functional.one_hot(labels, probs.shape[1]).float()


def test_schedule_from_epic_state_dict_path_and_object(tmp_path):
    state = {
        "version": 1,
        "num_rows": 10,
        "dropped": [1, 2, 5],
        "rounds": [
            {"round": 2, "epoch": 4, "newly_dropped": [5], "newly_dropped_per_class": {"3": 1}},
            {"round": 1, "epoch": 2, "newly_dropped": [1, 2], "newly_dropped_per_class": {"0": 1, "7": 1}},
        ],
    }
    expected = [{0: 1, 7: 1}, {3: 1}]
    assert schedule_from_epic_state(state) == expected
    path = tmp_path / "epic_state.json"
    path.write_text(json.dumps(state))
    assert schedule_from_epic_state(path) == expected
    assert schedule_from_epic_state(EpicState.from_dict(state)) == expected
    with pytest.raises(ValueError, match="rounds"):
        schedule_from_epic_state({"num_rows": 3})


def test_select_per_class_hand_computed():
    scores = torch.tensor([0.9, 0.1, 0.8, 0.8, 0.5, 0.7, 0.2])
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    # class 0: best two eligible are rows 0 (0.9) and 2 (0.8); class 1: row 3 is already dropped,
    # so the best is row 5 (0.7).
    picked = select_per_class(scores, labels, {0: 2, 1: 1}, already_dropped=torch.tensor([3]))
    assert picked.tolist() == [0, 2, 5]
    # the same with a bool mask, and a class asking for more rows than it has
    mask = torch.tensor([False, False, False, True, False, False, False])
    assert select_per_class(scores, labels, {1: 10}, mask).tolist() == [4, 5, 6]
    # ties go to the lower row position
    assert select_per_class(torch.zeros(4), torch.zeros(4, dtype=torch.long), {0: 2}).tolist() == [0, 1]


def test_confidence_from_gradient_embeddings_recovers_top_probability():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.1, 0.1, 0.8]])
    labels = torch.tensor([1, 1, 0])  # labels need not be the argmax
    top = confidence_from_gradient_embeddings(_logit_grads(probs, labels), labels)
    assert torch.allclose(top, torch.tensor([0.7, 0.4, 0.8]))
    with pytest.raises(ValueError, match="last-layer"):
        confidence_from_gradient_embeddings(torch.rand(3, 12), labels)


def test_high_loss_and_low_confidence_pick_different_rows():
    # Three rows of class 0 with probabilities over 3 classes:
    # row 0 confidently wrong (high loss, high confidence), row 1 uncertain (medium loss, low
    # confidence), row 2 confidently right.
    probs = torch.tensor([[0.02, 0.96, 0.02], [0.36, 0.34, 0.30], [0.98, 0.01, 0.01]])
    labels = torch.tensor([0, 0, 0])
    losses = -torch.log(probs[:, 0])
    embeddings = _logit_grads(probs, labels)
    already = torch.zeros(0, dtype=torch.long)
    high = HighLossDropCallback(fraction=0.2, schedule=[{0: 1}])
    low = LowConfidenceDropCallback(fraction=0.2, schedule=[{0: 1}])
    assert high.select_rows(embeddings, labels, losses, already).tolist() == [0]
    assert low.select_rows(embeddings, labels, losses, already).tolist() == [1]
    # beyond the schedule nothing more is dropped
    high.state = EpicState(num_rows=3, rounds=[{"round": 1}])
    assert high.select_rows(embeddings, labels, losses, already).numel() == 0


def test_random_baseline_respects_counts_seed_and_already_dropped():
    labels = torch.arange(40) % 4
    embeddings = torch.zeros(40, 4)
    losses = torch.zeros(40)
    already = torch.tensor([0, 4, 8])
    picks = []
    for seed in (0, 0, 1):
        callback = RandomDropCallback(fraction=0.2, schedule=[{0: 3, 2: 2}], seed=seed)
        picks.append(callback.select_rows(embeddings, labels, losses, already))
    first = picks[0]
    assert (labels[first] == 0).sum() == 3 and (labels[first] == 2).sum() == 2 and len(first) == 5
    assert not torch.isin(first, already).any()
    assert torch.equal(picks[0], picks[1])
    assert not torch.equal(picks[0], picks[2])


def test_baseline_callback_by_name():
    assert isinstance(baseline_callback("high-loss", fraction=0.2, schedule=[]), HighLossDropCallback)
    with pytest.raises(ValueError, match="random"):
        baseline_callback("lowest-loss", schedule=[])


def _tiny_run(tmp_path, name, callback=None, fraction=0.3):
    """Train a tiny CNN on 120 plain digits for 3 epochs with rounds before epochs 2 and 3."""
    from hf_epic.data import load_digits_dataset
    from hf_epic.epic_config import EpicConfig
    from hf_epic.epic_trainer import EpicTrainer
    from hf_epic.models import build_tiny_cnn, image_transform

    ds = load_digits_dataset("plain", image_size=8)["train"].select(range(120))
    args = EpicConfig(
        output_dir=str(tmp_path / name),
        num_train_epochs=3,
        per_device_train_batch_size=32,
        learning_rate=3e-3,
        remove_unused_columns=False,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="no",
        seed=0,
        epic_fraction=fraction,
        epic_start_epoch=1,
        epic_interval=1,
    )
    if callback is not None:
        callback = callback(args)
    torch.manual_seed(0)
    trainer = EpicTrainer(
        model=build_tiny_cnn(10, 8, 1),
        args=args,
        train_dataset=ds.with_transform(image_transform(8, 1, seed=0)),
        epic_callback=callback,
    )
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def recorded_epic(tmp_path_factory):
    """One real EPIC run whose schedule the baselines replay."""
    return _tiny_run(tmp_path_factory.mktemp("epic"), "epic")


@pytest.mark.parametrize(
    "name",
    [
        "high-loss",
        pytest.param("random", marks=pytest.mark.slow),
        pytest.param("low-confidence", marks=pytest.mark.slow),
    ],
)
def test_baseline_replays_a_recorded_epic_schedule_in_a_real_trainer(tmp_path, recorded_epic, name):
    schedule = schedule_from_epic_state(recorded_epic.epic_state)
    assert len(schedule) == 2 and sum(sum(r.values()) for r in schedule) > 0

    calls = []

    def make(args):
        callback = baseline_callback(name, args, schedule=schedule, seed=3)
        original = callback.select_rows

        def recording(embeddings, labels, losses, already_dropped):
            picked = original(embeddings, labels, losses, already_dropped)
            calls.append((embeddings, labels, losses, already_dropped, picked))
            return picked

        callback.select_rows = recording
        return callback

    baseline = _tiny_run(tmp_path, name, make)
    assert len(calls) == 2
    for (embeddings, labels, losses, already, picked), counts in zip(calls, schedule):
        assert not torch.isin(picked, already).any()
        if name == "random":
            continue
        score = losses if name == "high-loss" else -confidence_from_gradient_embeddings(embeddings, labels)
        for cls, count in counts.items():
            eligible = [i for i in range(len(labels)) if labels[i] == cls and i not in set(already.tolist())]
            chosen = [i for i in picked.tolist() if labels[i] == cls]
            rest = [i for i in eligible if i not in chosen]
            assert len(chosen) == count
            if rest:  # every chosen row scores at least as high as every row left in its class
                assert min(score[chosen]) >= max(score[rest])
    state = baseline.epic_state
    got = [{int(c): n for c, n in r["newly_dropped_per_class"].items()} for r in state.rounds]
    assert got == schedule
    assert [r["epoch"] for r in state.rounds] == [r["epoch"] for r in recorded_epic.epic_state.rounds]
    assert len(state.dropped) == len(set(state.dropped)) == sum(sum(r.values()) for r in schedule)


def test_bad_schedules_and_embeddings_are_refused_before_training(tmp_path):
    with pytest.raises(TypeError, match="schedule_from_epic_state"):
        HighLossDropCallback(fraction=0.2, schedule={0: 3})
    with pytest.raises(ValueError, match=">= 0"):
        HighLossDropCallback(fraction=0.2, schedule=[{0: -1}])

    from hf_epic.data import load_digits_dataset
    from hf_epic.epic_config import EpicConfig
    from hf_epic.models import build_tiny_cnn, image_transform

    ds = load_digits_dataset("plain", image_size=8)["train"].select(range(40))
    args = EpicConfig(
        output_dir=str(tmp_path),
        remove_unused_columns=False,
        use_cpu=True,
        report_to=[],
        epic_embedding="last_layer_grad",
    )
    callback = LowConfidenceDropCallback(args, schedule=[{0: 1}])
    with pytest.raises(ValueError, match="logits_grad"):
        callback.prepare(args, build_tiny_cnn(10, 8, 1), ds.with_transform(image_transform(8, 1)))
