"""Model cards that say what EPIC removed, rendered through ``huggingface_hub.ModelCard``.

Two entry points:

* :func:`render_model_card` builds a complete card from an EPIC state (a dict mirroring
  ``epic_state.json``, an ``EpicState``, or the file) plus whatever else is known: the base
  model, the data set, evaluation results, the attack, and plot paths.
* :func:`update_model_card` is what ``EpicTrainer.create_model_card`` calls after the stock
  ``Trainer`` card is written: it loads that card, inserts (or replaces) the EPIC section
  between two HTML-comment markers, draws the plots, and merges tags and ``model-index``
  metadata. The stock card is regenerated from scratch on every ``push_to_hub``, so this runs
  every time and is idempotent.

The card's layout lives in the Jinja template ``hf_epic/templates/model_card.md``, shipped
with the package.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .state import STATE_FILE_NAME

TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"
EPIC_TAGS = ("hf-epic", "epic", "data-poisoning-defense")
BLOCK_START = "<!-- hf-epic:start -->"
BLOCK_END = "<!-- hf-epic:end -->"
POISON_SPEC_FILE = "poison_spec.json"
RUN_SUMMARY_FILE = "recipe_results.json"
"""A run summary the recipes write beside the model: ``rows`` (the closing table: one dict per run, the
defended one first) and ``base_model`` (what the model was fine-tuned from, in words)."""
_BLOCK = re.compile(re.escape(BLOCK_START) + r".*?" + re.escape(BLOCK_END) + r"\n?", re.DOTALL)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

# normalised metric key -> (model-index metric type, name shown on the card)
_KNOWN_METRICS: dict[str, tuple[str, str]] = {
    "clean_accuracy": ("accuracy", "Clean accuracy"),
    "accuracy": ("accuracy", "Clean accuracy"),
    "attack_success_rate": ("attack_success_rate", "Attack success rate"),
    "asr": ("attack_success_rate", "Attack success rate"),
    "poison_recall": ("recall", "Poisons dropped (recall)"),
    "poison_precision": ("precision", "Dropped rows that are poisons (precision)"),
}
_SKIPPED_METRICS = ("runtime", "samples_per_second", "steps_per_second", "epoch", "model_preparation_time")


def _state_dict(epic_state: Any) -> dict[str, Any]:
    """Return the EPIC state as a dict from an ``EpicState``, a dict, or a JSON path.

    Args:
        epic_state: The state in any of those forms.
    """
    if isinstance(epic_state, (str, Path)):
        path = Path(epic_state)
        if path.is_dir():
            path = path / STATE_FILE_NAME
        if not path.is_file():
            raise ValueError(
                f"No EPIC state at {path}: pass an EpicState, its dict, the trainer's output directory "
                f"or the path to {STATE_FILE_NAME}."
            )
        return json.loads(path.read_text(encoding="utf-8"))
    if hasattr(epic_state, "to_dict"):
        return epic_state.to_dict()
    if isinstance(epic_state, Mapping):
        return dict(epic_state)
    raise TypeError(
        "epic_state must be an EpicState, a dict mirroring epic_state.json, or a path to that file; "
        f"got {type(epic_state).__name__}."
    )


def _attack_dict(attack: Any) -> dict[str, Any] | None:
    """Return a poison spec as a dict from a ``PoisonSpec``, a dict, a JSON path or None.

    Args:
        attack: The spec in any of those forms.
    """
    if attack is None:
        return None
    if isinstance(attack, (str, Path)):
        path = Path(attack)
        if not path.is_file():
            raise ValueError(f"No poison spec at {path}: pass a PoisonSpec, its dict, or its JSON file.")
        return json.loads(path.read_text(encoding="utf-8"))
    if hasattr(attack, "to_dict"):
        return attack.to_dict()
    if is_dataclass(attack) and not isinstance(attack, type):
        return asdict(attack)
    if isinstance(attack, Mapping):
        return dict(attack)
    raise TypeError(
        f"attack must be a PoisonSpec, a dict or a path to its JSON file; got {type(attack).__name__}."
    )


def _fmt(value: Any) -> str:
    """Format a value for a Markdown table cell."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value) if value else "-"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items()) if value else "-"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _pct(num: float, den: float) -> str:
    """``num / den`` as a percentage string, '-' when ``den`` is 0."""
    return f"{100.0 * num / den:.1f}%" if den else "-"


def _class_name(label: int | str, class_names: Mapping[Any, str] | Sequence[str] | None) -> str:
    """Class id with its name when known and different, e.g. ``3 (cat)``.

    Args:
        label: Class id.
        class_names: ``id2label`` mapping or list of names, or None.
    """
    idx = int(label)
    name = None
    if isinstance(class_names, Mapping):
        name = class_names.get(idx, class_names.get(str(idx)))
    elif class_names is not None and 0 <= idx < len(class_names):
        name = class_names[idx]
    return f"{idx} ({name})" if name is not None and str(name) != str(idx) else str(idx)


def normalize_eval_results(eval_results: Mapping[str, Any] | None) -> dict[str, float]:
    """Strip ``eval_``/``test_`` prefixes, keep numeric entries, drop timing entries.

    Args:
        eval_results: Metric name -> value, as the Trainer or an ``evaluate`` module returns.

    Returns:
        Normalised metric name -> float.
    """
    if eval_results is None:
        return {}
    if not isinstance(eval_results, Mapping):
        raise TypeError(f"eval_results must map metric names to numbers, got {type(eval_results).__name__}.")
    out: dict[str, float] = {}
    for key, value in eval_results.items():
        name = str(key)
        for prefix in ("eval_", "test_"):
            if name.startswith(prefix):
                name = name[len(prefix) :]
        if name.endswith(_SKIPPED_METRICS) or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            out[name] = float(value)
    return out


def _eval_rows(metrics: dict[str, float]) -> list[tuple[str, str]]:
    """Rows (pretty name, value) for the card's evaluation table, known metrics first."""
    rows: list[tuple[str, str]] = []
    seen_types: set[str] = set()
    for key, (metric_type, pretty) in _KNOWN_METRICS.items():
        if key in metrics and metric_type not in seen_types:
            seen_types.add(metric_type)
            value = metrics[key]
            rows.append((pretty, f"{value:.4f}" if 0 <= value <= 1 else _fmt(value)))
    for key, value in metrics.items():
        if key not in _KNOWN_METRICS:
            rows.append((f"`{key}`", _fmt(value)))
    return rows


def _model_index_results(metrics: dict[str, float], dataset: str, split: str) -> list[EvalResult]:
    """``EvalResult`` entries for the known metrics (clean accuracy, attack success, ...)."""
    results: list[EvalResult] = []
    seen: set[str] = set()
    dataset_type = re.sub(r"[^\w./-]+", "-", dataset).strip("-").lower() or "unknown"
    for key, (metric_type, pretty) in _KNOWN_METRICS.items():
        if key in metrics and metric_type not in seen:
            seen.add(metric_type)
            results.append(
                EvalResult(
                    task_type="image-classification",
                    task_name="Image Classification",
                    dataset_type=dataset_type,
                    dataset_name=dataset,
                    dataset_split=split,
                    metric_type=metric_type,
                    metric_name=pretty,
                    metric_value=round(metrics[key], 6),
                )
            )
    return results


def _attack_rows(spec: dict[str, Any], class_names: Any) -> list[tuple[str, str]]:
    """Rows (name, value) describing a poison spec."""
    rows = [("attack", f"`{spec.get('attack', 'unknown')}`")]
    if spec.get("poison_class") is not None:
        rows.append(
            (
                "poison class (the class the poisons are labelled as)",
                _class_name(spec["poison_class"], class_names),
            )
        )
    if spec.get("target_class") is not None:
        rows.append(
            (
                "target class (what the attacked inputs should become)",
                _class_name(spec["target_class"], class_names),
            )
        )
    if spec.get("target_indices"):
        rows.append(("attacked test rows", _fmt(len(spec["target_indices"]))))
    if spec.get("poison_indices") is not None:
        rows.append(("poisoned training rows", _fmt(len(spec["poison_indices"]))))
    if spec.get("budget") is not None:
        rows.append(("poison budget", _fmt(spec["budget"])))
    if spec.get("epsilon") is not None:
        eps = float(spec["epsilon"])
        shown = _fmt(eps)
        if 0 < eps < 1 and abs(eps * 255 - round(eps * 255)) < 1e-3:
            shown += f" ({round(eps * 255)}/255)"
        rows.append(("perturbation bound (epsilon)", shown))
    if spec.get("trigger"):
        trigger = {k: v for k, v in spec["trigger"].items() if k != "pattern" and v is not None}
        rows.append(("trigger", _fmt(trigger)))
    if spec.get("seed") is not None:
        rows.append(("seed", _fmt(spec["seed"])))
    return rows


def _cap_context(state: dict[str, Any], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-class drop cap and the largest share of one class dropped (None where not recorded)."""
    shares = (rounds[-1].get("dropped_share_per_class") or {}) if rounds else {}
    cap = (state.get("config") or {}).get("epic_max_drop_fraction", 1.0)
    return {
        "max_drop_fraction": f"{100 * float(cap):.0f} %",
        "max_class_dropped_share": f"{100 * max(shares.values()):.1f} %" if shares else None,
        "num_capped": sum(sum((r.get("capped_per_class") or {}).values()) for r in rounds),
    }


def _drop_rule_sentence(state: dict[str, Any]) -> str:
    """The drop rule the run used, named, with what it drops (rules registered in this process)."""
    from .drop_rules import available_drop_rules, get_drop_rule

    config = state.get("config") or {}
    name = str(config.get("epic_drop_rule", "first_isolation"))
    if name not in available_drop_rules():
        return f"`{name}`"
    rule = get_drop_rule(
        name,
        persistence=int(config.get("epic_drop_persistence", 2)),
        rank_share=float(config.get("epic_drop_rank_share", 0.005)),
    )
    return f"`{name}`: {rule.summary}" if rule.summary else f"`{name}`"


def _suspicious_rows(
    state: dict[str, Any], spec: dict[str, Any] | None, limit: int = 10
) -> list[dict[str, Any]]:
    """The ``limit`` most suspicious dropped rows with their evidence (none where no round kept any)."""
    from .state import EpicState

    rounds = state.get("rounds") or []
    dropped = [int(r) for r in state.get("dropped") or []]
    num_rows = int(state.get("num_rows", 0))
    if not dropped or num_rows <= max(dropped):
        return []
    run = EpicState(num_rows=num_rows, dropped=dropped, rounds=rounds)
    if not run.evidence():
        return []
    table = run.suspicion()
    dropped_in = run.round_dropped()
    epochs = {int(r.get("round", i + 1)): r.get("epoch") for i, r in enumerate(rounds)}
    poisons = set(spec.get("poison_indices") or []) if spec else None
    out = []
    for row in table.ranking(dropped)[:limit].tolist():
        number = dropped_in[row]
        out.append(
            {
                "row": row,
                "suspicion": f"{float(table.score[row]):.3f}",
                "rounds_isolated": int(table.rounds_isolated[row]),
                "mean_isolation": f"{float(table.mean_isolation[row]):.4f}",
                "dropped_in": "–" if number is None else f"round {number} (epoch {_fmt(epochs.get(number))})",
                "poison": None if poisons is None else ("yes" if row in poisons else "no"),
            }
        )
    return out


def _epic_context(
    state: dict[str, Any],
    *,
    eval_results: Mapping[str, Any] | None,
    attack: Any,
    plots: Mapping[str, str] | Sequence[str] | None,
    class_names: Mapping[Any, str] | Sequence[str] | None,
    num_poisons: int | None,
) -> dict[str, Any]:
    """Everything the template's EPIC section needs, formatted for Markdown."""
    if not isinstance(state.get("rounds", []), list):
        raise ValueError("epic_state['rounds'] must be a list of round records (see docs/api.md).")
    rounds = state.get("rounds") or []
    num_rows = int(state.get("num_rows", 0))
    dropped = state.get("dropped") or []
    num_dropped = len(dropped) if dropped else (rounds[-1].get("num_dropped_total", 0) if rounds else 0)
    spec = _attack_dict(attack)
    if num_poisons is None and spec is not None and spec.get("poison_indices") is not None:
        num_poisons = len(spec["poison_indices"])
    poisons_known = bool(rounds) and all(r.get("poisons_dropped") is not None for r in rounds)
    poisons_dropped = clean_dropped = None
    if poisons_known:
        last = rounds[-1]
        poisons_dropped = last.get("poisons_dropped_total", sum(r["poisons_dropped"] for r in rounds))
        clean_dropped = last.get("clean_dropped_total", sum(r["clean_dropped"] for r in rounds))

    round_rows = [
        {
            "round": r.get("round", i + 1),
            "epoch": _fmt(r.get("epoch")),
            "global_step": _fmt(r.get("global_step")),
            "newly_dropped": len(r.get("newly_dropped") or []),
            "num_dropped_total": _fmt(r.get("num_dropped_total")),
            "num_kept": _fmt(r.get("num_kept")),
            "poisons_dropped": _fmt(r.get("poisons_dropped")),
            "clean_dropped": _fmt(r.get("clean_dropped")),
            "embedding_seconds": _fmt(round(float(r.get("embedding_seconds", math.nan)), 2)),
            "selection_seconds": _fmt(round(float(r.get("selection_seconds", math.nan)), 3)),
        }
        for i, r in enumerate(rounds)
    ]
    classes = sorted({int(c) for r in rounds for c in (r.get("newly_dropped_per_class") or {})})
    show_rounds = len(rounds) <= 8
    class_rows = []
    for c in classes:
        per_round = [int((r.get("newly_dropped_per_class") or {}).get(str(c), 0)) for r in rounds]
        class_rows.append(
            {
                "name": _class_name(c, class_names),
                "per_round": per_round if show_rounds else [],
                "total": sum(per_round),
            }
        )
    metrics = normalize_eval_results(eval_results)
    if isinstance(plots, Mapping):
        plot_items = [(str(t), str(p)) for t, p in plots.items()]
    else:
        plot_items = [(Path(str(p)).stem.replace("_", " "), str(p)) for p in (plots or [])]
    for _, p in plot_items:
        if Path(p).is_absolute() or p.startswith(".."):
            raise ValueError(
                f"Plot path {p!r} must be relative to the card's folder (e.g. 'epic_plots/x.png') "
                "so that the link works on the Hub; copy the PNG next to the card first."
            )
    return {
        "num_rounds": len(rounds),
        "round_epochs": ", ".join(_fmt(r.get("epoch")) for r in rounds),
        "num_rows": num_rows,
        "num_dropped": num_dropped,
        "dropped_pct": _pct(num_dropped, num_rows),
        "poisons_known": poisons_known,
        "poisons_dropped": poisons_dropped,
        "clean_dropped": clean_dropped,
        "num_poisons": num_poisons,
        "poison_recall": _pct(poisons_dropped or 0, num_poisons or 0),
        "config_rows": [(k, _fmt(v)) for k, v in sorted((state.get("config") or {}).items())],
        **_cap_context(state, rounds),
        "drop_rule": _drop_rule_sentence(state),
        "suspicious_rows": _suspicious_rows(state, spec),
        "num_evidence_rounds": sum(1 for r in rounds if r.get("isolated_rows") is not None),
        "round_rows": round_rows,
        "class_round_columns": [r.get("round", i + 1) for i, r in enumerate(rounds)] if show_rounds else [],
        "class_rows": class_rows,
        "attack_rows": _attack_rows(spec, class_names) if spec else [],
        "eval_rows": _eval_rows(metrics),
        "has_attack_success": any(_KNOWN_METRICS.get(k, ("",))[0] == "attack_success_rate" for k in metrics),
        "plots": plot_items,
    }


def _is_hub_id(name: str | None) -> bool:
    """True for names that look like Hub repo ids (not local paths)."""
    return bool(name) and not Path(str(name)).exists() and bool(_HUB_ID.match(str(name)))


def _merge_tags(existing: Sequence[str] | None, extra: Sequence[str]) -> list[str]:
    """Union of two tag lists, order kept, no duplicates."""
    tags = list(existing or [])
    for tag in extra:
        if tag not in tags:
            tags.append(tag)
    return tags


def render_model_card(
    epic_state: Any,
    *,
    base_model: str | None = None,
    dataset: str | None = None,
    eval_results: Mapping[str, Any] | None = None,
    plots: Mapping[str, str] | Sequence[str] | None = None,
    attack: Any = None,
    model_name: str | None = None,
    class_names: Mapping[Any, str] | Sequence[str] | None = None,
    num_poisons: int | None = None,
    license: str | None = None,
    tags: Sequence[str] = (),
    eval_split: str = "test",
    description: str | None = None,
    comparison_rows: Sequence[Mapping[str, str]] = (),
) -> ModelCard:
    """Render a complete model card for a model trained with EPIC.

    Args:
        epic_state: ``EpicState``, a dict mirroring ``epic_state.json``, or a path to it.
        base_model: The model fine-tuned from (a Hub id goes into the ``base_model``
            metadata; a local path is only named in the text).
        dataset: Name or Hub id of the training data set.
        eval_results: Metric name -> value; ``clean_accuracy``/``accuracy`` and
            ``attack_success_rate`` (``eval_``/``test_`` prefixes allowed) go into
            ``model-index``, everything numeric into the card's table.
        plots: Plot title -> PNG path, or a list of paths; paths relative to the card.
        attack: ``PoisonSpec``, its dict, or its JSON path, when the training data was
            poisoned on purpose.
        model_name: Name for the title and ``model-index``.
        class_names: ``id2label`` mapping or list of class names.
        num_poisons: Number of poisons in the training set (default: from ``attack``).
        license: License identifier for the metadata.
        tags: Extra tags beside ``hf-epic``, ``epic``, ``data-poisoning-defense``.
        eval_split: Split the evaluation results were measured on.
        description: One paragraph introducing the model (a default is written).
        comparison_rows: Runs to show side by side (e.g. with and without EPIC on the same
            poisoned set): dicts with ``run``, ``clean_accuracy``, ``attack_success_rate``,
            ``rows_dropped`` and ``poisons_dropped``, already formatted.

    Returns:
        The ``huggingface_hub.ModelCard``; ``card.save(path)`` writes it.
    """
    state = _state_dict(epic_state)
    context = _epic_context(
        state,
        eval_results=eval_results,
        attack=attack,
        plots=plots,
        class_names=class_names,
        num_poisons=num_poisons,
    )
    name = model_name or "epic-defended-model"
    data_name = dataset or "an image-classification data set"
    metrics = normalize_eval_results(eval_results)
    card_data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=_merge_tags(["image-classification"], [*EPIC_TAGS, *tags]),
        base_model=base_model if _is_hub_id(base_model) else None,
        datasets=[dataset] if dataset and _is_hub_id(dataset) and "/" in dataset else None,
        metrics=sorted({_KNOWN_METRICS[k][0] for k in metrics if k in _KNOWN_METRICS}) or None,
        model_name=name,
        eval_results=_model_index_results(metrics, dataset or "unknown", eval_split) or None,
    )
    if description is None:
        origin = f"fine-tuned from `{base_model}`" if base_model else "trained"
        description = (
            f"An image classifier {origin} on {data_name} with the EPIC defense against data "
            "poisoning switched on."
        )
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        title=name,
        intro=description,
        comparison_rows=list(comparison_rows),
        **context,
    )
    card.text = re.sub(r"\n{3,}", "\n\n", card.text)
    return card


def _epic_block(card: ModelCard) -> str:
    """The EPIC section (markers included) of a card rendered from the template."""
    match = _BLOCK.search(card.text)
    if match is None:  # pragma: no cover - the template always has both markers
        raise RuntimeError(f"The card template {TEMPLATE_PATH} lost its {BLOCK_START} marker.")
    return match.group(0).rstrip("\n") + "\n"


def insert_epic_section(text: str, block: str) -> str:
    """Put the EPIC section into a card's Markdown body, replacing an earlier one.

    A new section goes before the body's first ``## `` heading (after the title and the
    opening paragraph), or at the end when there is none.

    Args:
        text: The card's Markdown body (without the YAML header).
        block: The section, starting with ``BLOCK_START`` and ending with ``BLOCK_END``.
    """
    if _BLOCK.search(text):
        return _BLOCK.sub(lambda _: block, text, count=1)
    heading = re.search(r"^## ", text, flags=re.MULTILINE)
    if heading is None:
        return text.rstrip("\n") + "\n\n" + block
    return text[: heading.start()] + block + "\n" + text[heading.start() :]


def _latest_eval_metrics(trainer: Any, output_dir: Path) -> dict[str, Any]:
    """Evaluation metrics the run recorded: the trainer's log history, then the
    ``eval_results.json``/``all_results.json`` files ``trainer.save_metrics`` writes."""
    metrics: dict[str, Any] = {}
    history = getattr(getattr(trainer, "state", None), "log_history", None) or []
    for entry in history:
        metrics.update({k: v for k, v in entry.items() if k.startswith("eval_")})
    for file_name in ("all_results.json", "eval_results.json", "test_results.json"):
        path = output_dir / file_name
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                continue
            if isinstance(data, dict):
                metrics.update({k: v for k, v in data.items() if k.startswith(("eval_", "test_"))})
    return metrics


def _run_summary(output_dir: Path) -> dict[str, Any]:
    """``<output_dir>/recipe_results.json`` as a dict (empty when absent or unreadable as JSON)."""
    path = output_dir / RUN_SUMMARY_FILE
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete it or write it again.") from None
    return summary if isinstance(summary, dict) else {}


def _comparison_rows(rows: Any) -> list[dict[str, str]]:
    """The closing table's runs, formatted for the card (empty unless there are at least two runs)."""
    if not isinstance(rows, list) or len(rows) < 2:
        return []

    def number(value: Any) -> str:
        return "-" if value is None else f"{float(value):.3f}"

    out = []
    for row in rows:
        poisons = "-"
        if row.get("num_poisons") is not None:
            poisons = f"{row.get('poisons_dropped') or 0} of {row['num_poisons']}"
        out.append(
            {
                "run": str(row.get("run")),
                "clean_accuracy": number(row.get("clean_accuracy")),
                "attack_success_rate": number(row.get("attack_success_rate")),
                "rows_dropped": f"{row.get('rows_dropped', 0)} of {row.get('num_rows', '?')}",
                "poisons_dropped": poisons,
            }
        )
    return out


def update_model_card(
    trainer: Any,
    path: str | Path,
    *,
    eval_results: Mapping[str, Any] | None = None,
    attack: Any = None,
    make_plots: bool = True,
) -> ModelCard | None:
    """Add the EPIC section, plots and metadata to the card the Trainer just wrote.

    Safe to call repeatedly: a second call replaces the section instead of adding another.
    Only the main process writes; other ranks return None.

    Args:
        trainer: The ``EpicTrainer`` (reads ``epic_state``, ``args.output_dir``,
            ``state.log_history`` and the model's ``id2label``).
        path: The card to update, normally ``<output_dir>/README.md``; created if missing.
        eval_results: Extra metrics; default: the ``eval_*`` entries of the log history and
            of ``eval_results.json``/``all_results.json`` in the output directory (write
            them with ``trainer.save_metrics("eval", metrics)`` so they survive a push).
        attack: ``PoisonSpec`` or dict; default: ``<output_dir>/poison_spec.json`` if present.
        make_plots: Draw the PNGs into ``<output_dir>/epic_plots`` and link them (needs
            matplotlib; skipped silently when it is not installed).

    A run summary in ``<output_dir>/recipe_results.json`` (written by the recipes) adds the
    table of every run (defended and undefended) and names the base model in the card's
    first sentence when the Trainer's stock text says the model was trained from scratch.

    Returns:
        The updated ``ModelCard``, or None on a non-main process.
    """
    is_main = getattr(trainer, "is_world_process_zero", None)
    if callable(is_main) and not is_main():
        return None
    card_path = Path(path)
    output_dir = Path(trainer.args.output_dir)
    state_obj = getattr(trainer, "epic_state", None)
    if state_obj is None:
        state_file = output_dir / STATE_FILE_NAME
        if not state_file.is_file():
            raise ValueError(
                f"{type(trainer).__name__} has no epic_state and {state_file} does not exist: "
                "update_model_card needs a trainer that ran with EPIC (an EpicTrainer)."
            )
        state_obj = state_file
    state = _state_dict(state_obj)

    model = getattr(trainer, "model", None)
    config = getattr(model, "config", None)
    class_names = getattr(config, "id2label", None)
    metrics = _latest_eval_metrics(trainer, output_dir)
    metrics.update(dict(eval_results or {}))
    if attack is None and (output_dir / POISON_SPEC_FILE).is_file():
        attack = output_dir / POISON_SPEC_FILE

    plots: dict[str, str] = {}
    if make_plots and state.get("rounds"):
        try:
            from .plots import make_epic_plots
        except ImportError:  # pragma: no cover - matplotlib missing
            make_epic_plots = None
        if make_epic_plots is not None:
            drawn = make_epic_plots(output_dir, state, class_names=class_names)
            for title, rel in drawn.items():
                target = (output_dir / rel).resolve()
                try:
                    plots[title] = target.relative_to(card_path.parent.resolve()).as_posix()
                except ValueError:
                    plots[title] = rel

    existing = ModelCard.load(card_path) if card_path.is_file() else ModelCard("---\n---\n")
    data = existing.data
    model_name = data.get("model_name") or output_dir.name
    dataset = None
    if data.get("eval_results"):
        dataset = data.eval_results[0].dataset_name
    if dataset is None and data.get("datasets"):
        dataset = data.datasets[0] if isinstance(data.datasets, list) else str(data.datasets)
    if dataset is None:  # the stock card names it in its text: "... on the <name> dataset."
        named = re.search(r" on the (.+?) dataset\.", existing.text)
        info = getattr(getattr(trainer, "train_dataset", None), "info", None)
        dataset = (
            named.group(1) if named and named.group(1) != "None" else getattr(info, "dataset_name", None)
        )
    summary = _run_summary(output_dir)
    base_model = data.get("base_model") or summary.get("base_model") or getattr(config, "_name_or_path", None)

    rendered = render_model_card(
        state,
        base_model=base_model,
        dataset=dataset,
        eval_results=metrics,
        plots=plots,
        attack=attack,
        model_name=model_name,
        class_names=class_names,
        comparison_rows=_comparison_rows(summary.get("rows")),
    )
    new = rendered.data
    data.tags = _merge_tags(data.get("tags"), new.tags)
    if not data.get("pipeline_tag"):
        data.pipeline_tag = new.pipeline_tag
    if not data.get("library_name"):
        data.library_name = new.library_name
    if not data.get("base_model") and new.base_model:
        data.base_model = new.base_model
    if new.metrics:
        data.metrics = _merge_tags(data.get("metrics"), new.metrics)
    if new.eval_results:
        old_results = list(data.get("eval_results") or [])
        keys = {(r.metric_type, r.dataset_type, r.dataset_split) for r in new.eval_results}
        kept = [r for r in old_results if (r.metric_type, r.dataset_type, r.dataset_split) not in keys]
        data.eval_results = kept + list(new.eval_results)
        data.model_name = data.get("model_name") or new.model_name

    block = _epic_block(rendered)
    text = existing.text if existing.text.strip() else f"\n# {model_name}\n"
    # The stock card's placeholder for intended uses points at the EPIC section instead.
    text = re.sub(
        r"(^## Intended uses & limitations\n\n)More information needed\n",
        r"\1See *Intended use and limitations* in the EPIC section above.\n",
        text,
        flags=re.MULTILINE,
    )
    if summary.get("base_model") and not data.get("base_model"):  # offline: a backbone of the run's own
        text = text.replace(
            "This model was trained from scratch on",
            f"This model is a fine-tuned version of {summary['base_model']} on",
        )
    existing.text = insert_epic_section(text, block)
    existing.save(card_path)
    return existing
