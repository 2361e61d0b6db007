"""The benchmark's report: aggregation, pairing against the undefended and clean runs, the machines, the files."""

import json
import math

import pytest
import torch
from test_benchmark import _record

from hf_epic.experiments.report import _p_value, machines, summarize, write_report
from hf_epic.experiments.scoring import target_margins
from hf_epic.machine import describe_machine, machine_fingerprint


def test_summarize_pools_asr_and_averages_the_rest():
    records = [
        _record(0, "gradient_matching", "none", 1, 1, 0.80),
        _record(1, "gradient_matching", "none", 0, 1, 0.90),
        _record(2, "gradient_matching", "none", 1, 1, 0.70),
        _record(0, "badnets", "epic-0.2", 30, 40, 0.5, poisons_dropped=4, recall=0.4),
        _record(1, "badnets", "epic-0.2", 10, 60, 0.7, poisons_dropped=8, recall=0.8),
        _record(0, "gradient_matching", "epic-0.2", 0, 1, 0.75),
    ]
    rows = summarize(records)
    # ordered by ATTACKS then DEFENSES
    assert [(r["attack"], r["defense"]) for r in rows] == [
        ("gradient_matching", "none"),
        ("gradient_matching", "epic-0.2"),
        ("badnets", "epic-0.2"),
    ]
    gm = rows[0]
    assert gm["trials"] == 3 and gm["attack_success_rate"] == pytest.approx(2 / 3)
    assert gm["clean_accuracy"] == pytest.approx(0.8) and gm["clean_accuracy_std"] == pytest.approx(0.1)
    bd = rows[2]
    assert bd["attack_success_rate"] == pytest.approx(40 / 100)  # pooled, not the mean of 0.75 and 1/6
    assert math.isnan(bd["target_margin"]) and math.isnan(gm["target_margin"])  # none recorded
    records[0]["target_margins"], records[1]["target_margins"] = [1.5], [-0.5]
    assert summarize(records)[0]["target_margin"] == pytest.approx(0.5)  # the third record has none
    assert bd["poisons_dropped"] == pytest.approx(6) and bd["poison_recall"] == pytest.approx(0.6)


def test_successes_beyond_the_matching_clean_run_are_paired_by_trial(tmp_path):
    def targeted(trial, defense, prediction, margin):
        return _record(
            trial,
            "gradient_matching",
            defense,
            int(prediction == 3),
            1,
            0.9,
            attack_kind="targeted",
            poison_class=3,
            target_predictions=[prediction],
            target_margins=[margin],
        )

    records = [
        targeted(0, "none", 3, 2.0),
        targeted(1, "none", 3, 1.0),
        targeted(2, "none", 3, 3.0),
        targeted(0, "clean-control", 1, -4.0),
        targeted(1, "clean-control", 3, 0.5),
        targeted(2, "clean-control", 1, -2.0),
        targeted(0, "epic-0.2", 3, 1.0),
        targeted(1, "epic-0.2", 1, -1.0),
        targeted(2, "epic-0.2", 3, 0.5),
        targeted(0, "clean-epic-0.2", 3, 0.2),
        targeted(1, "clean-epic-0.2", 1, -3.0),  # trial 2 not run
        targeted(0, "random", 3, 1.0),
    ]
    rows = {r["defense"]: r for r in summarize(records)}
    # none: trials 0 and 2 succeed where the clean control did not; trial 1 the control already flipped
    assert (
        rows["none"]["control"],
        rows["none"]["successes_beyond_control"],
        rows["none"]["control_paired"],
    ) == (
        "clean-control",
        2,
        3,
    )
    # epic-0.2: trial 0's success is EPIC's own (clean-epic-0.2 flips it too); trial 2 has no clean run
    assert (rows["epic-0.2"]["successes_beyond_control"], rows["epic-0.2"]["control_paired"]) == (0, 2)
    assert rows["random"]["control"] is None and rows["clean-control"]["control"] is None
    # against none, trial by trial: epic-0.2 saves trial 1's target and loses none (p = 2 / 2^1 = 1)
    epic = rows["epic-0.2"]
    assert (epic["vs_none_paired"], epic["vs_none_saved"], epic["vs_none_lost"]) == (3, 1, 0)
    assert epic["vs_none_p"] == pytest.approx(1.0)
    # clean-control: trials 0 and 2 are the poisons' (p = 2 * 1/4 = 0.5); random ran trial 0 only
    assert (rows["clean-control"]["vs_none_saved"], rows["clean-control"]["vs_none_p"]) == (2, 0.5)
    assert (rows["random"]["vs_none_paired"], rows["random"]["vs_none_saved"]) == (1, 0)
    assert rows["none"]["vs_none_paired"] == 0 and rows["none"]["vs_none_p"] is None
    # 95 % Wilson interval of 3/3 (targeted): n / (n + z^2) = 3 / 6.8415 = 0.43850 to 1
    assert (
        rows["none"]["asr_ci_low"] == pytest.approx(0.43850, abs=1e-5) and rows["none"]["asr_ci_high"] == 1.0
    )
    markdown = write_report(records, tmp_path)["markdown"].read_text()
    assert "| gradient_matching | none | 3 | 100.0 (3/3; 43.9-100.0) |" in markdown
    assert "| gradient_matching | epic-0.2 | 3 | 1 | 0 | 1.000 |" in markdown
    assert "| gradient_matching | clean-control | 3 | 2 | 0 | 0.500 |" in markdown
    assert _p_value(2 / 4096) == "4.9e-04" and _p_value(0.0625) == "0.062"
    assert "| gradient_matching | none | clean-control | 66.7 (2/3) | +2.00 | -1.83 |" in markdown
    assert "| gradient_matching | epic-0.2 | clean-epic-0.2 | 0.0 (0/2) | +0.17 | -1.40 |" in markdown
    # backdoor records are not paired
    backdoor = [_record(0, "badnets", "none", 9, 10, 0.8), _record(0, "badnets", "clean-control", 1, 10, 0.8)]
    assert summarize(backdoor)[0]["control"] is None
    assert math.isnan(summarize(backdoor)[0]["asr_ci_low"]) and summarize(backdoor)[1]["vs_none_paired"] == 0


def test_target_margins_are_the_poison_logit_over_the_best_other():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 1.0, 0.5], [1.0, 1.0, 1.0]])
    # poison class 1: row 0 is in it by 1.0; row 1 misses it by 2.0; a tie is a margin of 0
    assert target_margins(logits, 1) == pytest.approx([1.0, -2.0, 0.0])
    assert [m > 0 for m in target_margins(logits, 0)] == [False, True, False]


def test_drops_by_round_are_shares_of_the_trials_poisons_and_clean_rows(tmp_path):
    def dropped(trial, defense, epochs, poisons, per_class, **extra):
        return _record(
            trial,
            "gradient_matching",
            defense,
            0,
            1,
            0.9,
            num_rows=110,
            round_epochs=epochs,
            poisons_dropped_per_round=poisons,
            rounds_per_class=per_class,
            **extra,
        )

    records = [
        # 10 poisons and 100 clean rows per trial
        dropped(0, "epic-0.2", [2, 4], [4, 1], [{"0": 10, "1": 4}, {"1": 3}]),
        dropped(1, "epic-0.2", [2, 4], [2, 0], [{"0": 22}, {}]),
        dropped(0, "clean-epic-0.2", [2], [0], [{"0": 5}], num_poisons=0),
        _record(0, "gradient_matching", "none", 1, 1, 0.9),
        # written before the per-round poison counts: not counted
        _record(2, "gradient_matching", "epic-0.2", 0, 1, 0.9, round_epochs=[2], rounds_per_class=[{"0": 9}]),
    ]
    rows = {r["defense"]: r for r in summarize(records)}
    epic = rows["epic-0.2"]["drops_by_round"]
    assert [d["epoch"] for d in epic] == [2, 4]
    assert rows["epic-0.2"]["drops_by_round_trials"] == 2  # the record without per-round counts is left out
    # epoch 2: poisons 4/10 and 2/10, clean (14-4)/100 and (22-2)/100; epoch 4: 1/10 and 0, 2/100 and 0
    assert epic[0]["poisons"] == pytest.approx(0.3) and epic[0]["clean"] == pytest.approx(0.15)
    assert epic[1]["poisons"] == pytest.approx(0.05) and epic[1]["clean"] == pytest.approx(0.01)
    clean = rows["clean-epic-0.2"]["drops_by_round"]
    assert math.isnan(clean[0]["poisons"]) and clean[0]["clean"] == pytest.approx(5 / 110)
    assert rows["none"]["drops_by_round"] == []
    markdown = write_report(records, tmp_path)["markdown"].read_text()
    # the record without per-round poison counts is left out of the count
    assert "| round after epoch | epic-0.2 (n = 2) | clean-epic-0.2 (n = 1) |" in markdown
    assert "| 2 | 30.0 / 15.0 | - / 4.5 |" in markdown
    assert "| 4 | 5.0 / 1.0 |  |" in markdown


def test_report_names_the_machines_and_warns_when_a_folder_mixes_them(tmp_path):
    avx512 = {"device": "cpu", "cpu": "CPU A", "cpu_capability": "AVX512", "torch": "2.14.1"}
    avx2 = {**avx512, "cpu": "CPU B", "cpu_capability": "AVX2"}
    records = [
        _record(0, "badnets", "none", 9, 10, 0.8, machine=avx512),
        _record(0, "badnets", "epic-0.2", 1, 10, 0.78, machine=avx512),
        _record(1, "badnets", "none", 8, 10, 0.8, machine=avx2),
        _record(2, "badnets", "none", 7, 10, 0.8),  # written before records named their machine
    ]
    assert machines(records) == [
        {"machine": avx512, "cells": 2},
        {"machine": avx2, "cells": 1},
        {"machine": None, "cells": 1},
    ]
    paths = write_report(records, tmp_path)
    markdown = paths["markdown"].read_text()
    assert "the cells come from 3 kinds of machine" in markdown
    assert "- 2 cells: cpu: CPU A (AVX512), torch 2.14.1" in markdown
    assert "- 1 cell: cpu: CPU B (AVX2), torch 2.14.1" in markdown
    assert "- 1 cell: not recorded (older cells)" in markdown
    assert json.loads(paths["json"].read_text())["machines"] == machines(records)
    # one kind of machine: named once, no warning
    markdown = write_report(records[:2], tmp_path)["markdown"].read_text()
    assert "Machine: cpu: CPU A (AVX512), torch 2.14.1." in markdown and "kinds of machine" not in markdown


def test_machine_fingerprint_names_what_decides_the_numbers():
    fingerprint = machine_fingerprint()
    assert fingerprint["torch"] == torch.__version__
    assert fingerprint["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert fingerprint["device"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    assert fingerprint["cpu"] and all(isinstance(v, str) for v in fingerprint.values())
    assert json.loads(json.dumps(fingerprint)) == fingerprint
    assert fingerprint["cpu_capability"] in describe_machine(fingerprint)
    fingerprint["cpu"] = "changed by a caller"
    assert machine_fingerprint()["cpu"] != "changed by a caller"  # a copy: records cannot alter the cache


def test_write_report_writes_markdown_json_and_png(tmp_path):
    records = [_record(0, "badnets", "none", 9, 10, 0.8), _record(0, "badnets", "epic-0.2", 1, 10, 0.78)]
    paths = write_report(records, tmp_path, {"dataset": "digits", "epochs": 3})
    markdown = paths["markdown"].read_text()
    assert "| badnets | none | 1 | 90.0 (9/10) | 80.0 ± 0.0 |" in markdown
    assert "| badnets | epic-0.2 | 1 | 10.0 (1/10) | 78.0 ± 0.0 |" in markdown
    assert "dataset=digits" in markdown
    payload = json.loads(paths["json"].read_text())
    assert payload["config"]["epochs"] == 3 and len(payload["records"]) == 2
    assert payload["summary"][0]["attack_success_rate"] == pytest.approx(0.9)
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
