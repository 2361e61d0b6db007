"""Pictures of what EPIC did, drawn headless with matplotlib (Agg) and saved as PNG.

Three figures, all built from the files the trainer writes in its output directory
(see ``docs/INTERFACES.md``):

* :func:`plot_embedding_rounds` - the talk's picture: a 2-D PCA projection of one class's
  gradient embeddings at a few selection rounds, with dropped rows and (when known)
  poisons marked. Needs ``epic_embeddings/round_*.safetensors``
  (``EpicConfig.epic_save_embeddings=True``).
* :func:`plot_drops_per_round` - rows dropped in each round, stacked by class, and the
  total dropped per class. Needs only ``epic_state.json``.
* :func:`plot_poisons_vs_clean` - poisons against clean rows dropped per round and in
  total. Needs ``epic_state.json`` from a training set with an ``is_poison`` column.

:func:`make_epic_plots` draws whichever of the three the output directory supports and
returns their paths relative to it, ready to link from the model card.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .model_card import _state_dict  # one reader of epic_state.json for cards and plots

EMBEDDINGS_SUBDIR = "epic_embeddings"
PLOTS_SUBDIR = "epic_plots"
_ROUND_FILE = re.compile(r"^round_(\d+)\.safetensors$")
# Most points any one panel of the PCA figure draws for kept clean rows (dropped rows and
# poisons are always drawn); keeps the PNG readable and the SVD cheap on big classes.
_MAX_BACKGROUND_POINTS = 3000


def _pyplot() -> Any:
    """Import pyplot on the headless Agg backend, with a clear error when it is missing."""
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - matplotlib is in the dev/plots extras
        raise ImportError(
            "hf_epic.plots needs matplotlib; install it with `pip install 'hf-epic[plots]'`."
        ) from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _class_name(label: int | str, class_names: Mapping[int, str] | Sequence[str] | None) -> str:
    """Human name of a class id (falls back to the id itself).

    Args:
        label: Class id, as an int or its string form.
        class_names: ``id2label`` mapping or a list of names, or None.
    """
    idx = int(label)
    if class_names is None:
        return str(idx)
    if isinstance(class_names, Mapping):
        name = class_names.get(idx, class_names.get(str(idx)))  # type: ignore[call-overload]
        return str(name) if name is not None else str(idx)
    return str(class_names[idx]) if 0 <= idx < len(class_names) else str(idx)


def _embeddings_folder(embeddings_dir: str | Path) -> Path:
    """Resolve the ``epic_embeddings`` folder from it or from the output directory above it."""
    folder = Path(embeddings_dir)
    if (folder / EMBEDDINGS_SUBDIR).is_dir():
        folder = folder / EMBEDDINGS_SUBDIR
    if not folder.is_dir():
        raise ValueError(
            f"No embeddings folder at {folder}: train with EpicConfig(epic_save_embeddings=True) "
            f"so the trainer writes {EMBEDDINGS_SUBDIR}/round_001.safetensors and so on."
        )
    return folder


def _round_files(folder: Path) -> list[tuple[int, Path]]:
    """(round number, path) of every round file in a folder, sorted by round."""
    return sorted(
        (int(m.group(1)), p) for p in folder.iterdir() if (m := _ROUND_FILE.match(p.name)) is not None
    )


def _read_round(path: Path, number: int, tensors: Sequence[str] | None = None) -> dict[str, Any]:
    """Read one round file into numpy arrays.

    Args:
        path: The ``round_NNN.safetensors`` file.
        number: Round number from the file name (used when the metadata lacks it).
        tensors: Names to read (default: all); ``is_poison`` is None when absent.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        keys = set(f.keys())
        missing = {"embeddings", "labels", "dropped_before", "newly_dropped"} - keys
        if missing:
            raise ValueError(f"{path} lacks tensors {sorted(missing)}; it is not an EPIC round file.")
        meta = f.metadata() or {}
        wanted = ["embeddings", "labels", "dropped_before", "newly_dropped", "is_poison"]
        if tensors is not None:
            wanted = [t for t in wanted if t in tensors]
        out: dict[str, Any] = {
            "round": int(meta.get("round", number)),
            "epoch": int(float(meta["epoch"])) if "epoch" in meta else None,
        }
        for name in wanted:
            if name not in keys:
                out[name] = None
                continue
            value = f.get_tensor(name)
            if name == "embeddings":
                out[name] = value.astype(np.float32, copy=False)
            elif name == "labels":
                out[name] = value.astype(np.int64, copy=False)
            else:
                out[name] = value.astype(bool, copy=False)
    return out


def load_round_embeddings(embeddings_dir: str | Path) -> list[dict[str, Any]]:
    """Read every ``round_NNN.safetensors`` file of a run, in round order.

    Args:
        embeddings_dir: The ``epic_embeddings`` folder, or the output directory holding it.

    Returns:
        One dict per round with ``round`` and ``epoch`` (ints), numpy arrays ``embeddings``
        (N x D float32), ``labels`` (N int64), ``dropped_before`` and ``newly_dropped``
        (N bool), and ``is_poison`` (N bool, or None when the run did not know).
    """
    folder = _embeddings_folder(embeddings_dir)
    return [_read_round(path, number) for number, path in _round_files(folder)]


def pca_2d(points: np.ndarray, fit_rows: np.ndarray | None = None) -> np.ndarray:
    """Project points onto their first two principal components.

    Args:
        points: Array (n x d).
        fit_rows: Optional row positions to fit the components on (all rows when None);
            every row is projected.

    Returns:
        Array (n x 2); the second column is zero when the data has rank < 2.
    """
    x = np.asarray(points, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"pca_2d expects a 2-D array (rows x features), got shape {x.shape}.")
    fit = x if fit_rows is None else x[fit_rows]
    mean = fit.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(fit - mean, full_matrices=False)
    comps = vt[:2]
    if comps.shape[0] < 2:
        comps = np.vstack([comps, np.zeros((2 - comps.shape[0], x.shape[1]))])
    return (x - mean) @ comps.T


def _pick_class(last: dict[str, Any]) -> int:
    """The class the embedding picture shows: the poison class when known, else the class
    with the most dropped rows over the run.

    Args:
        last: The last round's arrays (``labels``, ``dropped_before``, ``newly_dropped``,
            ``is_poison``).
    """
    labels = last["labels"]
    if last["is_poison"] is not None and last["is_poison"].any():
        return int(np.bincount(labels[last["is_poison"]]).argmax())
    dropped = last["dropped_before"] | last["newly_dropped"]
    if dropped.any():
        return int(np.bincount(labels[dropped]).argmax())
    return int(np.bincount(labels).argmax())


def _spread(items: Sequence[Any], k: int) -> list[Any]:
    """Up to ``k`` items evenly spaced over ``items``, first and last included."""
    if len(items) <= k:
        return list(items)
    idx = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in idx]


def plot_embedding_rounds(
    embeddings_dir: str | Path,
    path: str | Path,
    *,
    class_id: int | None = None,
    rounds: Sequence[int] | None = None,
    max_panels: int = 4,
    class_names: Mapping[int, str] | Sequence[str] | None = None,
    seed: int = 0,
) -> Path:
    """Draw the talk's picture: one class's gradient embeddings in 2-D, round by round.

    Each panel is one selection round, projected on that round's first two principal
    components (fitted on the class's rows). Kept clean rows are grey dots, poisons red
    triangles, rows dropped in that round get a thick black ring, rows dropped in an
    earlier round a thin grey one.

    Args:
        embeddings_dir: The ``epic_embeddings`` folder or the output directory holding it.
        path: Where to write the PNG.
        class_id: Class to show; default: the poison class when the run knew its poisons,
            otherwise the class with the most dropped rows.
        rounds: Round numbers to show; default: up to ``max_panels`` evenly spaced rounds.
        max_panels: Most panels drawn when ``rounds`` is not given.
        class_names: ``id2label`` mapping or list of class names for the title.
        seed: Seed for subsampling kept clean rows on very large classes.

    Returns:
        The path of the PNG.
    """
    folder = _embeddings_folder(embeddings_dir)
    files = _round_files(folder)
    if not files:
        raise ValueError(
            f"No round_*.safetensors files under {folder}: either EPIC ran no selection round, or "
            "embeddings were not saved; train with EpicConfig(epic_save_embeddings=True) to get them."
        )
    if max_panels < 1:
        raise ValueError(f"max_panels must be at least 1, got {max_panels}.")
    by_number = dict(files)
    if rounds is None:
        chosen = _spread(files, max_panels)
    else:
        unknown = [n for n in rounds if n not in by_number]
        if unknown:
            raise ValueError(f"Rounds {unknown} have no embeddings file; available: {sorted(by_number)}.")
        chosen = [(n, by_number[n]) for n in rounds]
    last = _read_round(
        files[-1][1], files[-1][0], tensors=("labels", "dropped_before", "newly_dropped", "is_poison")
    )
    cls = _pick_class(last) if class_id is None else int(class_id)
    if not (last["labels"] == cls).any():
        raise ValueError(f"Class {cls} has no rows; pick one of {sorted(set(last['labels'].tolist()))}.")

    plt = _pyplot()
    rng = np.random.default_rng(seed)
    ncols = len(chosen)
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 4.4), squeeze=False)
    for ax, (number, file) in zip(axes[0], chosen):
        rnd = _read_round(file, number)
        in_class = np.flatnonzero(rnd["labels"] == cls)
        emb = rnd["embeddings"][in_class]
        before = rnd["dropped_before"][in_class]
        new = rnd["newly_dropped"][in_class]
        poison = rnd["is_poison"][in_class] if rnd["is_poison"] is not None else np.zeros_like(new)
        plain = np.flatnonzero(~(before | new | poison))
        if plain.size > _MAX_BACKGROUND_POINTS:
            plain = np.sort(rng.choice(plain, _MAX_BACKGROUND_POINTS, replace=False))
        special = np.flatnonzero(before | new | poison)
        fit_rows = np.concatenate([plain, special])
        xy = np.zeros((len(in_class), 2))
        xy[fit_rows] = pca_2d(emb[fit_rows])

        clean = np.zeros(len(in_class), dtype=bool)
        clean[plain] = True
        clean |= (before | new) & ~poison
        ax.scatter(xy[clean, 0], xy[clean, 1], s=9, c="#9a9a9a", alpha=0.6, linewidths=0, label="clean")
        if poison.any():
            ax.scatter(
                xy[poison, 0], xy[poison, 1], s=34, marker="^", c="#d62728", linewidths=0, label="poison"
            )
        if before.any():
            ax.scatter(
                xy[before, 0],
                xy[before, 1],
                s=70,
                facecolors="none",
                edgecolors="#555555",
                linewidths=0.7,
                label="dropped earlier",
            )
        if new.any():
            ax.scatter(
                xy[new, 0],
                xy[new, 1],
                s=90,
                facecolors="none",
                edgecolors="black",
                linewidths=1.6,
                label="dropped this round",
            )
        epoch = f", epoch {rnd['epoch']}" if rnd["epoch"] is not None else ""
        detail = f"{int(new.sum())} dropped"
        if rnd["is_poison"] is not None:
            hit = int((new & poison).sum())
            detail += f" ({hit} poison{'' if hit == 1 else 's'})"
        ax.set_title(f"round {rnd['round']}{epoch}\n{detail}", fontsize=10)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.tick_params(labelsize=7)
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False, fontsize=9)
    fig.suptitle(
        f"Gradient embeddings of class {_class_name(cls, class_names)} "
        "(first two principal components, per round)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 0.93))
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: str | Path) -> Path:
    """Write a figure as PNG and close it."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, format="png")
    plt.close(fig)
    return out


def _headroom(ax: Any, top: float) -> None:
    """Integer y ticks from 0 with room above the tallest bar for its label."""
    from matplotlib.ticker import MaxNLocator

    ax.set_ylim(0, max(float(top), 1.0) * 1.15)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _round_labels(rounds: list[dict[str, Any]]) -> list[str]:
    """Tick labels 'r1\\nep 2' for the per-round bar charts."""
    return [f"r{r['round']}" + (f"\nep {r['epoch']}" if r.get("epoch") is not None else "") for r in rounds]


def plot_drops_per_round(
    epic_state: Any,
    path: str | Path,
    *,
    class_names: Mapping[int, str] | Sequence[str] | None = None,
) -> Path:
    """Bar charts of the rows EPIC dropped: per round stacked by class, and per class in total.

    Args:
        epic_state: ``EpicState``, its dict, or a path to ``epic_state.json`` (or its folder).
        path: Where to write the PNG.
        class_names: ``id2label`` mapping or list of class names for the legend.

    Returns:
        The path of the PNG.
    """
    state = _state_dict(epic_state)
    rounds = state.get("rounds") or []
    if not rounds:
        raise ValueError("The EPIC state has no rounds: no selection ran, so there is nothing to draw.")
    classes = sorted({int(c) for r in rounds for c in (r.get("newly_dropped_per_class") or {})})
    per = np.zeros((len(rounds), max(len(classes), 1)))
    for i, r in enumerate(rounds):
        for c, n in (r.get("newly_dropped_per_class") or {}).items():
            per[i, classes.index(int(c))] = n

    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if max(classes, default=0) < 10 else "tab20")
    fig, (ax1, ax2) = plt.subplots(
        1, 2, figsize=(10.5, 4.2), gridspec_kw={"width_ratios": [max(len(rounds), 3), max(len(classes), 3)]}
    )
    x = np.arange(len(rounds))
    bottom = np.zeros(len(rounds))
    for j, c in enumerate(classes):
        ax1.bar(x, per[:, j], bottom=bottom, color=cmap(c % cmap.N), label=_class_name(c, class_names))
        bottom += per[:, j]
    for xi, total in zip(x, bottom):
        ax1.text(xi, total, f"{int(total)}", ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(x, _round_labels(rounds), fontsize=8)
    ax1.set_ylabel("rows dropped in the round")
    ax1.set_title("Newly dropped rows per round\n(stacked by class, colours as on the right)", fontsize=10)
    _headroom(ax1, bottom.max() if len(bottom) else 0)

    totals = per.sum(axis=0) if classes else np.zeros(0)
    ax2.bar(np.arange(len(classes)), totals, color=[cmap(c % cmap.N) for c in classes])
    for xi, total in enumerate(totals):
        ax2.text(xi, total, f"{int(total)}", ha="center", va="bottom", fontsize=8)
    ax2.set_xticks(np.arange(len(classes)), [_class_name(c, class_names) for c in classes], fontsize=8)
    ax2.set_xlabel("class")
    ax2.set_ylabel("rows dropped in total")
    ax2.set_title(
        f"Dropped per class in total\n({int(per.sum())} of {state.get('num_rows', '?')} rows)", fontsize=10
    )
    _headroom(ax2, totals.max() if len(totals) else 0)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_poisons_vs_clean(
    epic_state: Any,
    path: str | Path,
    *,
    num_poisons: int | None = None,
) -> Path:
    """Poisons against clean rows dropped: per round (stacked bars) and cumulative (lines).

    Args:
        epic_state: ``EpicState``, its dict, or a path to ``epic_state.json`` (or its folder).
        path: Where to write the PNG.
        num_poisons: Number of poisons in the training set, drawn as a reference line and
            used for the recall in the title; optional.

    Returns:
        The path of the PNG.
    """
    state = _state_dict(epic_state)
    rounds = state.get("rounds") or []
    if not rounds:
        raise ValueError("The EPIC state has no rounds: no selection ran, so there is nothing to draw.")
    if any(r.get("poisons_dropped") is None for r in rounds):
        raise ValueError(
            "The EPIC state does not know which rows are poisons (poisons_dropped is null): "
            "train on a dataset with a boolean `is_poison` column to get this plot."
        )
    poisons = np.array([r["poisons_dropped"] for r in rounds], dtype=float)
    clean = np.array([r["clean_dropped"] for r in rounds], dtype=float)
    poisons_total = np.array([r.get("poisons_dropped_total", math.nan) for r in rounds], dtype=float)
    clean_total = np.array([r.get("clean_dropped_total", math.nan) for r in rounds], dtype=float)
    if np.isnan(poisons_total).any():
        poisons_total = np.cumsum(poisons)
    if np.isnan(clean_total).any():
        clean_total = np.cumsum(clean)

    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.5, 4.2))
    x = np.arange(len(rounds))
    ax1.bar(x, poisons, color="#d62728", label="poisons")
    ax1.bar(x, clean, bottom=poisons, color="#9a9a9a", label="clean rows")
    for xi, p, c in zip(x, poisons, clean):
        ax1.text(xi, p + c, f"{int(p)}/{int(p + c)}", ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(x, _round_labels(rounds), fontsize=8)
    ax1.set_ylabel("rows dropped in the round")
    ax1.set_title("Dropped per round (label: poisons/all)", fontsize=10)
    ax1.legend(fontsize=8)
    _headroom(ax1, (poisons + clean).max())

    ax2.plot(x, poisons_total, "-^", color="#d62728", label="poisons dropped")
    ax2.plot(x, clean_total, "-o", color="#6a6a6a", label="clean rows dropped")
    title = "Cumulative drops"
    if num_poisons is not None:
        ax2.axhline(num_poisons, color="#d62728", linestyle="--", linewidth=1, label="all poisons")
        if num_poisons > 0:
            title += (
                f": {int(poisons_total[-1])} of {num_poisons} poisons ({poisons_total[-1] / num_poisons:.0%})"
            )
    ax2.set_xticks(x, _round_labels(rounds), fontsize=8)
    ax2.set_ylabel("rows dropped so far")
    ax2.set_title(title, fontsize=10)
    ax2.legend(fontsize=8)
    _headroom(ax2, max(clean_total.max(), poisons_total.max(), num_poisons or 0))
    fig.tight_layout()
    return _save(fig, plt, path)


def make_epic_plots(
    output_dir: str | Path,
    epic_state: Any = None,
    *,
    class_names: Mapping[int, str] | Sequence[str] | None = None,
    num_poisons: int | None = None,
    subdir: str = PLOTS_SUBDIR,
) -> dict[str, str]:
    """Draw every plot the run's files support into ``<output_dir>/<subdir>``.

    Args:
        output_dir: The trainer's output directory (holds ``epic_state.json`` and, when
            saved, ``epic_embeddings/``).
        epic_state: The state to draw from; default: ``<output_dir>/epic_state.json``.
        class_names: ``id2label`` mapping or list of class names.
        num_poisons: Number of poisons in the training set; default: counted from the
            embedding files when they carry ``is_poison``.
        subdir: Folder under ``output_dir`` for the PNGs.

    Returns:
        Plot title -> PNG path relative to ``output_dir`` (POSIX form, for Markdown links),
        in the order the card shows them. Empty when no selection round ran.
    """
    out = Path(output_dir)
    state = _state_dict(out if epic_state is None else epic_state)
    if not state.get("rounds"):
        return {}
    plots: dict[str, str] = {}
    emb_dir = out / EMBEDDINGS_SUBDIR
    has_embeddings = emb_dir.is_dir() and any(_ROUND_FILE.match(p.name) for p in emb_dir.iterdir())
    if has_embeddings:
        target = out / subdir / "epic_embeddings_pca.png"
        plot_embedding_rounds(emb_dir, target, class_names=class_names)
        plots["Gradient embeddings, round by round (PCA)"] = target.relative_to(out).as_posix()
        if num_poisons is None:
            number, file = _round_files(emb_dir)[-1]
            last = _read_round(file, number, tensors=("is_poison",))
            if last["is_poison"] is not None:
                num_poisons = int(last["is_poison"].sum())
    target = out / subdir / "epic_dropped_per_round.png"
    plot_drops_per_round(state, target, class_names=class_names)
    plots["Rows dropped per round and per class"] = target.relative_to(out).as_posix()
    if all(r.get("poisons_dropped") is not None for r in state["rounds"]):
        target = out / subdir / "epic_poisons_vs_clean.png"
        plot_poisons_vs_clean(state, target, num_poisons=num_poisons)
        plots["Poisons vs clean rows dropped"] = target.relative_to(out).as_posix()
    return plots
