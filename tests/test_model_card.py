"""Model cards: rendered offline, written, read back with ModelCard.load, and kept through the
Trainer's card regeneration."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard
from test_plots import write_run

from hf_epic.model_card import (
    BLOCK_END,
    BLOCK_START,
    EPIC_TAGS,
    insert_epic_section,
    normalize_eval_results,
    render_model_card,
    update_model_card,
)

SPEC = {
    "attack": "gradient_matching",
    "poison_class": 2,
    "target_class": 4,
    "target_indices": [17],
    "trigger": None,
    "budget": 0.02,
    "epsilon": 8 / 255,
    "seed": 0,
    "poison_indices": [0, 1, 2, 3, 4, 5],
}
SECTIONS = [
    "## Trained with EPIC, a data-poisoning defense",
    "### What EPIC did",
    "#### Configuration",
    "#### Rows dropped per round",
    "#### Rows dropped per class",
    "### Attack in the training data",
    "### Evaluation",
    "### Plots",
    "### Intended use and limitations",
    "### Citation",
]


def metrics_of(card: ModelCard) -> dict[str, float]:
    """model-index metric type -> value."""
    return {r.metric_type: r.metric_value for r in card.data.eval_results or []}


def test_template_ships_inside_the_package() -> None:
    template = resources.files("hf_epic") / "templates" / "model_card.md"
    text = template.read_text(encoding="utf-8")
    assert BLOCK_START in text and BLOCK_END in text and "{{ card_data }}" in text


def test_rendered_card_round_trips_through_model_card_load(tmp_path: Path) -> None:
    state = write_run(tmp_path)
    plots = {"Rows dropped per round": "epic_plots/epic_dropped_per_round.png"}
    card = render_model_card(
        state,
        base_model="google/vit-base-patch16-224-in21k",
        dataset="hf-epic/digits-hard",
        eval_results={"eval_clean_accuracy": 0.912, "eval_attack_success_rate": 0.25, "eval_runtime": 3.0},
        plots=plots,
        attack=SPEC,
        model_name="vit-digits-epic",
        class_names={i: f"digit {i}" for i in range(5)},
        license="apache-2.0",
    )
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")

    data = loaded.data
    assert set(EPIC_TAGS) <= set(data.tags)
    assert data.base_model == "google/vit-base-patch16-224-in21k"
    assert data.datasets == ["hf-epic/digits-hard"]
    assert data.license == "apache-2.0" and data.pipeline_tag == "image-classification"
    assert data.model_name == "vit-digits-epic"
    assert metrics_of(loaded) == {"accuracy": 0.912, "attack_success_rate": 0.25}
    assert all(r.dataset_split == "test" for r in data.eval_results)

    text = loaded.text
    positions = [text.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    # the numbers come from the state: 3 rounds x (2 poisons + 3 clean) of 300 rows
    assert "dropped **15 of 300** training rows (5.0%)" in text
    assert "**6 poisons** of 6 (100.0% recall) and **9 clean rows**" in text
    assert "| 2 (digit 2) |" in text
    rows = [line for line in text.splitlines() if line.startswith("| 3 | 6 | 30 |")]
    assert rows == ["| 3 | 6 | 30 | 5 | 15 | 285 | 2 | 3 | 0.4 | 0.02 |"]
    assert "| `epic_fraction` | 0.2 |" in text
    assert "0.03137 (8/255)" in text and "`gradient_matching`" in text
    assert "| Clean accuracy | 0.9120 |" in text and "| Attack success rate | 0.2500 |" in text
    assert "runtime" not in text
    assert "![Rows dropped per round](epic_plots/epic_dropped_per_round.png)" in text
    assert "Yang, Yu and Liu, Tian Yu and Mirzasoleiman, Baharan" in text
    assert "pages     = {25154--25165}" in text and "volume    = {162}" in text


def test_card_without_poison_labels_or_rounds(tmp_path: Path) -> None:
    state = write_run(tmp_path, with_poisons=False)
    card = render_model_card(state, dataset="digits")
    assert "poisons dropped" not in card.text and "recall" not in card.text
    assert "### Attack in the training data" not in card.text
    assert "No evaluation results were recorded" in card.text
    assert card.data.eval_results is None and card.data.datasets is None  # "digits" is no Hub id

    empty = render_model_card({"version": 1, "num_rows": 50, "dropped": [], "config": {}, "rounds": []})
    assert "No selection round ran" in empty.text
    assert "#### Rows dropped per round" not in empty.text
    assert "### Citation" in empty.text


def test_local_base_model_is_named_but_not_put_in_metadata(tmp_path: Path) -> None:
    backbone = tmp_path / "backbone"
    backbone.mkdir()
    card = render_model_card(write_run(tmp_path), base_model=str(backbone))
    assert card.data.base_model is None
    assert f"fine-tuned from `{backbone}`" in card.text


def test_bad_inputs_name_the_problem(tmp_path: Path) -> None:
    state = write_run(tmp_path)
    with pytest.raises(TypeError, match="epic_state must be"):
        render_model_card([1, 2, 3])
    with pytest.raises(ValueError, match="relative to the card"):
        render_model_card(state, plots={"x": str(tmp_path / "abs.png")})
    with pytest.raises(TypeError, match="eval_results must map"):
        render_model_card(state, eval_results=[0.9])
    with pytest.raises(ValueError, match="No EPIC state"):
        render_model_card(tmp_path / "nowhere")


def test_normalize_eval_results() -> None:
    got = normalize_eval_results(
        {"eval_accuracy": 0.5, "test_attack_success_rate": 1, "eval_runtime": 2.0, "epoch": 3.0, "note": "x"}
    )
    assert got == {"accuracy": 0.5, "attack_success_rate": 1.0}


def test_insert_epic_section_replaces_instead_of_stacking() -> None:
    body = "\n# model\n\nintro\n\n## Model description\n\nmore\n"
    first = insert_epic_section(body, f"{BLOCK_START}\nA\n{BLOCK_END}\n")
    assert first.index("A") < first.index("## Model description") and first.index("intro") < first.index("A")
    second = insert_epic_section(first, f"{BLOCK_START}\nB\n{BLOCK_END}\n")
    assert second.count(BLOCK_START) == 1 and "B" in second and "\nA\n" not in second
    assert insert_epic_section("# t\n", f"{BLOCK_START}\nC\n{BLOCK_END}\n").endswith(f"{BLOCK_END}\n")


def _tiny_trainer(output_dir: Path):
    """A real Trainer on a tiny ViT, trained two steps and evaluated once."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from hf_epic.models import build_tiny_vit

    rng = np.random.default_rng(0)
    ds = Dataset.from_dict(
        {
            "pixel_values": rng.normal(size=(16, 1, 8, 8)).astype("float32").tolist(),
            "labels": rng.integers(0, 5, 16).tolist(),
        }
    ).with_format("torch")
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=8,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    model = build_tiny_vit(num_labels=5, image_size=8, num_channels=1)
    trainer = Trainer(model=model, args=args, train_dataset=ds, eval_dataset=ds)
    trainer.train()
    trainer.evaluate()
    return trainer


def test_section_survives_the_trainers_card_regeneration(tmp_path: Path) -> None:
    """A plain Trainer's create_model_card rewrites README.md from scratch (as push_to_hub
    does); update_model_card, reading epic_state.json and poison_spec.json from the output
    directory, puts the EPIC section, plots and metadata back, once, every time."""
    out = tmp_path / "run"
    out.mkdir()
    write_run(out)
    (out / "poison_spec.json").write_text(json.dumps(SPEC))
    (out / "eval_results.json").write_text(json.dumps({"eval_attack_success_rate": 0.0, "epoch": 1.0}))
    trainer = _tiny_trainer(out)
    readme = out / "README.md"

    for _ in range(2):
        trainer.create_model_card(dataset="digits-hard", tasks="image-classification")
        assert BLOCK_START not in readme.read_text()  # the stock card has no EPIC section
        update_model_card(trainer, readme)
        update_model_card(trainer, readme)  # idempotent

    loaded = ModelCard.load(readme)
    text = loaded.text
    assert text.count(BLOCK_START) == 1 and text.count("### What EPIC did") == 1
    assert "## Training procedure" in text  # the stock sections are still there
    assert text.index(BLOCK_START) < text.index("## Model description")
    assert "See *Intended use and limitations* in the EPIC section above." in text
    assert set(EPIC_TAGS) <= set(loaded.data.tags) and "generated_from_trainer" in loaded.data.tags
    got = metrics_of(loaded)
    assert got["attack_success_rate"] == 0.0  # from eval_results.json
    assert {r.dataset_name for r in loaded.data.eval_results} == {"digits-hard"}
    assert "accuracy" not in got  # the run logged no accuracy, and none is invented
    assert "`loss` |" in text  # eval_loss from the trainer's log history
    assert "`gradient_matching`" in text  # from poison_spec.json
    for rel in ("epic_plots/epic_embeddings_pca.png", "epic_plots/epic_poisons_vs_clean.png"):
        assert f"]({rel})" in text and (out / rel).is_file()


def test_update_needs_an_epic_state(tmp_path: Path) -> None:
    trainer = _tiny_trainer(tmp_path)
    with pytest.raises(ValueError, match="needs a trainer that ran with EPIC"):
        update_model_card(trainer, tmp_path / "README.md")


def test_example_card_in_model_cards_is_complete() -> None:
    """The committed example card loads, carries the EPIC metadata and sections, and every
    image it links to is committed beside it."""
    folder = Path(__file__).resolve().parents[1] / "model_cards" / "finetune_vit_fashion_mnist"
    card = ModelCard.load(folder / "README.md")
    assert set(EPIC_TAGS) <= set(card.data.tags)
    assert {r.metric_type for r in card.data.eval_results} >= {"accuracy", "attack_success_rate"}
    for section in ("### What EPIC did", "### Evaluation", "### Plots", "### Citation"):
        assert section in card.text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card.text)
    assert len(links) == 3
    for link in links:
        assert (folder / link).is_file(), link
    state = json.loads((folder / "epic_state.json").read_text())
    assert f"dropped **{len(state['dropped'])} of {state['num_rows']}** training rows" in card.text


def test_epic_trainer_card_keeps_the_epic_section_over_regeneration(tmp_path: Path) -> None:
    """A real tiny EpicTrainer run: create_model_card twice (as push_to_hub regenerates it) leaves
    exactly one EPIC section whose numbers are the run's, with the plots drawn."""
    from conftest import make_config, small_digits, tiny_vit, with_pixels

    from hf_epic import EpicTrainer

    ds = small_digits(120, plant={3: 5, 40: 5, 77: 5})
    args = make_config(tmp_path, num_train_epochs=2, epic_save_embeddings=True, epic_fraction=0.3)
    trainer = EpicTrainer(model=tiny_vit(0), args=args, train_dataset=with_pixels(ds))
    trainer.train()
    state = trainer.epic_state.to_dict()
    readme = tmp_path / "README.md"
    trainer.create_model_card(dataset="digits-planted")
    first = readme.read_text()
    trainer.create_model_card(dataset="digits-planted")
    card = ModelCard.load(readme)
    assert card.text.count(BLOCK_START) == 1 and readme.read_text() == first
    assert set(EPIC_TAGS) <= set(card.data.tags)
    assert f"dropped **{len(state['dropped'])} of 120** training rows" in card.text
    last = state["rounds"][-1]
    p, c = last["poisons_dropped_total"], last["clean_dropped_total"]
    scored = (
        f"**{p} poison{'' if p == 1 else 's'}** and **{c} clean row{'' if c == 1 else 's'}** were removed"
    )
    assert scored in card.text  # the planted rows carry is_poison, so the drops are scored
    assert "| `epic_fraction` | 0.3 |" in card.text
    for rel in ("epic_plots/epic_embeddings_pca.png", "epic_plots/epic_dropped_per_round.png"):
        assert f"]({rel})" in card.text and (tmp_path / rel).is_file()
    # why rows were dropped: the most suspicious dropped rows, in the trainer's own order
    assert "#### Why rows were dropped: the most suspicious ones" in card.text
    ranked = trainer.dropped_dataset(ranked=True).with_format(None)["epic_original_row"][:10]
    table = card.text.split("#### Why rows were dropped")[1].split("\n\n")[2].splitlines()[2:]
    assert [int(line.split("|")[1]) for line in table] == ranked
    assert all(int(line.split("|")[3]) >= 1 for line in table)  # each was isolated in some round


def test_card_of_a_state_without_isolation_evidence_has_no_suspicion_table() -> None:
    state = {"version": 1, "num_rows": 50, "dropped": [3, 7], "config": {}, "rounds": [
        {"round": 1, "epoch": 2, "newly_dropped": [3, 7], "num_dropped_total": 2}]}  # fmt: skip
    assert "most suspicious" not in render_model_card(state).text
    # with evidence, scored against the attack's poisons
    state["rounds"][0] |= {"isolated_rows": [3, 7, 9], "isolation_scores": [0.1, 0.3, 0.2]}
    text = render_model_card(state, attack={**SPEC, "poison_indices": [7]}).text
    rows = text.split("#### Why rows were dropped")[1].split("\n\n")[2].splitlines()[2:]
    assert [line.split("|")[1].strip() for line in rows] == ["7", "3"]  # 9 was isolated but not dropped
    assert rows[0].rstrip().endswith("| yes |") and rows[1].rstrip().endswith("| no |")
