"""The shipped evaluate modules, checked against hand-computed values."""

import math

import evaluate
import pytest

from hf_epic.metrics import METRIC_NAMES, load_metric, metric_path


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_each_module_loads_offline_by_path(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = evaluate.load(metric_path(name))
    assert isinstance(module, evaluate.Metric)
    assert set(module.features) >= {"predictions", "references"}


def test_unknown_metric_name_is_a_clear_error():
    with pytest.raises(ValueError, match="attack_success_rate"):
        load_metric("accuracy")


def test_targeted_asr_hand_computed():
    asr = load_metric("attack_success_rate")
    # trials: target predicted 3 (poison 3) yes, 5 (poison 3) no, 1 (poison 1) yes, 0 (poison 2) no
    out = asr.compute(predictions=[3, 5, 1, 0], references=[3, 3, 1, 2])
    assert out == {"attack_success_rate": 0.5, "num_success": 2, "num_evaluated": 4}


def test_targeted_asr_accumulates_batches():
    asr = load_metric("attack_success_rate", config_name="targeted")
    asr.add_batch(predictions=[3], references=[3])
    asr.add_batch(predictions=[4, 4], references=[3, 4])
    assert asr.compute()["attack_success_rate"] == pytest.approx(2 / 3)


def test_targeted_rejects_poison_class_keyword():
    with pytest.raises(ValueError, match="backdoor"):
        load_metric("attack_success_rate").compute(predictions=[1], references=[1], poison_class=1)


def test_backdoor_asr_excludes_poison_class_images():
    bd = load_metric("attack_success_rate", config_name="backdoor")
    # true labels 0,1,1,7,2 ; poison class 7 -> the 4th image is left out.
    # remaining predictions 7,7,1,2 -> 2 of 4 sent to class 7.
    out = bd.compute(predictions=[7, 7, 1, 7, 2], references=[0, 1, 1, 7, 2], poison_class=7)
    assert out == {"attack_success_rate": 0.5, "num_success": 2, "num_evaluated": 4}


def test_backdoor_needs_poison_class_and_something_to_score():
    bd = load_metric("attack_success_rate", config_name="backdoor")
    with pytest.raises(ValueError, match="poison_class"):
        bd.compute(predictions=[1], references=[2])
    with pytest.raises(ValueError, match="nothing to score"):
        bd.compute(predictions=[7, 7], references=[7, 7], poison_class=7)


def test_unknown_asr_config_is_a_clear_error():
    with pytest.raises(ValueError, match="targeted"):
        load_metric("attack_success_rate", config_name="untargeted")


def test_poison_detection_hand_computed():
    pd = load_metric("poison_detection")
    # rows:      0  1  2  3  4  5
    dropped = [1, 1, 0, 0, 1, 0]
    poison = [1, 0, 1, 0, 0, 1]
    out = pd.compute(predictions=dropped, references=poison)
    # dropped {0,1,4}; poisons {0,2,5}; hits {0}
    assert out["poisons_dropped"] == 1 and out["clean_dropped"] == 2 and out["num_dropped"] == 3
    assert out["num_poisons"] == 3 and out["num_clean"] == 3 and out["num_rows"] == 6
    assert out["precision"] == pytest.approx(1 / 3)
    assert out["recall"] == pytest.approx(1 / 3)
    assert out["f1"] == pytest.approx(1 / 3)
    assert out["clean_dropped_fraction"] == pytest.approx(2 / 3)


def test_poison_detection_perfect_and_bool_inputs():
    out = load_metric("poison_detection").compute(
        predictions=[True, False, True, False], references=[True, False, True, False]
    )
    assert (out["precision"], out["recall"], out["f1"], out["clean_dropped_fraction"]) == (1.0, 1.0, 1.0, 0.0)


def test_poison_detection_nothing_dropped_precision_is_zero_division():
    pd = load_metric("poison_detection")
    out = pd.compute(predictions=[0, 0, 0], references=[1, 0, 0])
    assert out["num_dropped"] == 0
    assert out["precision"] == 0.0 and out["recall"] == 0.0 and out["f1"] == 0.0
    assert out["clean_dropped_fraction"] == 0.0
    nan = pd.compute(predictions=[0, 0, 0], references=[1, 0, 0], zero_division=float("nan"))
    assert math.isnan(nan["precision"]) and nan["recall"] == 0.0


def test_poison_detection_no_poisons_dropped():
    out = load_metric("poison_detection").compute(predictions=[0, 1, 1, 0], references=[1, 0, 0, 0])
    assert out["precision"] == 0.0 and out["recall"] == 0.0 and out["f1"] == 0.0
    assert out["clean_dropped_fraction"] == pytest.approx(2 / 3)


def test_poison_detection_no_poisons_in_set():
    out = load_metric("poison_detection").compute(predictions=[1, 0], references=[0, 0], zero_division=-1.0)
    assert out["recall"] == -1.0 and out["precision"] == 0.0 and out["clean_dropped_fraction"] == 0.5


def test_poison_detection_rejects_row_indices():
    with pytest.raises(ValueError, match="0/1"):
        load_metric("poison_detection").compute(predictions=[3, 17], references=[1, 0])


def test_clean_accuracy_hand_computed_and_empty():
    acc = load_metric("clean_accuracy")
    assert acc.compute(predictions=[0, 1, 2, 2, 9], references=[0, 1, 1, 2, 3]) == {
        "clean_accuracy": 0.6,
        "num_examples": 5,
        "num_correct": 3,
    }
    with pytest.raises(ValueError, match="no examples"):
        acc.compute(predictions=[], references=[])
