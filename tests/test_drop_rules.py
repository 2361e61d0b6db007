"""Drop rules (hf_epic.drop_rules): golden examples, persistence, the ranked share, the registry,
suspicion, the evidence in epic_state.json, and real EpicTrainer runs with every rule."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from hf_epic.drop_rules import (
    DropRule,
    RoundEvidence,
    apply_drop_rule,
    available_drop_rules,
    get_drop_rule,
    register_drop_rule,
    suspicion,
    unregister_drop_rule,
)
from hf_epic.selection import find_isolated
from hf_epic.state import EpicState, check_state_matches_run


def golden_embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes of 8 rows in 2-D, where s(a, b) = exp(-||a - b|| / 2).

    Class 0 (rows 0-7): five rows at the origin and three outliers, row 5 at (1.5, 0), row 6 at
    (0, 3), row 7 at (-4.5, 0). Class 1 (rows 8-15): seven rows at (10, 10) and row 15 at (10, 12).
    At fraction 0.5 (4 medoids a class) greedy picks an origin row, then 7, 6, 5 (gains 1 - e^-2.25,
    1 - e^-1.5, 1 - e^-0.75: their similarities to each other are below those to the origin), so the
    three outliers are singletons; class 1's medoids are row 8, row 15 and two rows at (10, 10) that
    row 8 outranks, so row 15 is its only singleton. Each outlier's nearest other row is the cluster:
    isolation scores 1 - e^-0.75, 1 - e^-1.5, 1 - e^-2.25 and 1 - e^-1.
    """
    a = [[0.0, 0.0]] * 5 + [[1.5, 0.0], [0.0, 3.0], [-4.5, 0.0]]
    b = [[10.0, 10.0]] * 7 + [[10.0, 12.0]]
    return torch.tensor(a + b, dtype=torch.float64), torch.tensor([0] * 8 + [1] * 8)


GOLDEN_ROWS = [5, 6, 7, 15]
GOLDEN_SCORES = [1 - math.exp(-0.75), 1 - math.exp(-1.5), 1 - math.exp(-2.25), 1 - math.exp(-1.0)]


def golden_evidence() -> tuple[RoundEvidence, torch.Tensor]:
    emb, labels = golden_embeddings()
    result = find_isolated(emb, labels, 0.5, isolation_scores=True)
    return RoundEvidence.build(1, result.dropped, result.isolation_scores), labels


def run_rule(name: str, evidence, history=(), labels=None, already=(), **options) -> list[int]:
    labels = labels if labels is not None else golden_embeddings()[1]
    rule = get_drop_rule(name, **options)
    return apply_drop_rule(
        rule, evidence, list(history), labels, torch.tensor(already, dtype=torch.long)
    ).tolist()


def ev(round: int, rows: list[int], scores: list[float] | None = None, classes=None) -> RoundEvidence:
    return RoundEvidence.build(round, rows, scores if scores is not None else [0.5] * len(rows), classes)


# ------------------------------------------------------------------ golden examples


def test_golden_isolation_evidence_is_the_hand_computed_one():
    evidence, _ = golden_evidence()
    assert evidence.rows.tolist() == GOLDEN_ROWS
    assert evidence.scores.tolist() == pytest.approx(GOLDEN_SCORES, abs=2e-6)
    assert evidence.scores.tolist() == [round(s, 6) for s in evidence.scores.tolist()]  # kept at 6 decimals


def test_golden_first_isolation_drops_every_isolated_row():
    evidence, _ = golden_evidence()
    assert run_rule("first_isolation", evidence) == GOLDEN_ROWS
    assert run_rule("first_isolation", evidence, already=[6]) == [5, 7, 15]


def test_golden_persistent_waits_for_consecutive_isolations():
    evidence, _ = golden_evidence()  # round 1: 5, 6, 7, 15
    assert run_rule("persistent", evidence) == []  # isolated once: not yet
    second = RoundEvidence.build(2, evidence.rows, evidence.scores)
    earlier = ev(1, [6, 15])
    assert run_rule("persistent", second, [earlier]) == [6, 15]
    assert run_rule("persistent", second, [earlier], persistence=3) == []
    assert run_rule("persistent", second, [earlier], persistence=1) == GOLDEN_ROWS


def test_golden_ranked_keeps_the_most_isolated_rows_per_class():
    evidence, _ = golden_evidence()
    # 8 rows a class: share 0.2 allows ceil(1.6) = 2 a class, 0.1 allows 1
    assert run_rule("ranked", evidence, rank_share=0.2) == [6, 7, 15]
    assert run_rule("ranked", evidence, rank_share=0.1) == [7, 15]
    assert run_rule("ranked", evidence, rank_share=1.0) == GOLDEN_ROWS
    # rows dropped before neither count against the share nor come back
    assert run_rule("ranked", evidence, already=[7], rank_share=0.1) == [6, 15]


# ------------------------------------------------------------------ persistence semantics


LABELS = torch.tensor([0, 0, 0, 1, 1, 1])


def test_persistence_counts_only_consecutive_evaluated_rounds():
    history = [ev(1, [0, 1, 3]), ev(2, [0, 3])]
    assert run_rule("persistent", ev(3, [0, 1, 3]), history, LABELS) == [0, 3]
    # row 1: isolated in round 1, not in round 2 (its class was evaluated), so round 3 starts over
    assert run_rule("persistent", ev(3, [1]), history, LABELS, persistence=2) == []
    assert run_rule("persistent", ev(3, [0, 3]), history, LABELS, persistence=3) == [0, 3]


def test_rounds_that_did_not_evaluate_a_row_neither_break_nor_count():
    # round 2 evaluated only class 1: row 0 (class 0) keeps its run from round 1
    history = [ev(1, [0, 3]), ev(2, [], classes=[1])]
    assert run_rule("persistent", ev(3, [0, 3]), history, LABELS) == [0]  # row 3 was not isolated in round 2
    assert run_rule("persistent", ev(3, [0]), history, LABELS, persistence=3) == []  # round 2 does not count


def test_ranked_ties_go_to_the_lowest_row_and_small_classes_drop_at_least_one():
    labels = torch.tensor([0] * 10 + [1] * 3)
    evidence = ev(1, [9, 2, 4, 11, 12], [0.4, 0.4, 0.9, 0.3, 0.3])
    # class 0: ceil(0.2 * 10) = 2: row 4 (0.9), then 2 before 9 (a tie); class 1: ceil(0.6) = 1: row 11
    assert run_rule("ranked", evidence, labels=labels, rank_share=0.2) == [2, 4, 11]


# ------------------------------------------------------------------ the registry


def test_a_rule_registered_in_a_test_runs_and_is_a_config_choice(tmp_path):
    from hf_epic.epic_config import EpicConfig

    @register_drop_rule("test_lowest_row")
    class LowestRow(DropRule):
        summary = "the lowest isolated row"

        def select(self, evidence, history, labels, already_dropped):
            return evidence.rows[:1]

    try:
        assert "test_lowest_row" in available_drop_rules()
        evidence, _ = golden_evidence()
        assert run_rule("test_lowest_row", evidence) == [5]
        cfg = EpicConfig(output_dir=str(tmp_path), epic_drop_rule="test_lowest_row")
        assert cfg.epic_drop_rule == "test_lowest_row"
        with pytest.raises(ValueError, match="already registered"):
            register_drop_rule("test_lowest_row")(LowestRow)
    finally:
        unregister_drop_rule("test_lowest_row")
    assert "test_lowest_row" not in available_drop_rules()
    with pytest.raises(ValueError, match="epic_drop_rule.*first_isolation"):
        EpicConfig(output_dir=str(tmp_path), epic_drop_rule="test_lowest_row")
    with pytest.raises(ValueError, match="unknown drop rule 'nope'; choose one of first_isolation"):
        get_drop_rule("nope")
    with pytest.raises(TypeError, match="DropRule subclasses"):
        register_drop_rule("not_a_rule")(object)


def test_a_rule_returning_rows_outside_the_training_set_is_refused():
    class Wild(DropRule):
        def select(self, evidence, history, labels, already_dropped):
            return torch.tensor([99])

    with pytest.raises(ValueError, match=r"outside \[0, 6\)"):
        apply_drop_rule(Wild(), ev(1, [0]), [], LABELS, torch.zeros(0, dtype=torch.long))


def test_evidence_rejects_mismatched_scores_and_duplicate_rows():
    with pytest.raises(ValueError, match="2 isolated rows but 1 isolation scores"):
        RoundEvidence.build(1, [1, 2], [0.1])
    with pytest.raises(ValueError, match="listed twice"):
        RoundEvidence.build(1, [1, 1], [0.1, 0.2])


# ------------------------------------------------------------------ suspicion


def test_suspicion_ranks_by_rounds_isolated_then_by_isolation():
    rounds = [ev(1, [0, 1, 2], [0.9, 0.2, 0.5]), ev(2, [1, 2], [0.4, 0.5]), ev(3, [3], [1.0])]
    table = suspicion(rounds, 5)
    assert table.rounds_isolated.tolist() == [1, 2, 2, 1, 0]
    assert table.mean_isolation.tolist() == pytest.approx([0.9, 0.3, 0.5, 1.0, 0.0])
    assert table.max_isolation.tolist() == pytest.approx([0.9, 0.4, 0.5, 1.0, 0.0])
    assert table.score.tolist() == pytest.approx([1.9, 2.3, 2.5, 2.0, 0.0])
    assert table.ranking().tolist() == [2, 1, 3, 0, 4]
    assert table.ranking([4, 0, 1]).tolist() == [1, 0, 4]


# ------------------------------------------------------------------ evidence in epic_state.json


def test_evidence_round_trips_through_the_state_file(tmp_path):
    state = EpicState(num_rows=6, dropped=[0], config={})
    state.rounds.append({"round": 1, "newly_dropped": [0], **ev(1, [3, 0], [0.25, 0.7500004]).to_record()})
    state.rounds.append({"round": 2, "newly_dropped": [], "isolated_rows": None, "isolation_scores": None})
    state.save(tmp_path)
    raw = json.loads((tmp_path / "epic_state.json").read_text())
    assert raw["rounds"][0]["isolated_rows"] == [0, 3]
    assert raw["rounds"][0]["isolation_scores"] == [0.75, 0.25]
    loaded = EpicState.load(tmp_path)
    (only,) = loaded.evidence()  # round 2 holds no evidence (a custom select_rows)
    assert only.round == 1 and only.rows.tolist() == [0, 3] and only.scores.tolist() == [0.75, 0.25]
    assert loaded.round_dropped() == [1, None, None, None, None, None]
    assert loaded.suspicion().score.tolist() == pytest.approx([1.75, 0, 0, 1.25, 0, 0])
    check_state_matches_run(loaded, 6, {})


def test_an_older_state_without_evidence_loads_as_empty(tmp_path):
    old = {
        "version": 1,
        "num_rows": 4,
        "dropped": [2],
        "config": {"epic_fraction": 0.2},
        "rounds": [{"round": 1, "epoch": 1, "newly_dropped": [2]}],
    }
    (tmp_path / "epic_state.json").write_text(json.dumps(old))
    state = EpicState.load(tmp_path)
    assert state.evidence() == []
    assert state.suspicion().score.tolist() == [0.0] * 4
    assert state.round_dropped() == [None, None, 1, None]
    check_state_matches_run(state, 4, {})  # the missing drop-rule settings count as their defaults


def test_damaged_evidence_is_refused_on_restore():
    state = EpicState(
        num_rows=4, rounds=[{"round": 1, "isolated_rows": [1, 9], "isolation_scores": [0.1, 0.2]}]
    )
    with pytest.raises(
        ValueError, match=r"round 1 lists isolated rows outside \[0, 4\).*Resume from another"
    ):
        check_state_matches_run(state, 4, {})
    state.rounds[0] = {"round": 1, "isolated_rows": [1, 2], "isolation_scores": [0.1]}
    with pytest.raises(ValueError, match="1 isolation scores for 2 rows"):
        check_state_matches_run(state, 4, {})


def test_a_state_made_with_another_drop_rule_is_refused():
    from hf_epic.epic_config import default_epic_settings

    state = EpicState(num_rows=4, config={"epic_drop_rule": "ranked"})
    with pytest.raises(ValueError, match=r"epic_drop_rule='ranked' \(this run: 'first_isolation'\)"):
        check_state_matches_run(state, 4, default_epic_settings())


# ------------------------------------------------------------------ real EpicTrainer runs


@pytest.fixture(scope="module")
def custom_rule():
    @register_drop_rule("test_top_one")
    class TopOne(DropRule):
        """The single most isolated row of the round."""

        summary = "the single most isolated row of each round"

        def select(self, evidence, history, labels, already_dropped):
            if evidence.rows.numel() == 0:
                return evidence.rows
            order = torch.sort(-evidence.scores, stable=True).indices
            return evidence.rows[order[:1]]

    yield "test_top_one"
    unregister_drop_rule("test_top_one")


@pytest.mark.parametrize("rule", ["first_isolation", "persistent", "ranked", "test_top_one"])
def test_epic_trainer_runs_with_each_rule(tmp_path, rule, custom_rule):
    from conftest import make_config, small_digits, tiny_vit, with_pixels

    from hf_epic.epic_trainer import EpicTrainer

    raw = small_digits(120, plant={3: 5, 40: 5, 77: 5})
    args = make_config(
        tmp_path, num_train_epochs=4, epic_fraction=0.3, epic_drop_rule=rule, epic_drop_rank_share=0.05
    )
    trainer = EpicTrainer(model=tiny_vit(0), args=args, train_dataset=with_pixels(raw))
    trainer.train()
    state = trainer.epic_state
    labels = torch.tensor(raw["label"])
    counts = torch.bincount(labels)
    assert len(state.rounds) == 3
    before: set[int] = set()
    for i, record in enumerate(state.rounds):
        isolated = record["isolated_rows"]
        scores = dict(zip(isolated, record["isolation_scores"]))
        new = record["newly_dropped"]
        assert record["drop_rule"] == rule
        assert set(new) <= set(isolated) and not set(new) & before
        assert all(0.0 <= s <= 1.0 for s in scores.values())
        if rule == "first_isolation":
            assert new == sorted(set(isolated) - before)
        elif rule == "persistent":  # isolated in this round and the one before
            assert i > 0 or new == []
            assert all(r in state.rounds[i - 1]["isolated_rows"] for r in new)
        elif rule == "ranked":
            for c in set(labels[new].tolist()):
                mine = [r for r in new if labels[r] == c]
                assert len(mine) <= math.ceil(0.05 * int(counts[c]))
                rest = [scores[r] for r in isolated if labels[r] == c and r not in before and r not in new]
                assert all(scores[r] >= s for r in mine for s in rest)
        else:
            assert len(new) <= 1
        before |= set(new)
    assert sorted(before) == state.dropped

    # suspicion, the ranked audit view and the export agree with the recorded evidence
    table = state.suspicion()
    scores = trainer.suspicion_scores()
    assert len(scores) == 120 and scores == table.score.tolist()
    audit = trainer.dropped_dataset()
    rows = audit.with_format(None)["epic_original_row"]
    assert sorted(rows) == state.dropped
    assert audit.with_format(None)["epic_suspicion"] == sorted((scores[r] for r in rows), reverse=True)
    assert audit.with_format(None)["row_id"] == rows
    plain = trainer.dropped_dataset(ranked=False)
    assert plain.with_format(None)["epic_original_row"] == state.dropped
    assert trainer.cleaned_dataset().with_format(None)["epic_original_row"] == state.kept
    by_round = state.round_dropped()
    path = trainer.export_dropped(tmp_path / "dropped.jsonl")
    with open(path) as handle:
        lines = [json.loads(line) for line in handle]
    assert [x["row"] for x in lines] == rows
    for line in lines:
        r = line["row"]
        assert line["label"] == int(labels[r]) and line["round_dropped"] == by_round[r]
        assert line["rounds_isolated"] == int(table.rounds_isolated[r]) >= 1
        assert line["is_poison"] == (r in (3, 40, 77))
    with open(trainer.export_dropped(tmp_path / "dropped.csv"), newline="") as handle:
        assert [int(x["row"]) for x in csv.DictReader(handle)] == rows

    trainer.create_model_card(model_name="tiny-epic")
    card = (tmp_path / "README.md").read_text()
    assert f"Drop rule (`epic_drop_rule`) `{rule}`: " in card


def test_export_dropped_names_the_formats_it_writes(tmp_path):
    from conftest import make_config, small_digits, tiny_vit, with_pixels

    from hf_epic.epic_trainer import EpicTrainer

    args = make_config(tmp_path, num_train_epochs=1)
    trainer = EpicTrainer(model=tiny_vit(0), args=args, train_dataset=with_pixels(small_digits(40)))
    with pytest.raises(ValueError, match=r"\.csv or \.jsonl.*end the name with one of them"):
        trainer.export_dropped(tmp_path / "dropped.txt")
    # before training nothing is dropped: an empty file with a header, empty audit view, zero suspicion
    with open(trainer.export_dropped(tmp_path / "none.csv")) as handle:
        assert handle.read().startswith("row,label,suspicion")
    assert len(trainer.dropped_dataset()) == 0
    assert trainer.suspicion_scores() == [0.0] * 40
