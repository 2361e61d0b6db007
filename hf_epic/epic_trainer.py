"""``EpicTrainer``: a ``transformers.Trainer`` with EPIC built in and a training set that may shrink."""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from .epic_callback import EpicCallback
from .epic_config import EpicConfig
from .state import STATE_FILE_NAME, EpicState
from .validation import check_train_dataset

__all__ = ["ORIGINAL_ROW_COLUMN", "ROW_INDEX_KEY", "SUSPICION_COLUMNS", "EpicTrainer"]

logger = logging.getLogger(__name__)

MODEL_TAGS = ["hf-epic", "epic", "data-poisoning-defense"]
ORIGINAL_ROW_COLUMN = "epic_original_row"
# Columns dropped_dataset() adds beside ORIGINAL_ROW_COLUMN.
SUSPICION_COLUMNS = ("epic_suspicion", "epic_rounds_isolated", "epic_round_dropped")
# Batch key carrying each training row's position, added in training-pass mode and removed before the forward.
ROW_INDEX_KEY = "epic_row_index"
# Trainer internals EpicTrainer overrides to keep step counts right on a shrinking set (tested: 5.24).
_TRAINER_HOOKS = ("_run_epoch", "set_initial_training_values", "_init_training_state", "_get_train_sampler")


def _is_hf_dataset(dataset: Any) -> bool:
    import datasets

    return isinstance(dataset, datasets.Dataset)


def _check_transformers_version() -> None:
    missing = [name for name in _TRAINER_HOOKS if not callable(getattr(Trainer, name, None))]
    if missing:
        import transformers

        raise ImportError(
            f"EpicTrainer needs a transformers Trainer with {', '.join(missing)} (transformers "
            f"{transformers.__version__} has none); upgrade with `pip install -U 'transformers>=5.24'`, "
            "or use hf_epic.EpicCallback with a plain Trainer (see its docstring for what it cannot do)."
        )


def _refuse_second_epic_callback(callback: Any) -> None:
    is_epic = isinstance(callback, EpicCallback) or (
        isinstance(callback, type) and issubclass(callback, EpicCallback)
    )
    if is_epic:
        raise ValueError(
            "EpicTrainer already runs its own EpicCallback; a second one would select and save other drops "
            "than those training uses. Pass yours as EpicTrainer(..., epic_callback=<your EpicCallback>) instead "
            "of in callbacks / add_callback."
        )


class _IndexedRows(torch.utils.data.Dataset):
    """The training rows, each fetched as ``(position, row)`` so its position reaches the batch."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return int(index), self.dataset[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[int, Any]]:
        fetch = getattr(self.dataset, "__getitems__", None)
        rows = fetch(indices) if fetch is not None else [self.dataset[i] for i in indices]
        return [(int(i), row) for i, row in zip(indices, rows)]


class _RowIndexCollator:
    """Collate ``(position, row)`` pairs with the trainer's collator and add the positions as ``epic_row_index``."""

    def __init__(self, data_collator: Any) -> None:
        self.data_collator = data_collator

    def __call__(self, features: list[tuple[int, Any]]) -> Any:
        batch = self.data_collator([row for _, row in features])
        if not hasattr(batch, "__setitem__"):
            raise ValueError(
                f"the data collator returned a {type(batch).__name__}; epic_embedding_source='training_pass' "
                "needs a dict of model inputs (as Trainer passes model(**batch))."
            )
        batch[ROW_INDEX_KEY] = torch.tensor([i for i, _ in features], dtype=torch.long)
        return batch


def _checkpoint_problem(folder: str, need_epic_state: bool) -> str | None:
    """Why a checkpoint folder cannot be resumed from (None if it looks complete).

    ``trainer_state.json`` is the last file the Trainer writes into a checkpoint, so a folder whose
    ``trainer_state.json`` is missing or unreadable was cut short during its save.
    """
    import json

    for name, needed in (("trainer_state.json", True), (STATE_FILE_NAME, need_epic_state)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            if needed:
                return f"it has no {name}"
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                json.load(handle)
        except (OSError, ValueError) as error:
            return f"its {name} is unreadable ({error})"
    return None


def last_complete_checkpoint(output_dir: str, need_epic_state: bool = True) -> str | None:
    """The newest ``checkpoint-N`` folder of ``output_dir`` that was completely written (None if none).

    Newer folders that were cut short (a process killed during the save) are skipped with a warning.
    """
    import re

    if not os.path.isdir(output_dir):
        return None
    pattern = re.compile(r"^checkpoint-(\d+)$")
    found = []
    for name in os.listdir(output_dir):
        match = pattern.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    for _, folder in sorted(found, reverse=True):
        problem = _checkpoint_problem(folder, need_epic_state)
        if problem is None:
            return folder
        logger.warning("Skipping %s for resume_from_checkpoint=True: %s (a save cut short).", folder, problem)
    return None


class EpicTrainer(Trainer):
    """A ``Trainer`` that runs the EPIC defense and trains on a shrinking set correctly.

    Compared with ``Trainer`` + :class:`~hf_epic.EpicCallback`: the step counts follow the kept set
    (``state.epoch`` is whole at epoch ends, ``max_steps``, the progress bar and a linear/cosine LR
    horizon are recomputed after each round, so the end-of-training save/evaluation fires and
    gradient-accumulation boundaries fall at epoch ends); ``epic_state.json`` is written into every
    checkpoint and ``output_dir`` and restored by ``train(resume_from_checkpoint=...)`` with the same
    kept set and batch order; ``epic/*`` figures go through ``Trainer.log``; the model is tagged and
    the model card gets an EPIC section.

    Args:
        model: The classifier: any model returning ``logits`` (a ``ModelOutput``, a dict such as
            ``{"loss", "logits"}``, or a tensor); the class count is ``config.num_labels`` where the
            model has one, else the width of its logits.
        args: An :class:`~hf_epic.EpicConfig` (plain ``TrainingArguments`` only with ``epic_callback``).
        *trainer_args: Passed to ``Trainer``.
        epic_embedding_dataset: The training rows, same order, with an un-augmented transform, used for
            the embedding pass (the reference embeds without augmentation). Default: ``train_dataset``.
        epic_callback: A custom :class:`~hf_epic.EpicCallback` (e.g. a baseline defense). Default:
            ``EpicCallback(args)``.
        **trainer_kwargs: Passed to ``Trainer`` (``train_dataset``, ``eval_dataset``, ``callbacks``, ...).

    Example:
        >>> trainer = EpicTrainer(model=model, args=EpicConfig("out", remove_unused_columns=False,
        ...                       epic_fraction=0.2, epic_start_epoch=2), train_dataset=train_ds)
        >>> trainer.train()
        >>> trainer.epic_state.dropped, trainer.cleaned_dataset()
    """

    def __init__(
        self,
        model: Any = None,
        args: TrainingArguments | None = None,
        *trainer_args: Any,
        epic_embedding_dataset: Any = None,
        epic_callback: EpicCallback | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        _check_transformers_version()
        if args is None:
            args = EpicConfig(output_dir="trainer_output")
        if epic_callback is None:
            if not isinstance(args, EpicConfig):
                raise TypeError(
                    f"EpicTrainer needs args=EpicConfig(...) (got {type(args).__name__}); build your arguments "
                    "with hf_epic.EpicConfig, which accepts every TrainingArguments field plus epic_*."
                )
            epic_callback = EpicCallback(args)
        if not isinstance(epic_callback, EpicCallback):
            raise TypeError(f"epic_callback must be an EpicCallback, got {type(epic_callback).__name__}.")
        settings = epic_callback.settings
        train_dataset = trainer_kwargs.get(
            "train_dataset", trainer_args[1] if len(trainer_args) > 1 else None
        )
        if train_dataset is not None and (settings is None or settings["epic_enabled"]):
            check_train_dataset(train_dataset)  # before Trainer's own, less helpful, length check
        callbacks = list(trainer_kwargs.pop("callbacks", None) or [])
        for extra in callbacks:
            _refuse_second_epic_callback(extra)
        super().__init__(model, args, *trainer_args, callbacks=[epic_callback, *callbacks], **trainer_kwargs)
        self.epic_callback = epic_callback
        epic_callback.trainer = self
        if epic_embedding_dataset is not None:
            epic_callback.embedding_dataset = epic_embedding_dataset
        if self.train_dataset is not None:
            epic_callback.train_dataset = self.train_dataset
        self._epic_num_train_epochs: int | None = None
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(MODEL_TAGS)

    # ----------------------------------------------------------------- public API

    def add_callback(self, callback: Any) -> None:
        """As ``Trainer.add_callback``, but a second :class:`~hf_epic.EpicCallback` is refused."""
        _refuse_second_epic_callback(callback)
        super().add_callback(callback)

    @property
    def _epic_on(self) -> bool:
        settings = self.epic_callback.settings
        return settings is None or bool(settings["epic_enabled"])

    @property
    def epic_state(self) -> EpicState | None:
        """The EPIC state: dropped/kept rows and one record per round (None before training)."""
        return self.epic_callback.state

    def cleaned_dataset(self) -> Any:
        """Return the kept rows of the training set (``Dataset.select``) with their original positions.

        The result carries a column ``epic_original_row`` with each row's position in the training set.
        The training set itself is not modified.
        """
        dataset = self._require_train_dataset()
        state = self.epic_state
        kept = state.kept if state is not None else list(range(len(dataset)))
        return self._select_rows(kept)

    def suspicion_scores(self) -> list[float]:
        """Every training row's suspicion, in row order (0 for rows never isolated).

        ``suspicion = k + m``: ``k`` the number of rounds that isolated the row, ``m`` the mean of its
        isolation scores over those rounds (in [0, 1]; one minus the similarity to the nearest other
        row of its class). Rows isolated in more rounds rank higher; among equals, the more isolated.
        See :mod:`hf_epic.drop_rules`.
        """
        dataset = self._require_train_dataset()
        state = self.epic_state
        if state is None:
            return [0.0] * len(dataset)
        return state.suspicion().score.tolist()

    def dropped_dataset(self, ranked: bool = True) -> Any:
        """Return the dropped rows of the training set (``Dataset.select``, format kept), for auditing.

        Columns added: ``epic_original_row`` (position in the training set), ``epic_suspicion``
        (:meth:`suspicion_scores`), ``epic_rounds_isolated`` and ``epic_round_dropped`` (the round
        that dropped the row).

        Args:
            ranked: Order the rows by decreasing suspicion (ties: lowest position first); False keeps
                the training set's order.
        """
        dataset = self._require_train_dataset()
        state = self.epic_state
        if state is None:
            state = EpicState(num_rows=len(dataset))
        table = state.suspicion()
        rows = table.ranking(state.dropped).tolist() if ranked else list(state.dropped)
        values = (table.score.tolist(), table.rounds_isolated.tolist(), state.round_dropped())
        extra = dict(zip(SUSPICION_COLUMNS, values))
        return self._select_rows(rows, extra)

    def export_dropped(self, path: str | os.PathLike) -> str:
        """Write the dropped rows, most suspicious first, to a ``.csv`` or ``.jsonl`` file.

        One line per dropped row with ``row`` (position in the training set), ``label``, ``suspicion``,
        ``rounds_isolated``, ``mean_isolation_score``, ``max_isolation_score``, ``round_dropped`` and,
        when the training set has an ``is_poison`` column, ``is_poison``. Written atomically, by the
        main process only.

        Args:
            path: The file to write; its extension picks the format.

        Returns:
            The path written.
        """
        import csv
        import json
        import tempfile

        path = os.fspath(path)
        kind = os.path.splitext(path)[1].lower()
        if kind not in (".csv", ".jsonl"):
            raise ValueError(
                f"export_dropped writes .csv or .jsonl files, got {path!r}; end the name with one of them."
            )
        dataset = self._require_train_dataset()
        state = self.epic_state
        labels = self.epic_callback.labels
        if labels is None:
            from .validation import find_label_column, read_labels

            labels = read_labels(dataset, find_label_column(dataset))
        poison = self.epic_callback.is_poison
        records = []
        if state is not None and state.dropped:
            table = state.suspicion()
            by_round = state.round_dropped()
            for r in table.ranking(state.dropped).tolist():
                record = {
                    "row": r,
                    "label": int(labels[r]),
                    "suspicion": round(float(table.score[r]), 6),
                    "rounds_isolated": int(table.rounds_isolated[r]),
                    "mean_isolation_score": float(table.mean_isolation[r]),
                    "max_isolation_score": float(table.max_isolation[r]),
                    "round_dropped": by_round[r],
                }
                if poison is not None:
                    record["is_poison"] = bool(poison[r])
                records.append(record)
        if not self.is_world_process_zero():
            return path
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=kind, dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
                if kind == ".jsonl":
                    for record in records:
                        handle.write(json.dumps(record) + "\n")
                else:
                    names = (
                        list(records[0])
                        if records
                        else [
                            "row",
                            "label",
                            "suspicion",
                            "rounds_isolated",
                            "mean_isolation_score",
                            "max_isolation_score",
                            "round_dropped",
                        ]
                    )
                    writer = csv.DictWriter(handle, fieldnames=names)
                    writer.writeheader()
                    writer.writerows(records)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    def _require_train_dataset(self) -> Any:
        if self.train_dataset is None:
            raise ValueError("EpicTrainer has no train_dataset; pass train_dataset=... to the trainer.")
        return self.train_dataset

    def _select_rows(self, rows: list[int], extra: dict[str, list] | None = None) -> Any:
        """``rows`` of the training set with ``epic_original_row`` and ``extra`` columns (one value per
        row of the training set), in the order of ``rows``, format kept."""
        dataset = self._require_train_dataset()
        fmt = dataset.format
        raw = dataset.with_format(None)
        added = [ORIGINAL_ROW_COLUMN, *(extra or {})]
        present = [c for c in added if c in raw.column_names]
        if present:
            raw = raw.remove_columns(present)
        raw = raw.add_column(ORIGINAL_ROW_COLUMN, list(range(len(raw))))
        for name, values in (extra or {}).items():
            raw = raw.add_column(name, values)
        selected = raw.select(rows)
        if fmt["type"] == "custom":
            selected.set_transform(
                fmt["format_kwargs"]["transform"],
                columns=fmt["columns"],
                output_all_columns=fmt["output_all_columns"],
            )
        elif fmt["type"] is not None or fmt["columns"] is not None:
            selected.set_format(
                fmt["type"], fmt["columns"], fmt["output_all_columns"], **fmt["format_kwargs"]
            )
        return selected

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, **kwargs: Any):
        """Check the inputs, restore the EPIC state when resuming, then train (see ``Trainer.train``)."""
        for callback in self.callback_handler.callbacks:
            if callback is not self.epic_callback:
                _refuse_second_epic_callback(callback)
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(
                self.args.output_dir, need_epic_state=self._epic_on
            )
            if resume_from_checkpoint is None:
                newest = (
                    get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
                )
                raise ValueError(
                    f"No complete checkpoint found in output directory ({self.args.output_dir})"
                    + (f"; {newest} was cut short during its save" if newest else "")
                    + ". Train from the start (resume_from_checkpoint=None)."
                )
        self.epic_callback._restored = False
        self.epic_callback._state_source = None
        if resume_from_checkpoint:
            path = os.path.join(resume_from_checkpoint, STATE_FILE_NAME)
            if os.path.isfile(path):
                self.epic_callback.load_state(path)
            else:
                logger.warning(
                    "%s has no %s: EPIC starts from an empty state.", resume_from_checkpoint, STATE_FILE_NAME
                )
                self.epic_callback.state = None
        else:
            self.epic_callback.state = None
            self.epic_callback._epoch = 0
        dataset = self.train_dataset
        fmt = getattr(dataset, "format", None)
        if self.args.remove_unused_columns and isinstance(fmt, dict) and fmt.get("type") == "custom":
            raise ValueError(
                "train_dataset has a set_transform/with_transform, and remove_unused_columns=True would strip "
                "the columns it reads (e.g. 'image') before the transform runs; pass "
                "remove_unused_columns=False in EpicConfig, as the transformers image-classification examples do."
            )
        self.epic_callback._prepared = False
        collator = self.data_collator
        if dataset is not None and not _is_hf_dataset(dataset):
            collator = self._get_collator_with_removed_columns(collator, description="EPIC embedding")
        # Set, not passed: subclasses of EpicCallback may override prepare(args, model, train_dataset).
        self.epic_callback.collate_fn = collator
        self.epic_callback.prepare(self.args, self.model, self.train_dataset)
        return super().train(resume_from_checkpoint=resume_from_checkpoint or None, trial=trial, **kwargs)

    # ----------------------------------------------------------------- data and step counts

    def _records_training_pass(self) -> bool:
        settings = self.epic_callback.settings
        return bool(
            settings is not None
            and settings["epic_enabled"]
            and settings["epic_embedding_source"] == "training_pass"
        )

    def get_train_dataloader(self) -> Any:
        """As ``Trainer``; in training-pass mode every batch also carries its rows' positions.

        The rows are fetched as ``(position, row)``, collated by the trainer's data collator (after the
        usual removal of unused columns) and the positions added as ``epic_row_index``, which
        :meth:`compute_loss` removes before the forward pass.
        """
        dataset = self.train_dataset
        if (
            not self._records_training_pass()
            or dataset is None
            or isinstance(dataset, torch.utils.data.IterableDataset)
            or not hasattr(dataset, "__len__")
        ):
            return super().get_train_dataloader()
        collator = self.data_collator
        if _is_hf_dataset(dataset):
            dataset = self._remove_unused_columns(dataset, description="Training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="Training")
        # Trainer wraps the collator of a non-datasets.Dataset in RemoveColumnsCollator, which leaves the
        # (position, row) pairs alone; ours, inside it, collates the rows and adds the positions.
        original = self.data_collator
        self.data_collator = _RowIndexCollator(collator)
        try:
            return self._get_dataloader(
                dataset=_IndexedRows(dataset),
                description="Training",
                batch_size=self._train_batch_size,
                sampler_fn=self._get_train_sampler,
                is_training=True,
            )
        finally:
            self.data_collator = original

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """As ``Trainer``; in the epoch before a training-pass round, also record the batch's embeddings."""
        rows = inputs.pop(ROW_INDEX_KEY, None) if hasattr(inputs, "pop") else None
        if rows is None or not self.epic_callback.recording or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from .embeddings import extract_logits

        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        self.epic_callback.record_training_batch(rows, extract_logits(outputs))
        return (loss, outputs) if return_outputs else loss

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        """Iterate the kept rows, shuffled from seed + epoch."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if dataset is None or not hasattr(dataset, "__len__") or not self._epic_on:
            self.epic_callback.sampler = None  # EPIC off: the stock sampler, as a plain Trainer
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        sampler = self.epic_callback.make_sampler(len(dataset), seed)
        # One process without drop_last: a kept count of k * batch + 1 would give BatchNorm a one-row
        # batch mid-run (with several processes accelerate pads the last batch instead).
        has_batch_norm = any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.model.modules()
        )
        guard = has_batch_norm and self.args.world_size == 1 and not self.args.dataloader_drop_last
        sampler.batch_size = self.args.per_device_train_batch_size if guard else None
        return sampler

    def set_initial_training_values(self, args: TrainingArguments, dataloader: Any):
        """As in ``Trainer``, but with ``max_steps`` set, allow as many epochs as the shrinking set needs."""
        values = list(super().set_initial_training_values(args, dataloader))
        if not self._epic_on:
            self._epic_num_train_epochs = None
            return tuple(values)
        if args.max_steps > 0:
            values[0] = sys.maxsize
        self._epic_num_train_epochs = values[0]
        return tuple(values)

    def _init_training_state(
        self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
    ) -> tuple[int, int]:
        """Resume at the epoch and step recorded in the EPIC state (epochs have different lengths)."""
        epochs_trained, steps_trained = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        epic = self.epic_callback.state
        if not self._epic_on:
            return epochs_trained, steps_trained
        if resume_from_checkpoint is not None and epic is not None and epic.epoch_start_steps:
            epochs_trained = len(epic.epoch_end_steps)
            steps_trained = 0
            if len(epic.epoch_start_steps) > epochs_trained and not self.args.ignore_data_skip:
                done = self.state.global_step - epic.epoch_start_steps[epochs_trained]
                steps_trained = done * self.args.gradient_accumulation_steps
        return epochs_trained, steps_trained

    def _run_epoch(
        self, model, epoch, train_dataloader, steps_in_epoch, num_update_steps_per_epoch, *args, **kwargs
    ):
        """Run one epoch with step counts recomputed from the kept set (the callback ran its round already)."""
        if self.epic_callback.sampler is None or self.epic_callback.state is None:  # e.g. EPIC off, no length
            return super()._run_epoch(
                model, epoch, train_dataloader, steps_in_epoch, num_update_steps_per_epoch, *args, **kwargs
            )
        steps_in_epoch = len(train_dataloader)
        accumulation = self.args.gradient_accumulation_steps
        num_update_steps_per_epoch = max(math.ceil(steps_in_epoch / accumulation), 1)
        self.epic_callback.sampler.set_epoch(epoch)
        if self.args.max_steps <= 0 and self._epic_num_train_epochs is not None:
            starts = self.epic_callback.state.epoch_start_steps
            start = starts[epoch] if epoch < len(starts) else self.state.global_step
            # As Trainer: a fractional num_train_epochs ends the last epoch after its share of the steps.
            remaining = float(self.args.num_train_epochs) - epoch
            new_max = start + math.ceil(remaining * num_update_steps_per_epoch)
            self._set_max_steps(new_max)
        return super()._run_epoch(
            model, epoch, train_dataloader, steps_in_epoch, num_update_steps_per_epoch, *args, **kwargs
        )

    def _set_max_steps(self, max_steps: int) -> None:
        """Make ``state.max_steps``, the progress bar and the LR schedule's horizon agree."""
        if max_steps == self.state.max_steps:
            return
        self.state.max_steps = max_steps
        for callback in self.callback_handler.callbacks:
            bar = getattr(callback, "training_bar", None) if isinstance(callback, ProgressCallback) else None
            if bar is not None:
                bar.total = max_steps
                bar.refresh()
        scheduler = self.lr_scheduler
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if not lambdas:
            return
        changed = False
        for i, fn in enumerate(lambdas):
            if isinstance(fn, functools.partial) and "num_training_steps" in fn.keywords:
                lambdas[i] = functools.partial(
                    fn.func, *fn.args, **{**fn.keywords, "num_training_steps": max_steps}
                )
                changed = True
        if changed:
            step = scheduler.last_epoch
            new_lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, lambdas)]
            for group, lr in zip(scheduler.optimizer.param_groups, new_lrs):
                group["lr"] = lr
            scheduler._last_lr = new_lrs

    # ----------------------------------------------------------------- saving and loading

    def _save_epic_state(self, folder: str) -> None:
        if self.epic_callback.state is not None and self.args.should_save:
            self.epic_callback.state.save(os.path.join(folder, STATE_FILE_NAME))

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Write ``epic_state.json`` into the checkpoint folder, then the stock checkpoint."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(
            self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        self._save_epic_state(folder)
        super()._save_checkpoint(model, trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the model (as ``Trainer``) and ``epic_state.json`` beside it."""
        super().save_model(output_dir, _internal_call)
        self._save_epic_state(output_dir if output_dir is not None else self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Load checkpoint weights strictly, in the model's own key format.

        transformers 5.24 saves ViT weights under legacy key names and the stock resume loads them with
        ``strict=False``, so the encoder silently stays at its initial weights. Here the checkpoint is
        read with ``from_pretrained`` (which converts the keys) and copied with ``strict=True``.
        """
        from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_NAME

        target = model if model is not None else self.model
        plain = not (self.is_deepspeed_enabled or self.is_fsdp_enabled) and isinstance(
            target, PreTrainedModel
        )
        files_ok = os.path.isfile(os.path.join(resume_from_checkpoint, SAFE_WEIGHTS_NAME)) and os.path.isfile(
            os.path.join(resume_from_checkpoint, CONFIG_NAME)
        )
        if not (plain and files_ok) or getattr(target, "peft_config", None) is not None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        loaded = type(target).from_pretrained(resume_from_checkpoint, config=target.config)
        target.load_state_dict(loaded.state_dict(), strict=True)
        del loaded

    def create_model_card(self, **kwargs: Any) -> None:
        """Write the stock card, then add the EPIC section and metadata (``hf_epic.model_card``)."""
        super().create_model_card(**kwargs)
        if not self.is_world_process_zero():
            return
        try:
            from .model_card import update_model_card
        except ModuleNotFoundError as error:
            if error.name != f"{__package__}.model_card":
                raise
            logger.info("hf_epic.model_card is not available; the model card has no EPIC section.")
            return
        update_model_card(self, path=os.path.join(self.args.output_dir, "README.md"))
