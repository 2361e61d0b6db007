"""Plots drawn from the files an EPIC run writes (epic_state.json, epic_embeddings/round_*.safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hf_epic.plots import (
    load_round_embeddings,
    make_epic_plots,
    pca_2d,
    plot_drops_per_round,
    plot_embedding_rounds,
    plot_poisons_vs_clean,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(out: Path, *, with_poisons: bool = True, num_rounds: int = 3, seed: int = 0) -> dict:
    """Write an output directory in the contract's format: 300 rows, 5 classes, 6 poisons in
    class 2 whose gradient embeddings sit far from their class; each round drops 2 poisons and
    3 clean rows. Returns the state dict."""
    rng = np.random.default_rng(seed)
    n, c = 300, 5
    labels = np.repeat(np.arange(c), n // c)
    is_poison = np.zeros(n, dtype=bool)
    is_poison[np.flatnonzero(labels == 2)[:6]] = True
    dropped = np.zeros(n, dtype=bool)
    (out / "epic_embeddings").mkdir(parents=True, exist_ok=True)
    rounds = []
    for r in range(1, num_rounds + 1):
        emb = rng.normal(0, 0.05, (n, c)).astype(np.float32)
        emb[np.arange(n), labels] -= 0.6
        emb[is_poison] += rng.normal(0, 0.5, (int(is_poison.sum()), c)).astype(np.float32)
        new = np.zeros(n, dtype=bool)
        new[np.flatnonzero(is_poison & ~dropped)[:2]] = True
        new[rng.choice(np.flatnonzero(~is_poison & ~dropped), 3, replace=False)] = True
        tensors = {
            "embeddings": torch.from_numpy(emb),
            "labels": torch.from_numpy(labels),
            "dropped_before": torch.from_numpy(dropped.copy()),
            "newly_dropped": torch.from_numpy(new),
        }
        if with_poisons:
            tensors["is_poison"] = torch.from_numpy(is_poison)
        save_file(
            tensors,
            str(out / f"epic_embeddings/round_{r:03d}.safetensors"),
            {"round": str(r), "epoch": str(2 * r)},
        )
        idx = np.flatnonzero(new)
        dropped |= new
        per_class = {str(k): int((labels[idx] == k).sum()) for k in np.unique(labels[idx])}
        rounds.append(
            {
                "round": r,
                "epoch": 2 * r,
                "global_step": 10 * r,
                "newly_dropped": idx.tolist(),
                "newly_dropped_per_class": per_class,
                "num_dropped_total": int(dropped.sum()),
                "num_kept": int(n - dropped.sum()),
                "poisons_dropped": int(is_poison[idx].sum()) if with_poisons else None,
                "clean_dropped": int((~is_poison[idx]).sum()) if with_poisons else None,
                "poisons_dropped_total": int((is_poison & dropped).sum()) if with_poisons else None,
                "clean_dropped_total": int((~is_poison & dropped).sum()) if with_poisons else None,
                "embedding_seconds": 0.4,
                "selection_seconds": 0.02,
            }
        )
    state = {
        "version": 1,
        "num_rows": n,
        "dropped": np.flatnonzero(dropped).tolist(),
        "config": {"epic_fraction": 0.2, "epic_interval": 2, "epic_start": 2},
        "epoch_start_steps": [0, 5, 10],
        "rounds": rounds,
    }
    (out / "epic_state.json").write_text(json.dumps(state))
    return state


def is_png(path: Path, min_bytes: int = 5000) -> bool:
    """A real, non-trivial PNG file."""
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > min_bytes


def test_make_epic_plots_draws_all_three_with_relative_links(tmp_path: Path) -> None:
    write_run(tmp_path)
    plots = make_epic_plots(tmp_path, class_names={i: f"digit {i}" for i in range(5)})
    assert list(plots.values()) == [
        "epic_plots/epic_embeddings_pca.png",
        "epic_plots/epic_dropped_per_round.png",
        "epic_plots/epic_poisons_vs_clean.png",
    ]
    for rel in plots.values():
        assert not Path(rel).is_absolute()
        assert is_png(tmp_path / rel)


def test_without_poison_labels_the_poison_plot_is_skipped(tmp_path: Path) -> None:
    state = write_run(tmp_path, with_poisons=False)
    plots = make_epic_plots(tmp_path)
    assert "epic_plots/epic_poisons_vs_clean.png" not in plots.values()
    assert len(plots) == 2
    with pytest.raises(ValueError, match="is_poison"):
        plot_poisons_vs_clean(state, tmp_path / "x.png")


def test_no_rounds_means_no_plots(tmp_path: Path) -> None:
    state = {"version": 1, "num_rows": 10, "dropped": [], "config": {}, "rounds": []}
    assert make_epic_plots(tmp_path, state) == {}
    with pytest.raises(ValueError, match="no rounds"):
        plot_drops_per_round(state, tmp_path / "x.png")


def test_embedding_plot_defaults_to_the_poison_class_and_spreads_rounds(tmp_path: Path) -> None:
    write_run(tmp_path, num_rounds=6)
    rounds = load_round_embeddings(tmp_path)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5, 6]
    assert rounds[2]["epoch"] == 6 and rounds[0]["is_poison"].sum() == 6
    # 6 rounds, 3 panels: first, middle and last, so the figure is wider than a 1-panel one
    import matplotlib.image as mpimg

    three = plot_embedding_rounds(tmp_path, tmp_path / "three.png", max_panels=3)
    one = plot_embedding_rounds(tmp_path, tmp_path / "one.png", rounds=[4], class_id=0)
    assert mpimg.imread(three).shape[1] > 2.5 * mpimg.imread(one).shape[1]
    with pytest.raises(ValueError, match="no embeddings file"):
        plot_embedding_rounds(tmp_path, tmp_path / "bad.png", rounds=[9])
    with pytest.raises(ValueError, match="has no rows"):
        plot_embedding_rounds(tmp_path, tmp_path / "bad.png", class_id=7)


def test_missing_embeddings_folder_explains_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="epic_save_embeddings=True"):
        plot_embedding_rounds(tmp_path, tmp_path / "x.png")


def test_pca_2d_finds_the_direction_of_largest_spread() -> None:
    rng = np.random.default_rng(0)
    x = np.zeros((200, 5))
    x[:, 3] = rng.normal(0, 10, 200)  # the dominant direction
    x[:, 1] = rng.normal(0, 1, 200)
    xy = pca_2d(x)
    assert xy.shape == (200, 2)
    assert abs(np.corrcoef(xy[:, 0], x[:, 3])[0, 1]) > 0.999
    assert abs(np.corrcoef(xy[:, 1], x[:, 1])[0, 1]) > 0.99
    assert np.allclose(pca_2d(np.ones((4, 3)))[:, 1], 0.0)


def test_bad_state_type_is_a_type_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="epic_state must be"):
        plot_drops_per_round(42, tmp_path / "x.png")
    with pytest.raises(ValueError, match="No EPIC state"):
        plot_drops_per_round(tmp_path / "missing", tmp_path / "x.png")
