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


@pytest.mark.parametrize("name", list(_page_module().CELLS))
def test_every_cell_command_parses_and_resumes_its_folder(name, tmp_path):
    page = _page_module()
    grid, config = page.parse_cell(name, "12", "docs/results/fashion_mnist")
    assert grid.trial_numbers == list(range(12))
    assert set(grid.attacks) <= set(attack_names()) and set(grid.defenses) <= set(defense_names())
    stored = ROOT / grid.output_dir / "harness_config.json"
    if stored.is_file():  # a rerun of the command resumes the folder instead of refusing it
        assert json.loads(stored.read_text()) == json.loads(json.dumps(config.to_dict()))
