"""The results pages are drawn from their committed records: regenerating them from the records gives the
committed text, and every cell's command resumes its folder (same settings)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from conftest import load_script

from hf_epic.attacks.registry import attack_names
from hf_epic.experiments.defenses import defense_names

ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def _page_module():
    return load_script("benchmarks/fashion_mnist_page.py")


def test_fashion_mnist_page_and_readme_table_are_drawn_from_the_records(tmp_path):
    page = _page_module()
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text())
    args = page.PageArguments(
        output_dir=str(ROOT / "docs/results/fashion_mnist"),
        page=str(tmp_path / "page.md"),
        readme=str(readme),
    )
    text = page.write_page(args)
    committed = (ROOT / "docs/results/fashion_mnist.md").read_text()
    # the page names its folders relative to the repository; here they were read from an absolute path
    assert text.replace(str(ROOT) + "/", "") == committed, (
        "docs/results/fashion_mnist.md is not what its records give: run "
        "`python benchmarks/fashion_mnist_page.py --report_only` and commit the result."
    )
    assert readme.read_text() == (ROOT / "README.md").read_text(), "README's results table is out of date."
    # the table is there, with a row per attack of every cell that has records
    assert "| transfer, 1 %, 16/255 | Bullseye Polytope |" in readme.read_text()


def test_the_demo_section_sums_its_seeds():
    lines = _page_module().demo_section(ROOT / "docs/results/fashion_mnist/demo")
    runs = [
        json.loads(p.read_text())["rows"]
        for p in sorted((ROOT / "docs/results/fashion_mnist/demo").glob("*.json"))
    ]
    epic = [next(r for r in rows if r["run"].startswith("EPIC")) for rows in runs]
    share = sum(r["rows_dropped"] for r in epic) / sum(r["num_rows"] for r in epic)
    total = lines[-1]
    assert total.startswith("| all |") and "{" not in total, total
    assert f"| {100 * share:.0f} % |" in total
    assert f"| {sum(r['poisons_dropped'] for r in epic)} of {sum(r['num_poisons'] for r in epic)} |" in total


def test_the_epic_sentence_compares_the_baselines_only_on_the_same_trials():
    page = _page_module()
    base = {"attack": "gradient_matching", "trials": 12, "clean_accuracy": 0.75, "vs_none_paired": 12,
            "vs_none_saved": 0, "vs_none_lost": 0, "vs_none_p": 1.0}  # fmt: skip
    rows = [
        {**base, "defense": "none", "attack_success_rate": 0.5, "poison_recall": 0.0, "clean_dropped_fraction": 0.0},
        {**base, "defense": "epic-0.2", "attack_success_rate": 0.5, "poison_recall": 0.15, "clean_dropped_fraction": 0.2},
        {**base, "defense": "random", "attack_success_rate": 0.25, "poison_recall": 0.3, "clean_dropped_fraction": 0.2},
    ]  # fmt: skip
    rows.append({**rows[2], "defense": "high-loss", "attack_success_rate": 0.125, "poison_recall": 0.45})
    (sentence,) = page.epic_summary(rows)
    assert "random / high-loss dropping at the same counts dropped 30 % / 45 % of the poisons" in sentence
    assert "attack success 25.0 % / 12.5 % (EPIC-0.2: 50.0 %)" in sentence
    rows[2]["trials"] = 6  # random not yet on every trial: left out
    assert "; high-loss dropping at the same counts dropped 45 %" in page.epic_summary(rows)[0]
    rows[3]["trials"] = 6
    assert "dropping at the same counts" not in page.epic_summary(rows)[0]


def test_the_attack_sentence_says_when_the_poisons_turned_too_few_targets_for_a_defense_to_show():
    page = _page_module()
    none = {
        "attack": "bullseye_polytope",
        "asr_successes": 7,
        "asr_evaluated": 12,
        "attack_success_rate": 7 / 12,
    }
    control = {"asr_successes": 2, "asr_evaluated": 12, "attack_success_rate": 2 / 12, "vs_none_paired": 12,
               "vs_none_saved": 5, "vs_none_lost": 0, "vs_none_p": 0.0625}  # fmt: skip
    text = page.attack_strength(none, control)
    assert "succeeded on 7 of 12 targets, against 2 of 12" in text
    assert "the poisons turned 5 targets, and 0 went the other way (McNemar p = 0.06)" in text
    assert "saving all 5 with none lost would give p = 0.06." in text
    strong = {**control, "asr_successes": 1, "vs_none_saved": 6, "vs_none_p": 0.03125}
    assert "Too few" not in page.attack_strength(none, strong)
    assert "saving it with none lost would give p = 1.00" in page.attack_strength(
        none, {**control, "vs_none_saved": 1}
    )
    backdoor = page.attack_strength(
        {"attack": "badnets", "attack_success_rate": 0.978},
        {"vs_none_paired": 0, "attack_success_rate": 0.021},
    )
    assert (
        backdoor.startswith("Undefended, 97.8 % of the triggered images")
        and "2.1 % with no poisons" in backdoor
    )
    assert "did not raise it" not in backdoor
    failed = page.attack_strength(
        {"attack": "sleeper_agent", "attack_success_rate": 0.017},
        {"vs_none_paired": 0, "attack_success_rate": 0.018},
    )
    assert failed.endswith("The poisons did not raise it: no defense's effect can show here.")


@pytest.mark.parametrize("name", list(_page_module().CELLS))
def test_every_cell_command_parses_and_resumes_its_folder(name, tmp_path):
    page = _page_module()
    grid, config = page.parse_cell(name, "12", "docs/results/fashion_mnist")
    assert grid.trial_numbers == list(range(12))
    assert set(grid.attacks) <= set(attack_names()) and set(grid.defenses) <= set(defense_names())
    stored = ROOT / grid.output_dir / "harness_config.json"
    if stored.is_file():  # a rerun of the command resumes the folder instead of refusing it
        assert json.loads(stored.read_text()) == json.loads(json.dumps(config.to_dict()))


@functools.cache
def _drop_rules_module():
    return load_script("benchmarks/drop_rules_page.py")


def test_drop_rules_page_is_drawn_from_the_records(tmp_path):
    page = _drop_rules_module()
    args = page.ScoringArguments(
        output_dir=str(ROOT / "docs/results/drop_rules"), page=str(tmp_path / "page.md")
    )
    text = page.write_page(args)
    assert text.replace(str(ROOT) + "/", "") == (ROOT / "docs/results/drop_rules.md").read_text(), (
        "docs/results/drop_rules.md is not what its records give: run "
        "`python benchmarks/drop_rules_page.py --report_only` and commit the result."
    )


@pytest.mark.parametrize("name", list(_drop_rules_module().SCORING))
def test_every_scoring_setting_is_its_grid_cell_on_unseen_trials(name):
    """A scoring command is its Fashion-MNIST cell's (same training, attack and EPIC schedule) on trials
    12-35, with the reference and the rules' defenses; it resumes its folder."""
    page = _drop_rules_module()
    scoring = page.SCORING[name]
    grid, config = page.parse_setting(name, "12-35", "docs/results/drop_rules")
    assert grid.trial_numbers == list(range(12, 36))
    assert grid.attacks == [scoring.attack] and {page.REFERENCE, *page.RULES} <= set(grid.defenses)
    _, cell_config = _page_module().parse_cell(scoring.cell, "12", "docs/results/fashion_mnist")
    ours, cells = config.to_dict(), cell_config.to_dict()
    assert ours["attack_seed_offset"] == 1_000_000  # the attacker's own seed, in every scoring setting
    differing = {k for k in ours if ours[k] != cells[k]} - {"attack_seed_offset"}
    assert differing == set(), f"{name} differs from cell {scoring.cell} in {differing}"
    stored = ROOT / grid.output_dir / "harness_config.json"
    if stored.is_file():
        assert json.loads(stored.read_text()) == json.loads(json.dumps(config.to_dict()))


def _record(trial: int, defense: str, hits: list[bool], clean_dropped: int, accuracy: float) -> dict:
    return {
        "trial": trial, "defense": defense, "attack_kind": "targeted", "poison_class": 3,
        "target_predictions": [3 if hit else 0 for hit in hits], "clean_dropped": clean_dropped,
        "clean_accuracy": accuracy,
    }  # fmt: skip


def test_a_rule_meets_the_bar_only_with_half_the_clean_drops_no_significant_loss_and_no_accuracy_cost():
    page = _drop_rules_module()
    rule = page.RULES[1]
    reference = [_record(t, page.REFERENCE, [t % 2 == 0], 100, 0.80) for t in range(12)]
    # same outcomes, 40 % of the clean drops, better accuracy: meets
    good = [_record(t, rule, [t % 2 == 0], 40, 0.81) for t in range(12)]
    verdict = page.against_reference(reference + good, rule)
    assert verdict == {**verdict, "trials": 12, "saved": 0, "lost": 0, "meets": True}
    assert verdict["clean_dropped_ratio"] == pytest.approx(0.4)
    # 60 % of the clean drops: fails on drops alone
    assert not page.against_reference(reference + [{**r, "clean_dropped": 60} for r in good], rule)["meets"]
    # lower clean accuracy: fails
    assert not page.against_reference(reference + [{**r, "clean_accuracy": 0.79} for r in good], rule)[
        "meets"
    ]
    # every target the reference saved is lost (6 of 6, p = 0.03): fails; lost on 2 only (p = 0.5): meets
    lost_all = [_record(t, rule, [True], 40, 0.81) for t in range(12)]
    assert page.against_reference(reference + lost_all, rule)["lost"] == 6
    assert not page.against_reference(reference + lost_all, rule)["meets"]
    lost_two = [_record(t, rule, [t % 2 == 0 or t < 4], 40, 0.81) for t in range(12)]
    assert page.against_reference(reference + lost_two, rule)["meets"]
    # a backdoor is compared per trial's triggered success rate
    backdoor = [
        {"trial": t, "defense": d, "attack_kind": "backdoor", "num_success": s, "num_evaluated": 100,
         "clean_dropped": c, "clean_accuracy": 0.8}
        for t in range(6) for d, s, c in ((page.REFERENCE, 90, 100), (rule, 95, 40))
    ]  # fmt: skip
    verdict = page.against_reference(backdoor, rule)
    assert (verdict["saved"], verdict["lost"]) == (0, 6) and not verdict["meets"]


def test_embedding_source_report_refuses_to_overwrite_the_comparison_without_its_run_folders(tmp_path):
    """The committed records lack the git-ignored run folders (the dropped rows); the report names them
    instead of writing an empty comparison over the committed one."""
    import shutil

    compare = load_script("benchmarks/compare_embedding_sources.py")
    source = ROOT / "docs/results/embedding_sources"
    for mode in ("eval_pass", "training_pass"):
        (tmp_path / mode).mkdir()
        shutil.copy(source / mode / "results.jsonl", tmp_path / mode / "results.jsonl")
    (tmp_path / "comparison.md").write_text("committed\n")
    with pytest.raises(FileNotFoundError, match="run folders .*runs/badnets.* are missing"):
        compare.report(tmp_path, list(range(12)), ["badnets", "gradient_matching"])
    assert (tmp_path / "comparison.md").read_text() == "committed\n"


def test_embedding_source_report_pairs_a_backdoor_trial_by_trial(tmp_path):
    """BadNets' two modes are paired per trial (sign test): the eval pass lower in all 6 trials gives
    p = 2 / 2**6; Jaccard from the run folders' dropped rows."""
    from hf_epic.experiments.benchmark import ResultStore

    compare = load_script("benchmarks/compare_embedding_sources.py")
    for mode, asr, dropped in (("eval_pass", 0.3, [1, 2, 3]), ("training_pass", 0.9, [2, 3, 4])):
        store = ResultStore(tmp_path / mode / "results.jsonl")
        for t in range(6):
            store.append({
                "key": f"trial={t}|attack=badnets|defense=epic-0.2", "attack_kind": "backdoor", "asr": asr,
                "clean_accuracy": 0.8, "poisons_dropped": 10, "clean_dropped": 5, "num_poisons": 50,
            })  # fmt: skip
            state = tmp_path / mode / "runs/badnets" / f"trial_{t:03d}" / "epic-0.2" / "epic_state.json"
            state.parent.mkdir(parents=True)
            state.write_text(json.dumps({"dropped": dropped}))
    compare.report(tmp_path, list(range(6)), ["badnets"])
    summary = json.loads((tmp_path / "comparison.json").read_text())["badnets"]
    assert summary["mcnemar_p"] == pytest.approx(2 / 2**6)
    assert summary["jaccard_mean"] == pytest.approx(0.5) and summary["trials"] == 6


def test_the_default_changes_only_for_a_rule_that_clears_the_bar_twice_and_loses_nowhere():
    page = _drop_rules_module()
    rule, other = page.RULES[1], page.RULES[0]
    ok = {"trials": 24, "saved": 1, "lost": 0, "p": 1.0, "meets": True}
    fails = {"trials": 24, "saved": 0, "lost": 0, "p": 1.0, "meets": False}
    worse = {"trials": 24, "saved": 0, "lost": 9, "p": 0.004, "meets": False}
    names = list(page.SCORING)  # three settings, three different attacks
    verdicts = {names[0]: {rule: ok, other: fails}, names[1]: {rule: ok, other: fails}}
    lines = page.decision(verdicts)
    assert lines[1].endswith("it qualifies to become the default.") and "default stays" in lines[0]
    verdicts[names[2]] = {rule: worse, other: fails}
    lines = page.decision(verdicts)
    assert "meets the bar in 2 of 3" in lines[1] and "so the default stays" in lines[1]
    assert f"{names[2]} (0 saved / 9 lost, p = 0.004)" in lines[1]
    # one attack is not enough
    assert "default stays" in page.decision({names[0]: {rule: ok, other: fails}})[1]


def test_the_scored_rule_settings_are_the_ones_the_replay_of_trials_0_to_11_chose():
    """epic-0.2-persistent / epic-0.2-ranked carry the settings the page says were chosen from choice.json."""
    from hf_epic.experiments.defenses import get_defense

    page = _drop_rules_module()
    tables = json.loads((ROOT / "docs/results/drop_rules/choice.json").read_text())
    assert {t["trials"] for t in tables} == {"0-11"} and all(t["runs"] == 12 for t in tables)
    chosen = page.chosen_settings(tables)
    for defense in page.RULES:
        settings = dict(get_defense(defense).epic_settings)
        rule = settings.pop("epic_drop_rule")
        options, _ = chosen[rule]
        assert {k.removeprefix("epic_drop_"): v for k, v in settings.items()} == options
