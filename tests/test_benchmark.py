"""The benchmark: config checks, the JSONL store, the report, and a resumable end-to-end run."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import load_script

from hf_epic.experiments.args import BenchmarkConfig
from hf_epic.experiments.benchmark import (
    RESULTS_FILE,
    ResultStore,
    cell_key,
    craft_or_load,
    run_benchmark,
    run_cell,
    train_seed,
)
from hf_epic.experiments.data import load_splits
from hf_epic.experiments.models import model_transform
from hf_epic.experiments.poisons import DIGITS_ATTACK_KWARGS, HARD_DIGITS_ATTACK_KWARGS
from hf_epic.machine import describe_machine, machine_fingerprint

REPO = Path(__file__).resolve().parents[1]


def _record(trial, attack, defense, success, evaluated, accuracy, **extra):
    record = {
        "key": cell_key(trial, attack, defense),
        "trial": trial,
        "attack": attack,
        "defense": defense,
        "num_success": success,
        "num_evaluated": evaluated,
        "asr": success / evaluated,
        "clean_accuracy": accuracy,
        "num_poisons": 10,
        "poisons_dropped": 0,
        "recall": 0.0,
        "clean_dropped": 0,
        "clean_dropped_fraction": 0.0,
        "wall_seconds": 2.0,
    }
    record.update(extra)
    return record


def test_config_rejects_bad_settings_before_training():
    with pytest.raises(ValueError, match="baseline_reference"):
        BenchmarkConfig(baseline_reference="random")
    with pytest.raises(ValueError, match="model"):
        BenchmarkConfig(model_kind="resnet50")
    with pytest.raises(ValueError, match="unknown attacks"):
        BenchmarkConfig(attack_kwargs={"witches_brew": {}})
    with pytest.raises(ValueError, match="num_train_epochs"):
        BenchmarkConfig(num_train_epochs=0)
    with pytest.raises(ValueError, match="sgd"):
        BenchmarkConfig(optimizer="adam")
    with pytest.raises(ValueError, match="epic_stop_epoch"):
        BenchmarkConfig(epic_start_epoch=4, epic_stop_epoch=4)
    with pytest.raises(ValueError, match="attack_kwargs"):
        BenchmarkConfig(attack_kwargs={"badnets": 0.05})
    with pytest.raises(ValueError, match="epic_embedding"):
        BenchmarkConfig(epic_embedding="features")
    with pytest.raises(ValueError, match="epic_metric"):
        BenchmarkConfig(epic_metric="manhattan")
    with pytest.raises(ValueError, match="epic_cluster_threshold"):
        BenchmarkConfig(epic_cluster_threshold=0)
    with pytest.raises(ValueError, match="digits_renders"):
        BenchmarkConfig(digits_renders=0)
    with pytest.raises(ValueError, match="attack_seed_offset"):
        BenchmarkConfig(attack_seed_offset="1000000")


def test_digits_renders_reaches_the_loaded_training_split():
    config = BenchmarkConfig(image_size=8, digits_renders=2)
    splits = load_splits(config, config.seed)
    assert splits["train"].num_rows == 2 * 1438 and splits["test"].num_rows == 359


def test_offline_attack_arguments_apply_to_digits_only_and_are_a_copy():
    config = BenchmarkConfig()
    assert config.dataset_name == "digits" and config.attack_kwargs == DIGITS_ATTACK_KWARGS
    assert config.attack_kwargs["gradient_matching"]["epsilon"] == pytest.approx(64 / 255)
    assert config.attack_kwargs["bullseye_polytope"] == {"target_pool_fraction": 0.02}
    assert (
        config.attack_kwargs["sleeper_agent"]["source_class"],
        config.attack_kwargs["sleeper_agent"]["poison_class"],
    ) == (7, 2)
    config.attack_kwargs["gradient_matching"]["budget"] = 0.5  # must not leak into the next config
    assert BenchmarkConfig().attack_kwargs["gradient_matching"]["budget"] == 0.01
    # the hard digits have their own gradient-matching preset (24/255, the 10 % lowest-margin pool)
    hard = BenchmarkConfig(digits_variant="hard", image_size=32, num_channels=3)
    assert hard.attack_kwargs == HARD_DIGITS_ATTACK_KWARGS
    assert hard.attack_kwargs["gradient_matching"]["epsilon"] == pytest.approx(24 / 255)
    assert hard.attack_kwargs["gradient_matching"]["target_pool_fraction"] == 0.1
    hard.attack_kwargs["gradient_matching"]["restarts"] = 9
    assert HARD_DIGITS_ATTACK_KWARGS["gradient_matching"]["restarts"] == 2
    # other datasets get each attack's own defaults; an explicit dict (even empty) is kept as given
    assert BenchmarkConfig(dataset_name="cifar10").attack_kwargs == {}
    assert BenchmarkConfig(attack_kwargs={}).attack_kwargs == {}
    assert BenchmarkConfig().to_dict()["attack_kwargs"] == DIGITS_ATTACK_KWARGS  # recorded, JSON-ready


def test_run_benchmark_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="Unknown defenses"):
        run_benchmark(
            BenchmarkConfig(), trials=[0], attacks=["badnets"], defenses=["epic"], output_dir=tmp_path
        )
    with pytest.raises(ValueError, match="Unknown attacks"):
        run_benchmark(
            BenchmarkConfig(), trials=[0], attacks=["mixup"], defenses=["none"], output_dir=tmp_path
        )
    assert not (tmp_path / RESULTS_FILE).exists()


def test_result_store_ignores_a_torn_line_and_appends_after_it(tmp_path):
    path = tmp_path / RESULTS_FILE
    first = _record(0, "badnets", "none", 9, 10, 0.8)
    path.write_text(json.dumps(first) + "\n" + '{"key": "trial=0|attack=badnets|defense=epic-0.2", "asr"')
    store = ResultStore(path)
    assert list(store.records) == [first["key"]]
    second = _record(0, "badnets", "epic-0.2", 1, 10, 0.79)
    store.append(second)
    reread = ResultStore(path)
    assert set(reread.records) == {first["key"], second["key"]}
    assert reread.get(second["key"])["num_success"] == 1


def test_report_includes_cells_another_process_appended_meanwhile(tmp_path):
    # two processes on disjoint trials share one folder: the report must hold both processes' cells
    config = BenchmarkConfig(**SMALL)
    out = tmp_path / "bench"
    ResultStore(out / RESULTS_FILE).append(_record(0, "badnets", "none", 1, 2, 0.9))

    def other_process_finishes(line):  # called while this run goes over its (already finished) cells
        ResultStore(out / RESULTS_FILE).append(_record(1, "badnets", "none", 0, 2, 0.8))

    records = run_benchmark(
        config, trials=[0], attacks=["badnets"], defenses=["none"], output_dir=out, log=other_process_finishes
    )
    assert sorted(r["trial"] for r in records) == [0, 1]
    assert "| badnets | none | 2 | 25.0 (1/4) |" in (out / "results.md").read_text()


def _benchmark_cli():
    return load_script("recipes/benchmark.py")


SMALL = dict(
    max_train_rows=200,
    max_eval_rows=100,
    image_size=16,
    num_train_epochs=2,
    epic_start_epoch=1,
    epic_interval=1,
)


def test_end_to_end_badnets_resumes_and_skips_finished_cells(tmp_path, capsys):
    config = BenchmarkConfig(**SMALL)
    out = tmp_path / "bench"
    # 1) a run that "was interrupted" after the undefended cell
    first = run_benchmark(config, trials=[0], attacks=["badnets"], defenses=["none"], output_dir=out)
    assert [r["defense"] for r in first] == ["none"]
    none = first[0]
    spec = json.loads((out / "poisons" / "badnets" / "trial_000" / "poison_spec.json").read_text())
    assert none["attack_kind"] == "backdoor" and none["poison_class"] == spec["poison_class"]
    assert none["num_poisons"] == len(spec["poison_indices"]) == round(spec["budget"] * 200) > 0
    assert none["num_dropped"] == 0 and none["poisons_dropped"] == 0
    assert none["machine"] == machine_fingerprint()  # which kind of machine computed this cell
    assert 0.0 <= none["clean_accuracy"] <= 1.0 and none["num_evaluated"] > 0
    # an interrupt in the middle of writing leaves a torn line; it must not cost the finished cell
    with open(out / RESULTS_FILE, "a") as handle:
        handle.write('{"key": "trial=0|attack=badnets|defense=epic-0.2", "asr": 0.')
    capsys.readouterr()

    # 2) the rerun asks for more: only the missing cell trains, the finished one is kept as it was
    records = run_benchmark(
        config,
        trials=[0],
        attacks=["badnets"],
        defenses=["none", "epic-0.2", "clean-control", "clean-epic-0.2"],
        output_dir=out,
    )
    log = capsys.readouterr().out
    assert "skip   trial=0 attack=badnets defense=none" in log
    assert "done   trial=0 attack=badnets defense=epic-0.2" in log
    assert "defense=none:" not in log
    by_defense = {r["defense"]: r for r in records}
    assert set(by_defense) == {"none", "epic-0.2", "clean-control", "clean-epic-0.2"}
    control = by_defense["clean-control"]  # trained without poisons, scored on the same triggered images
    assert control["num_poisons"] == 0 and control["num_dropped"] == 0
    assert (
        control["num_evaluated"] == none["num_evaluated"] and control["poison_class"] == none["poison_class"]
    )
    clean_epic = by_defense["clean-epic-0.2"]  # EPIC-0.2's rounds, on the clean set
    assert clean_epic["num_poisons"] == 0 and clean_epic["num_rows"] == 200
    assert clean_epic["num_dropped"] > 0 and clean_epic["round_epochs"] == [1]
    assert clean_epic["num_evaluated"] == none["num_evaluated"]
    assert by_defense["none"] == none
    epic = by_defense["epic-0.2"]
    assert epic["num_dropped"] > 0 and len(epic["rounds_per_class"]) == 1 and epic["round_epochs"] == [1]
    assert epic["poisons_dropped"] + epic["clean_dropped"] == epic["num_dropped"]
    # the poisoned set was crafted once and reused
    assert (out / "poisons" / "badnets" / "trial_000" / "craft.json").exists()
    markdown = (out / "results.md").read_text()
    assert "| badnets | none | 1 |" in markdown and "| badnets | epic-0.2 | 1 |" in markdown
    assert f"Machine: {describe_machine(machine_fingerprint())}." in markdown

    # 3) the command line over the finished grid trains nothing and rewrites the report
    argv = [
        "--trials",
        "1",
        "--attacks",
        "badnets",
        "--defenses",
        "none",
        "epic-0.2",
        "--output_dir",
        str(out),
    ]
    argv += [
        "--max_train_rows",
        "200",
        "--max_eval_rows",
        "100",
        "--image_size",
        "16",
        "--num_train_epochs",
        "2",
    ]
    argv += ["--epic_start_epoch", "1", "--epic_interval", "1"]
    assert _benchmark_cli().main(argv) == 0
    log = capsys.readouterr().out
    assert log.count("skip   ") == 2 and "done   " not in log
    assert "| badnets | epic-0.2 | 1 |" in log

    # 4) other settings in the same folder are refused before any training
    with pytest.raises(ValueError, match="num_train_epochs"):
        run_benchmark(
            BenchmarkConfig(**{**SMALL, "num_train_epochs": 3}),
            trials=[0],
            attacks=["badnets"],
            defenses=["none"],
            output_dir=out,
        )
    with pytest.raises(ValueError, match="epic_metric"):
        run_benchmark(
            BenchmarkConfig(**{**SMALL, "epic_metric": "cosine"}),
            trials=[0],
            attacks=["badnets"],
            defenses=["none"],
            output_dir=out,
        )
    # a folder written before a setting existed had that setting's default: it still resumes
    stored = json.loads((out / "harness_config.json").read_text())
    for key in ("epic_embedding", "epic_metric", "epic_cluster_threshold"):
        stored.pop(key)
    (out / "harness_config.json").write_text(json.dumps(stored))
    resumed = run_benchmark(config, trials=[0], attacks=["badnets"], defenses=["none"], output_dir=out)
    assert resumed == records


def test_epic_options_reach_the_trainer(tmp_path):
    dropped = {}
    for threshold in (1, 2):
        config = BenchmarkConfig(**{**SMALL, "epic_stop_epoch": 2, "epic_cluster_threshold": threshold})
        splits = load_splits(config, config.seed)
        poisoned, spec, _ = craft_or_load("badnets", 0, splits, config, tmp_path / "poisons")
        record = run_cell(
            0, "badnets", "epic-0.2", poisoned, spec, splits["test"], config, tmp_path / str(threshold)
        )
        assert record["round_epochs"] == [1]
        # the per-round poison counts add up to the poisons dropped (dropping is cumulative)
        assert sum(record["poisons_dropped_per_round"]) == record["poisons_dropped"]
        assert len(record["poisons_dropped_per_round"]) == 1
        dropped[threshold] = record["num_dropped"]
    # the same model at the same round: clusters of up to two rows include the isolated ones
    assert dropped[2] > dropped[1] > 0


def test_drop_rule_defenses_run_epic_under_their_rule(tmp_path):
    """epic-0.2-persistent / epic-0.2-ranked train EPIC-0.2 under that drop rule (the state records it);
    the reference rule drops every isolated row, the others a subset of the same round's isolated rows."""
    config = BenchmarkConfig(**{**SMALL, "epic_stop_epoch": 2})
    splits = load_splits(config, config.seed)
    poisoned, spec, _ = craft_or_load("badnets", 0, splits, config, tmp_path / "poisons")
    rounds = {}
    for defense in ("epic-0.2", "epic-0.2-persistent", "epic-0.2-ranked"):
        run_cell(0, "badnets", defense, poisoned, spec, splits["test"], config, tmp_path / defense)
        rounds[defense] = json.loads((tmp_path / defense / "epic_state.json").read_text())["rounds"]
    assert [r["drop_rule"] for r in rounds["epic-0.2"]] == ["first_isolation"]
    assert [r["drop_rule"] for r in rounds["epic-0.2-persistent"]] == ["persistent"]
    assert [r["drop_rule"] for r in rounds["epic-0.2-ranked"]] == ["ranked"]
    # one round, same model: the same isolated rows; persistence needs two rounds, so nothing is dropped yet
    isolated = set(rounds["epic-0.2"][0]["isolated_rows"])
    assert isolated and set(rounds["epic-0.2-persistent"][0]["isolated_rows"]) == isolated
    assert set(rounds["epic-0.2"][0]["newly_dropped"]) == isolated
    assert rounds["epic-0.2-persistent"][0]["newly_dropped"] == []
    # ranked: at most ceil(0.005 * ~20 rows) = 1 row of each class per round, among the isolated ones
    ranked = rounds["epic-0.2-ranked"][0]["newly_dropped"]
    labels = poisoned["label"]
    assert ranked and set(ranked) <= isolated
    assert len({labels[i] for i in ranked}) == len(ranked)
    # benchmarks/replay_drop_rules.py replays a rule on a recorded run's evidence: on the reference run,
    # the reference rule gives its recorded drops, and the ranked rule the ranked run's first round
    replay = load_script("benchmarks/replay_drop_rules.py")
    state = json.loads((tmp_path / "epic-0.2" / "epic_state.json").read_text())
    labels = torch.tensor(labels)
    assert replay.replay(state, labels, "first_isolation", {}) == set(state["dropped"])
    assert replay.replay(state, labels, "ranked", {"rank_share": 0.005}) == set(ranked)
    assert replay.replay(state, labels, "persistent", {"persistence": 2}) == set()


def test_training_pass_embeddings_reach_the_benchmark_cells(tmp_path):
    """--epic_embedding_source training_pass: EPIC and a baseline at its counts take the embeddings from
    the training forward pass (the run's state says so), and the cell records its drops."""
    config = BenchmarkConfig(**{**SMALL, "epic_stop_epoch": 3, "epic_embedding_source": "training_pass"})
    splits = load_splits(config, config.seed)
    poisoned, spec, _ = craft_or_load("badnets", 0, splits, config, tmp_path / "poisons")
    schedule = None
    for defense in ("epic-0.2", "low-confidence"):
        record = run_cell(
            0, "badnets", defense, poisoned, spec, splits["test"], config, tmp_path / defense, schedule
        )
        assert record["num_dropped"] > 0
        schedule = [{int(c): n for c, n in r.items()} for r in record["rounds_per_class"]]
        state = json.loads((tmp_path / defense / "epic_state.json").read_text())
        assert {r["embedding_source"] for r in state["rounds"]} == {"training_pass"}
        assert all(r["recorded_rows"] > 0 for r in state["rounds"])


def test_attack_seed_offset_reseeds_the_attack_but_not_the_victim(tmp_path):
    specs = {}
    for offset in (0, 1000000):
        config = BenchmarkConfig(**{**SMALL, "attack_seed_offset": offset})
        splits = load_splits(config, config.seed)
        _, specs[offset], _ = craft_or_load("badnets", 3, splits, config, tmp_path / str(offset))
        # the victim's training seed is the trial's, whatever the attack's
        assert train_seed(config, 3) == 3
    assert specs[0].seed == 3
    assert specs[1000000].seed == 1000003
    # another seed draws other poison rows
    assert specs[0].poison_indices != specs[1000000].poison_indices


def test_cli_parses_trial_selections():
    cli = _benchmark_cli()

    def parse(*argv):
        grid, config = cli.build_parser().parse_args_into_dataclasses(args=list(argv))
        return grid, config

    assert parse("--trials", "3")[0].trial_numbers == [0, 1, 2]
    assert parse("--trials", "2-4")[0].trial_numbers == [2, 3, 4]
    assert parse("--trials", "0,5")[0].trial_numbers == [0, 5]
    _, config = parse("--attack_kwargs", '{"badnets": {"budget": 0.05}}')
    assert config.attack_kwargs == {"badnets": {"budget": 0.05}}
    _, config = parse("--optimizer", "sgd", "--weight_decay", "0.1", "--epic_stop_epoch", "6")
    assert (config.optimizer, config.weight_decay, config.epic_stop_epoch) == ("sgd", 0.1, 6)
    grid, config = parse()
    assert config.attack_kwargs == DIGITS_ATTACK_KWARGS and config.epic_stop_epoch is None
    _, config = parse("--epic_embedding", "last_layer_grad", "--epic_metric", "cosine")
    assert (config.epic_embedding, config.epic_metric, config.epic_cluster_threshold) == (
        "last_layer_grad",
        "cosine",
        1,
    )
    assert parse("--attack_seed_offset", "1000000")[1].attack_seed_offset == 1000000
    # every BenchmarkConfig setting has its flag, with the config's default
    defaults = parse()[1]
    for field in dataclasses.fields(BenchmarkConfig):
        if field.name != "attack_kwargs":
            assert getattr(defaults, field.name) == field.default, field.name
    # the grid's choices are the registries'
    from hf_epic.attacks import attack_names
    from hf_epic.experiments.defenses import defense_names

    assert grid.attacks == list(attack_names()) and grid.defenses == list(defense_names())
    with pytest.raises(SystemExit):
        parse("--epic_stop_epoch", "ten")
    with pytest.raises(SystemExit):
        parse("--defenses", "epic")
    with pytest.raises(ValueError, match="--trials"):
        parse("--trials", "a-b")
    with pytest.raises(ValueError, match="attack_kwargs is not valid JSON"):
        parse("--attack_kwargs", "{badnets")


def test_epic_stop_ends_the_rounds(tmp_path):
    rounds = {}
    for stop in (None, 2):
        config = BenchmarkConfig(**{**SMALL, "num_train_epochs": 3, "epic_stop_epoch": stop})
        splits = load_splits(config, config.seed)
        poisoned, spec, _ = craft_or_load("badnets", 0, splits, config, tmp_path / "poisons")
        record = run_cell(
            0, "badnets", "epic-0.2", poisoned, spec, splits["test"], config, tmp_path / str(stop)
        )
        rounds[stop] = record["round_epochs"]
    assert rounds == {None: [1, 2], 2: [1]}


def test_a_saved_dataset_dict_with_other_column_names_loads_like_a_hub_dataset(tmp_path):
    import datasets
    import numpy as np

    features = datasets.Features(
        {
            "img": datasets.Image(),
            "fine_label": datasets.ClassLabel(num_classes=3),
            "note": datasets.Value("string"),
        }
    )
    rng = np.random.default_rng(0)

    def split(n):
        return datasets.Dataset.from_dict(
            {
                "img": [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(n)],
                "fine_label": [i % 3 for i in range(n)],
                "note": ["x"] * n,
            },
            features=features,
        )

    datasets.DatasetDict(train=split(12), test=split(6)).save_to_disk(str(tmp_path / "local"))
    config = BenchmarkConfig(dataset_name=str(tmp_path / "local"), max_train_rows=10, num_channels=3)
    loaded = load_splits(config, config.seed)
    assert loaded["train"].column_names == ["image", "label"] and len(loaded["train"]) == 10
    assert len(loaded["test"]) == 6 and loaded["test"].features["label"].num_classes == 3


def test_backdoors_get_seeded_distinct_poison_and_source_classes():
    from hf_epic.attacks import AttackSettings
    from hf_epic.experiments.poisons import draw_classes

    @dataclasses.dataclass
    class NeedsBoth:
        """Settings of an attack that requires both classes."""

        poison_class: int
        source_class: int
        seed: int = 0

    required = NeedsBoth
    for seed in range(20):
        drawn = draw_classes(required, {"seed": seed}, 10)
        assert set(drawn) == {"poison_class", "source_class"}
        assert drawn["poison_class"] != drawn["source_class"]
        assert drawn == draw_classes(required, {"seed": seed}, 10)
    # a class the user gave is kept, and the source class avoids it
    assert all(
        draw_classes(required, {"seed": s, "poison_class": 4}, 10)["source_class"] != 4 for s in range(20)
    )
    assert draw_classes(AttackSettings, {"seed": 0}, 10) == {}  # the attack chooses its class itself


def test_transfer_attack_trains_only_a_new_head_on_the_cached_pretrained_features(tmp_path):
    from safetensors.torch import load_file

    from hf_epic.experiments.backbone import trial_backbone
    from hf_epic.experiments.poisons import victim_setting

    config = BenchmarkConfig(
        **{**SMALL, "backbone_epochs": 1, "attack_kwargs": {"bullseye_polytope": {"steps": 5}}}
    )
    assert victim_setting("bullseye_polytope", config.attack_kwargs) == "transfer"
    assert victim_setting("gradient_matching", config.attack_kwargs) == "scratch"
    assert victim_setting("sleeper_agent", config.attack_kwargs) == "scratch"
    finetune = BenchmarkConfig(**{**SMALL, "attack_kwargs": {"sleeper_agent": {"setting": "finetune"}}})
    assert victim_setting("sleeper_agent", finetune.attack_kwargs) == "finetune"
    with pytest.raises(ValueError, match="'transfer', 'finetune'"):
        victim_setting(
            "bullseye_polytope",
            BenchmarkConfig(attack_kwargs={"bullseye_polytope": {"setting": "scratch"}}).attack_kwargs,
        )
    splits = load_splits(config, config.seed)
    attacked = trial_backbone(splits["train"], config, train_seed(config, 0), tmp_path / "pretrained", 0)
    cached = load_file(str(tmp_path / "pretrained" / "trial_000" / "model.safetensors"))
    poisoned, spec, _ = craft_or_load(
        "bullseye_polytope", 0, splits, config, tmp_path / "poisons", model=attacked
    )
    assert spec.attack == "bullseye_polytope" and sum(poisoned["is_poison"]) == len(spec.poison_indices) > 0

    victim = trial_backbone(
        splits["train"], config, train_seed(config, 0), tmp_path / "pretrained", 0
    )  # from the cache
    record = run_cell(
        0, "bullseye_polytope", "epic-0.2", poisoned, spec, splits["test"], config, tmp_path / "run",
        initial_model=victim, setting="transfer",
    )  # fmt: skip
    assert record["setting"] == "transfer" and record["attack_kind"] == "targeted"
    # the recorded margin says the same as the prediction (> 0 exactly when the target is in the poison class)
    assert len(record["target_margins"]) == len(spec.target_indices)
    assert [m > 0 for m in record["target_margins"]] == [
        p == spec.poison_class for p in record["target_predictions"]
    ]
    # the backbone is exactly the pretrained one after training (weights and normalisation statistics)
    after = victim.state_dict()
    assert set(after) == set(cached) and all(torch.equal(after[k].cpu(), v) for k, v in cached.items())


def test_feature_probe_gives_the_same_logits_from_cached_features_and_from_images():
    from hf_epic.experiments.models import FeatureProbe
    from hf_epic.models import build_model

    config = BenchmarkConfig(**SMALL)
    splits = load_splits(config, config.seed)
    rows = splits["train"].select(range(40))
    torch.manual_seed(0)
    backbone = build_model("vit", 10, config.image_size, config.num_channels)
    probe = FeatureProbe(backbone)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    probe.train()  # the Trainer's call: the head trains, the backbone stays in eval mode (no dropout)
    assert probe.training and not backbone.training
    assert [p.requires_grad for p in probe.parameters()].count(True) == 2  # the head's weight and bias
    table = probe.features_dataset(rows, config.image_size, config.num_channels)
    assert table.column_names == [*[c for c in rows.column_names if c != "image"], "features"]
    batch = table[:40]
    from_features = probe(features=batch["features"], labels=torch.tensor(batch["label"]))
    pixels = torch.stack(
        rows.with_transform(model_transform(config.image_size, config.num_channels, augment=False))[:40][
            "pixel_values"
        ]
    )
    from_images = probe(pixel_values=pixels)
    torch.testing.assert_close(from_features.logits, from_images.logits)
    assert from_features.loss is not None and from_images.loss is None
    from_features.loss.backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    with pytest.raises(ValueError, match="features.*pixel_values"):
        probe()


def test_the_docstring_commands_parse():
    import shlex

    cli = _benchmark_cli()
    text = cli.__doc__.replace("\\\n", " ")
    commands = [shlex.split(line.strip()) for line in text.splitlines() if "recipes/benchmark.py" in line]
    assert len(commands) >= 5
    for words in commands:
        argv = words[words.index("recipes/benchmark.py") + 1 :]
        grid, config = cli.build_parser().parse_args_into_dataclasses(args=argv)
        assert grid.output_dir.startswith("bench_out/") and config.num_train_epochs >= 1
