"""``EpicCallback``: the EPIC schedule and selection, as a ``transformers`` TrainerCallback."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .drop_rules import DropRule, RoundEvidence, apply_drop_rule, get_drop_rule
from .embeddings import (
    EmbeddingResult,
    compute_gradient_embeddings,
    find_classifier,
    gather_rows,
    gradient_embedding,
)
from .epic_config import default_epic_settings, validate_epic_settings
from .sampler import KeptRowsSampler
from .state import STATE_FILE_NAME, EpicState, check_state_matches_run
from .validation import (
    check_embedding_dataset,
    check_enough_rows,
    check_labels_in_range,
    check_model_logits,
    check_train_dataset,
    find_label_column,
    read_bool_column,
    read_labels,
)

__all__ = ["EpicCallback"]

logger = logging.getLogger(__name__)

POISON_COLUMN = "is_poison"


def _resolve_settings(config: Any, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Merge defaults, a config (EpicConfig or mapping) and keyword overrides (with or without ``epic_``)."""
    values = default_epic_settings()
    if config is not None:
        source = config.epic_settings() if hasattr(config, "epic_settings") else dict(config)
        for key, value in source.items():
            name = key if key.startswith("epic_") else f"epic_{key}"
            if name not in values:
                raise TypeError(f"unknown EPIC setting {key!r}; valid names: {sorted(values)}.")
            values[name] = value
    for key, value in overrides.items():
        name = key if key.startswith("epic_") else f"epic_{key}"
        if name not in values:
            raise TypeError(f"unknown EPIC setting {key!r}; valid names: {sorted(values)}.")
        values[name] = value
    return validate_epic_settings(values)


def _model_view(dataset: Any, model: Any, args: TrainingArguments) -> Any:
    """The rows as the Trainer feeds them: with ``remove_unused_columns``, only columns the model takes.

    Mirrors ``Trainer._remove_unused_columns`` (forward parameters and label columns are kept) so the
    trainer's data collator sees the same columns in the embedding pass as in training. A dataset
    with a ``set_transform`` is left as it is (its transform reads the raw columns).
    """
    import datasets

    if not getattr(args, "remove_unused_columns", False) or not isinstance(dataset, datasets.Dataset):
        return dataset
    if (dataset.format or {}).get("type") == "custom":
        return dataset
    import inspect

    keep = set(inspect.signature(model.forward).parameters) | {"label", "label_ids", "labels"}
    keep |= set(getattr(args, "label_names", None) or [])
    unused = [c for c in dataset.column_names if c not in keep]
    if not unused or len(unused) == len(dataset.column_names):
        return dataset
    return dataset.remove_columns(unused)


def _distributed() -> tuple[int, int]:
    """Return (process_index, num_processes) of the current torch.distributed group (0, 1 without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _find_batch_sampler(dataloader: Any) -> Any:
    """Return the innermost ``torch.utils.data.BatchSampler`` of a (prepared) train dataloader, or None."""
    current = getattr(dataloader, "batch_sampler", None)
    for _ in range(4):
        if current is None:
            return None
        if isinstance(current, torch.utils.data.BatchSampler):
            return current
        current = getattr(current, "batch_sampler", None)
    return None


def _result_to_json(result: Any) -> dict[str, Any]:
    """A :class:`~hf_epic.selection.SelectionResult` as plain lists and numbers (gathered between ranks)."""
    return {
        "medoids": result.medoids.tolist(),
        "assignment": result.assignment.tolist(),
        "cluster_sizes": result.cluster_sizes.tolist(),
        "dropped": result.dropped.tolist(),
        "kept": result.kept.tolist(),
        "per_class": [[int(label), dict(info)] for label, info in result.per_class.items()],
        "seconds": float(result.seconds),
        "isolation_scores": None if result.isolation_scores is None else result.isolation_scores.tolist(),
    }


def _result_from_json(data: dict[str, Any]) -> Any:
    from .selection import SelectionResult

    def ints(name: str) -> torch.Tensor:
        return torch.as_tensor(data[name], dtype=torch.long)

    return SelectionResult(
        medoids=ints("medoids"),
        assignment=ints("assignment"),
        cluster_sizes=ints("cluster_sizes"),
        dropped=ints("dropped"),
        kept=ints("kept"),
        per_class={int(label): dict(info) for label, info in data["per_class"]},
        seconds=float(data["seconds"]),
        isolation_scores=None
        if data.get("isolation_scores") is None
        else torch.as_tensor(data["isolation_scores"], dtype=torch.float64),
    )


class EpicCallback(TrainerCallback):
    """Run EPIC selection rounds during training and restrict later epochs to the kept rows.

    At the beginning of every scheduled epoch (after ``epic_start_epoch`` completed epochs, then every
    ``epic_interval`` epochs, before ``epic_stop_epoch``), it embeds every training row (dropped rows
    included, collated by the trainer's data collator, loaded with its dataloader workers) in eval
    mode, gathers the embeddings of all processes, selects the isolated rows (with several processes
    each selects its share of the classes and the results are merged; an overridden
    :meth:`select_rows` runs on rank 0 and is broadcast), lets the drop rule ``epic_drop_rule``
    (:mod:`hf_epic.drop_rules`) pick the rows to drop from them and the earlier rounds' isolation
    evidence (kept in the state), limits those to ``epic_max_drop_fraction``
    of each class (a class always keeps a row), and removes them from the training sampler. With
    ``epic_embedding_source="training_pass"`` (``EpicTrainer`` only) the embeddings are recorded from
    the training forward passes of the epoch before the round instead of an extra pass. Dropping is cumulative. Figures go to ``Trainer.log`` as ``epic/*``; the state is saved as
    ``epic_state.json`` in each checkpoint and in ``output_dir``.

    Args:
        config: An :class:`~hf_epic.EpicConfig` or a mapping of ``epic_*`` settings. If None and no
            settings are passed, the settings are read from the trainer's ``args`` when it is an
            ``EpicConfig`` (else the defaults are used).
        train_dataset: The training set (default: the train dataloader's dataset). Pass it with a plain
            ``Trainer`` when the Trainer may drop columns (e.g. ``is_poison``) from its own copy.
        embedding_dataset: The same rows with an un-augmented transform, used for the embedding pass
            (default: the training set itself).
        **settings: EPIC settings by name, with or without the ``epic_`` prefix
            (``fraction=0.2, interval=2, start_epoch=2, ...``); they override ``config``.

    Example:
        With a plain ``transformers.Trainer`` (``remove_unused_columns=False`` as usual for images)::

            trainer = Trainer(model=model, args=TrainingArguments("out", remove_unused_columns=False),
                              train_dataset=train_ds)
            trainer.add_callback(EpicCallback(fraction=0.2, interval=2, start_epoch=2))
            trainer.train()

    What a plain ``Trainer`` cannot do, and :class:`~hf_epic.EpicTrainer` does:
        The stock Trainer computes its step counts once, from the full training set. After a round
        the callback swaps the dataloader's sampler for one over the kept rows, so later epochs
        really iterate only kept rows, but with a plain Trainer: ``state.epoch`` is no longer whole
        at epoch ends, ``max_steps`` and the progress bar overshoot, the end-of-training save and
        evaluation of ``DefaultFlowCallback`` may not fire, a linear LR schedule does not reach 0, and
        with gradient accumulation the last micro-batch of an epoch leaks into the next step.
        ``epic/*`` figures land in ``state.log_history`` and the Python logger but not in
        ``report_to`` integrations (a callback cannot call ``Trainer.log``). Resuming restores
        neither the EPIC state (call :meth:`load_state` yourself) nor the right epoch. ``EpicTrainer``
        fixes all of these, loads the un-augmented embedding view, and fixes a ViT resume bug.
    """

    def __init__(
        self,
        config: Any = None,
        *,
        train_dataset: Any = None,
        embedding_dataset: Any = None,
        **settings: Any,
    ) -> None:
        explicit = config is not None or bool(settings)
        self.settings: dict[str, Any] | None = _resolve_settings(config, settings) if explicit else None
        self.train_dataset = train_dataset
        self.embedding_dataset = embedding_dataset
        self.trainer: Any = None
        self.state: EpicState | None = None
        self.sampler: KeptRowsSampler | None = None
        self.seed = 0
        self.label_column: str | None = None
        self.labels: torch.Tensor | None = None
        self.is_poison: torch.Tensor | None = None
        self.last_selection: Any = None
        self.collate_fn: Any = None
        self.num_labels: int | None = None
        self._embedding_view: Any = None
        self._epoch = 0
        self._prepared = False
        self._restored = False
        self._state_source: str | None = None
        self.eval_passes = 0  # eval-mode embedding passes run (all rows or a few), for tests and logs
        self._recording = False
        self._recorded: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._captured: dict[str, torch.Tensor] = {}
        self._hook: Any = None
        self._store: torch.Tensor | None = None  # last recorded embedding of every row (training pass)
        self._store_losses: torch.Tensor | None = None
        self._stored: torch.Tensor | None = None
        self._device_labels: torch.Tensor | None = None  # labels where the training batches are
        self._recorded_counts: tuple[int, int] | None = None  # (distinct rows, row copies) of the last round
        self._evidence: RoundEvidence | None = None  # isolation evidence of the round being selected

    # ----------------------------------------------------------------- public API

    @property
    def dropped(self) -> list[int]:
        """Sorted row positions dropped so far."""
        return list(self.state.dropped) if self.state is not None else []

    @property
    def kept(self) -> list[int]:
        """Sorted row positions still trained on."""
        return self.state.kept if self.state is not None else []

    def select_rows(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        losses: torch.Tensor,
        already_dropped: torch.Tensor,
    ) -> torch.Tensor:
        """Choose the rows to drop newly this round (override for other defenses).

        The default runs :func:`hf_epic.selection.find_isolated` over all rows (with isolation
        scores), records the round's isolation evidence, and returns the rows the drop rule
        ``epic_drop_rule`` (:mod:`hf_epic.drop_rules`) picks among them, less those dropped before.
        With several processes the built-in selection is spread over them by class (this method is
        not called); an override runs on rank 0 only and its result is broadcast. An override that
        calls this method keeps the evidence in the state.

        Args:
            embeddings: float32 ``(N, D)`` gradient embeddings of every row, in row order.
            labels: int64 ``(N,)`` labels.
            losses: float32 ``(N,)`` per-row cross-entropy.
            already_dropped: int64 sorted row positions dropped in earlier rounds.

        Returns:
            int64 sorted row positions to drop newly.
        """
        from .selection import find_isolated

        result = find_isolated(embeddings, labels, isolation_scores=True, **self._selection_kwargs())
        self.last_selection = result
        return self._apply_drop_rule(result, labels, already_dropped)

    def drop_rule(self) -> DropRule:
        """The drop rule of ``epic_drop_rule``, with ``epic_drop_persistence`` and ``epic_drop_rank_share``."""
        assert self.settings is not None
        s = self.settings
        return get_drop_rule(
            s["epic_drop_rule"], persistence=s["epic_drop_persistence"], rank_share=s["epic_drop_rank_share"]
        )

    def _apply_drop_rule(self, result: Any, labels: torch.Tensor, already: torch.Tensor) -> torch.Tensor:
        """Record ``result``'s isolation evidence for this round and return the rule's new drops."""
        assert self.state is not None
        scores = result.isolation_scores
        if scores is None:
            raise ValueError(
                "the selection result has no isolation scores; call find_isolated(..., isolation_scores=True)."
            )
        evidence = RoundEvidence.build(len(self.state.rounds) + 1, result.dropped, scores)
        self._evidence = evidence
        already = torch.as_tensor(already, dtype=torch.long)
        return apply_drop_rule(self.drop_rule(), evidence, self.state.evidence(), labels.cpu(), already)

    def is_round_epoch(self, epoch: int) -> bool:
        """Whether a selection round runs before epoch index ``epoch`` (= number of completed epochs)."""
        s = self.settings
        if s is None or not s["epic_enabled"]:
            return False
        start, stop = s["epic_start_epoch"], s["epic_stop_epoch"]
        if epoch < start or (stop is not None and epoch >= stop):
            return False
        return (epoch - start) % s["epic_interval"] == 0

    def load_state(self, source: EpicState | str | os.PathLike) -> None:
        """Restore an EPIC state (an ``EpicState``, an ``epic_state.json`` or a folder holding one).

        The state is checked against the run when training begins (:meth:`prepare`): same row count,
        dropped rows in range, the same selection settings.

        Args:
            source: Where the state comes from.
        """
        state = source if isinstance(source, EpicState) else EpicState.load(source)
        self._state_source = None if isinstance(source, EpicState) else os.fspath(source)
        self._restored = True
        self.state = state
        self._epoch = len(state.epoch_end_steps)
        if self.sampler is not None:
            if self.sampler.num_rows != state.num_rows:
                raise ValueError(
                    f"the EPIC state covers {state.num_rows} rows but the training set has {self.sampler.num_rows}; "
                    "resume with the same training set."
                )
            self.sampler.set_kept(state.kept)

    def make_sampler(self, num_rows: int, seed: int) -> KeptRowsSampler:
        """Create (or return) the training sampler over the kept rows."""
        if self.sampler is None or self.sampler.num_rows != num_rows:
            kept = self.state.kept if self.state is not None and self.state.num_rows == num_rows else None
            self.sampler = KeptRowsSampler(num_rows, seed=seed, kept=kept)
        self.sampler.seed = int(seed)
        return self.sampler

    def prepare(
        self, args: TrainingArguments, model: Any, train_dataset: Any, collate_fn: Any = None
    ) -> None:
        """Resolve settings and check the data and model (raises before any training step).

        Args:
            args: The trainer's arguments.
            model: The model to be trained.
            train_dataset: The training set.
            collate_fn: The data collator training uses; the input check and the embedding pass
                collate rows with it (None: stack the model-input columns).
        """
        if self.settings is None:
            self.settings = _resolve_settings(args if hasattr(args, "epic_settings") else None, {})
        self.seed = int(args.data_seed if args.data_seed is not None else args.seed)
        if collate_fn is not None:
            self.collate_fn = collate_fn
        if not self.settings["epic_enabled"]:
            self._prepared = True
            if train_dataset is not None and hasattr(train_dataset, "__len__"):
                if self.state is None:
                    self.state = EpicState(num_rows=len(train_dataset), config=self._json_config())
                elif self._restored:
                    check_state_matches_run(self.state, len(train_dataset), self.settings, self._state_source)
            return
        if self.train_dataset is None:
            self.train_dataset = train_dataset
        if self.settings["epic_embedding_source"] == "training_pass" and self.trainer is None:
            raise ValueError(
                "epic_embedding_source='training_pass' records embeddings in the trainer's forward pass, which "
                "a callback on a plain Trainer cannot see; use hf_epic.EpicTrainer, or "
                "epic_embedding_source='eval_pass' with EpicCallback."
            )
        check_train_dataset(self.train_dataset)
        self.label_column = find_label_column(self.train_dataset)
        self.labels = read_labels(self.train_dataset, self.label_column)
        self.is_poison = read_bool_column(self.train_dataset, POISON_COLUMN)
        if self.state is not None and self._restored:
            check_state_matches_run(self.state, len(self.train_dataset), self.settings, self._state_source)
        declared = getattr(getattr(model, "config", None), "num_labels", None)
        if declared is not None:  # checked first: a label outside the model's classes needs no forward
            check_labels_in_range(self.labels, int(declared))
        check_enough_rows(self.labels, _distributed()[1])
        if self.embedding_dataset is not None:
            check_embedding_dataset(self.embedding_dataset, self.train_dataset, self.label_column)
        view = self.embedding_dataset if self.embedding_dataset is not None else self.train_dataset
        self._embedding_view = _model_view(view, model, args)
        width = check_model_logits(
            model, self._embedding_view, int(declared) if declared is not None else None, self.collate_fn
        )
        if declared is None:  # a plain nn.Module: the class count is the width of its logits
            check_labels_in_range(self.labels, width)
        self.num_labels = width
        if self.state is None:
            self.state = EpicState(num_rows=len(self.train_dataset), config=self._json_config())
        elif self.state.num_rows != len(self.train_dataset):
            raise ValueError(
                f"the restored EPIC state covers {self.state.num_rows} rows but the training set has "
                f"{len(self.train_dataset)}; resume with the same training set."
            )
        self._prepared = True

    # ----------------------------------------------------------------- callback events

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ):
        """Check inputs, create the state and (plain Trainer) swap in the kept-rows sampler."""
        dataloader = kwargs.get("train_dataloader")
        if not self._prepared:
            dataset = (
                self.train_dataset if self.train_dataset is not None else getattr(dataloader, "dataset", None)
            )
            if self.collate_fn is None:
                self.collate_fn = getattr(dataloader, "collate_fn", None)
            self.prepare(args, kwargs.get("model"), dataset)
        if self.state is not None:
            self._epoch = len(self.state.epoch_end_steps)
        if self.trainer is None and dataloader is not None and self.state is not None:
            batch_sampler = _find_batch_sampler(dataloader)
            if batch_sampler is None:
                raise TypeError(
                    "EpicCallback could not find the train dataloader's batch sampler; use hf_epic.EpicTrainer."
                )
            if not isinstance(batch_sampler.sampler, KeptRowsSampler):
                batch_sampler.sampler = self.make_sampler(self.state.num_rows, self.seed)
        return control

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ):
        """Record the epoch start, run a selection round when scheduled, and set the sampler's epoch."""
        epoch = self._epoch
        if self.state is None:
            return control
        if len(self.state.epoch_start_steps) <= epoch:
            self.state.epoch_start_steps.append(int(state.global_step))
        done = any(r.get("epoch") == epoch for r in self.state.rounds)
        if self.is_round_epoch(epoch) and not done:
            self.run_round(args, state, kwargs.get("model"), epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        last_epoch = epoch + 1 >= (state.num_train_epochs or epoch + 2)  # no round after the last epoch
        if self._records_training_pass() and self.is_round_epoch(epoch + 1) and not last_epoch:
            self.start_recording(kwargs.get("model"))
        return control

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ):
        """Record the global step at which the epoch ended."""
        self.stop_recording()
        if self.state is not None:
            if len(self.state.epoch_end_steps) <= self._epoch:
                self.state.epoch_end_steps.append(int(state.global_step))
            self._epoch += 1
        return control

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        """With a plain Trainer, write ``epic_state.json`` into the checkpoint just saved."""
        if self.trainer is None and self.state is not None and args.should_save:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                self.state.save(os.path.join(folder, STATE_FILE_NAME))
        return control

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ):
        """Write ``epic_state.json`` into ``output_dir``."""
        self.stop_recording()
        if self.state is not None and args.should_save:
            self.state.save(os.path.join(args.output_dir, STATE_FILE_NAME))
        return control

    # ----------------------------------------------------------------- the round

    def _records_training_pass(self) -> bool:
        s = self.settings
        return bool(s is not None and s["epic_enabled"] and s["epic_embedding_source"] == "training_pass")

    def _json_config(self) -> dict[str, Any]:
        return dict(self.settings or {})

    def run_round(
        self, args: TrainingArguments, state: TrainerState, model: Any, epoch: int
    ) -> dict[str, Any]:
        """Run one selection round now and return its record (also appended to ``self.state.rounds``).

        Args:
            args: The trainer's arguments.
            state: The trainer's state (for the global step).
            model: The (unwrapped) model.
            epoch: Number of completed epochs.
        """
        assert self.settings is not None and self.state is not None and self.labels is not None
        rank, world = _distributed()
        emb, eval_pass_rows = self._round_embeddings(args, model)
        already = torch.as_tensor(self.state.dropped, dtype=torch.long)
        payload = self._select(emb, already, rank, world)
        newly_list: list[int] = payload[0]["newly"]
        capped_per_class: dict[str, int] = payload[0]["capped"]
        selection_seconds = float(payload[0]["seconds"])
        classes_per_rank: list[list[int]] = payload[0]["classes_per_rank"]
        evidence: dict[str, list] = payload[0]["evidence"] or {
            "isolated_rows": None,
            "isolation_scores": None,
        }
        self._evidence = None
        newly_t = torch.as_tensor(newly_list, dtype=torch.long)
        dropped = sorted(set(self.state.dropped) | set(newly_list))
        per_class: dict[str, int] = {}
        for label in self.labels[newly_t].tolist():
            per_class[str(label)] = per_class.get(str(label), 0) + 1
        share_before = self._class_shares(self.state.dropped)
        shares = self._class_shares(dropped)
        record: dict[str, Any] = {
            "round": len(self.state.rounds) + 1,
            "epoch": epoch,
            "global_step": int(state.global_step),
            "newly_dropped": newly_list,
            "newly_dropped_per_class": dict(sorted(per_class.items(), key=lambda kv: int(kv[0]))),
            "num_dropped_total": len(dropped),
            "num_kept": self.state.num_rows - len(dropped),
            "poisons_dropped": None,
            "clean_dropped": None,
            "poisons_dropped_total": None,
            "clean_dropped_total": None,
            "dropped_share_per_class": {c: round(v, 4) for c, v in shares.items()},
            "capped_per_class": capped_per_class,
            "drop_rule": self.settings["epic_drop_rule"],
            **evidence,
            "embedding_source": self.settings["epic_embedding_source"],
            "eval_pass_rows": eval_pass_rows,
            "recorded_rows": self._recorded_counts[0] if self._recorded_counts else None,
            "recorded_row_copies": self._recorded_counts[1] if self._recorded_counts else None,
            "selection_classes_per_rank": classes_per_rank,
            "embedding_seconds": round(emb.seconds, 4),
            "selection_seconds": round(selection_seconds, 4),
        }
        if self.is_poison is not None:
            new_poison = int(self.is_poison[newly_t].sum()) if newly_list else 0
            all_t = torch.as_tensor(dropped, dtype=torch.long)
            total_poison = int(self.is_poison[all_t].sum()) if dropped else 0
            record.update(
                poisons_dropped=new_poison,
                clean_dropped=len(newly_list) - new_poison,
                poisons_dropped_total=total_poison,
                clean_dropped_total=len(dropped) - total_poison,
            )
        self.state.dropped = dropped
        self.state.rounds.append(record)
        if self.sampler is not None:
            self.sampler.set_kept(self.state.kept)
        if self.settings["epic_save_embeddings"] and rank == 0:
            self._save_embeddings(args, record, emb.embeddings, already, newly_t)
        self._log(args, state, record)
        if rank == 0:
            self._warn_about_shares(record, share_before, shares)
        return record

    def _round_embeddings(self, args: TrainingArguments, model: Any) -> tuple[EmbeddingResult, int]:
        """The embeddings of every row for this round, and how many rows an eval pass embedded.

        ``eval_pass``: one eval-mode pass over all rows. ``training_pass``: the rows recorded during the
        previous epoch (gathered from every process); dropped rows reuse their last recorded embedding;
        rows with none (kept rows that epoch did not train on, or any row before its first recording) are
        embedded by an eval pass over just them.
        """
        assert self.settings is not None and self.state is not None and self.labels is not None
        s = self.settings
        n = self.state.num_rows
        if s["epic_embedding_source"] != "training_pass":
            self._recorded_counts = None
            return self.embedding_pass(args, model, None), n
        start = time.perf_counter()
        self.stop_recording()
        local = self._recorded
        if local:
            rows_l = torch.cat([r for r, _, _ in local])
            emb_l = torch.cat([e for _, e, _ in local])
            loss_l = torch.cat([loss for _, _, loss in local])
        else:
            rows_l, emb_l, loss_l = torch.zeros(0, dtype=torch.long), torch.zeros(0, 0), torch.zeros(0)
        self._recorded = []
        copies = len(rows_l)
        _, world = _distributed()
        if world > 1:
            from accelerate.state import PartialState
            from accelerate.utils import gather

            copies = int(gather(torch.tensor([copies], device=PartialState().device)).sum())
        rows, emb, losses = gather_rows(rows_l, emb_l, loss_l)
        self._recorded_counts = (int(len(rows)), copies)
        seen = torch.zeros(n, dtype=torch.bool)
        seen[rows] = True
        if len(rows):
            self._keep_embeddings(rows, emb, losses)
        dropped = torch.zeros(n, dtype=torch.bool)
        dropped[torch.as_tensor(self.state.dropped, dtype=torch.long)] = True
        stored = self._stored if self._stored is not None else torch.zeros(n, dtype=torch.bool)
        missing_rows = (((~dropped) & (~seen)) | (dropped & ~stored)).nonzero().flatten()
        if len(missing_rows):
            if len(rows):
                logger.info(
                    "EPIC training-pass embeddings: %d row(s) have no recorded embedding (not trained on in the "
                    "last epoch, or never recorded); an eval pass embeds them.",
                    len(missing_rows),
                )
            else:
                logger.warning(
                    "EPIC recorded no training-pass embeddings in the epoch before this round (a resume at an "
                    "epoch end, or a training set without a length); an eval pass embeds all %d rows.",
                    len(missing_rows),
                )
            extra = self.embedding_pass(args, model, missing_rows)
            self._keep_embeddings(extra.rows, extra.embeddings, extra.losses)
        assert self._store is not None and self._store_losses is not None
        result = EmbeddingResult(
            rows=torch.arange(n, dtype=torch.long),
            embeddings=self._store.clone(),
            labels=self.labels.clone(),
            losses=self._store_losses.clone(),
            seconds=time.perf_counter() - start,
        )
        return result, int(len(missing_rows))

    def _keep_embeddings(self, rows: torch.Tensor, embeddings: torch.Tensor, losses: torch.Tensor) -> None:
        """Store the latest embedding and loss of ``rows`` (the store restarts if the width changes)."""
        assert self.state is not None
        n, width = self.state.num_rows, int(embeddings.shape[1])
        if self._store is None or self._store.shape[1] != width:
            self._store = torch.zeros(n, width)
            self._store_losses = torch.zeros(n)
            self._stored = torch.zeros(n, dtype=torch.bool)
        assert self._store_losses is not None and self._stored is not None
        self._store[rows] = embeddings.float()
        self._store_losses[rows] = losses.float()
        self._stored[rows] = True

    def embedding_pass(
        self, args: TrainingArguments, model: Any, rows: torch.Tensor | None = None
    ) -> EmbeddingResult:
        """Embed ``rows`` (None: every row) in an eval-mode pass, loaded as ``Trainer.evaluate`` loads rows.

        The batch size is ``epic_embedding_batch_size`` or ``per_device_eval_batch_size``; workers,
        pin memory, prefetch and the data collator are the trainer's; the forward runs in the trainer's
        autocast context. Call after :meth:`prepare`. Every process must call it (the rows are sharded
        and gathered).

        Args:
            args: The trainer's arguments.
            model: The (unwrapped) model.
            rows: Row positions to embed.
        """
        assert self.settings is not None and self.labels is not None
        s = self.settings
        rank, _ = _distributed()
        dataset = self._embedding_view
        if dataset is None:
            view = self.embedding_dataset if self.embedding_dataset is not None else self.train_dataset
            dataset = _model_view(view, model, args)
        on_gpu = next(model.parameters()).device.type != "cpu"
        loader_options: dict[str, Any] = {
            "prefetch_factor": args.dataloader_prefetch_factor,
            "persistent_workers": False,  # the pass builds its own loader each round
            "multiprocessing_context": args.dataloader_multiprocessing_context,
        }
        trainer = self.trainer
        self.eval_passes += 1
        return compute_gradient_embeddings(
            model,
            dataset,
            self.labels,
            kind=s["epic_embedding"],
            batch_size=s["epic_embedding_batch_size"] or args.per_device_eval_batch_size,
            show_progress=rank == 0 and not args.disable_tqdm,
            num_workers=args.dataloader_num_workers,
            collate_fn=self.collate_fn,
            pin_memory=bool(args.dataloader_pin_memory and on_gpu),
            rows=rows,
            loader_options=loader_options,
            forward_context=trainer.autocast_smart_context_manager if trainer is not None else None,
        )

    def _select(
        self, emb: EmbeddingResult, already: torch.Tensor, rank: int, world: int
    ) -> list[dict[str, Any]]:
        """Select this round's new drops; every rank returns the identical ``[payload]``.

        With several processes and the built-in EPIC selection, each rank selects its share of the
        classes (:func:`~hf_epic.selection.partition_classes`, balanced by rows), the results are
        gathered in memory and merged (:func:`~hf_epic.selection.merge_results`): the same drops as one
        process. An overridden :meth:`select_rows` runs on rank 0 and its result is broadcast.
        """
        from accelerate.utils import broadcast_object_list

        assert self.settings is not None and self.state is not None and self.labels is not None
        all_classes = sorted(set(self.labels.tolist()))
        start = time.perf_counter()
        builtin = getattr(self.select_rows, "__func__", None) is EpicCallback.select_rows  # not overridden
        if world > 1 and builtin:
            from .selection import find_isolated, merge_results, partition_classes

            parts = partition_classes(emb.labels, world)
            mine = find_isolated(
                emb.embeddings,
                emb.labels,
                classes=parts[rank],
                isolation_scores=True,
                **self._selection_kwargs(),
            )
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, _result_to_json(mine))
            merged = merge_results([_result_from_json(r) for r in gathered])
            self.last_selection = merged
            # the same merged evidence and state on every rank: every rank's rule picks the same rows
            newly = self._apply_drop_rule(merged, emb.labels, already)
            newly, capped = self._apply_cap(newly, already, emb.losses)
            seconds = max(float(r["seconds"]) for r in gathered) + (
                time.perf_counter() - start - mine.seconds
            )
            return [
                {
                    "newly": newly.tolist(),
                    "capped": capped,
                    "seconds": seconds,
                    "classes_per_rank": parts,
                    "evidence": self._evidence.to_record() if self._evidence is not None else None,
                }
            ]
        payload: list[Any] = [None]
        if rank == 0:
            self._evidence = None
            newly = torch.as_tensor(self.select_rows(emb.embeddings, emb.labels, emb.losses, already))
            newly = torch.unique(newly.to(torch.long).flatten())
            newly = newly[~torch.isin(newly, already)]
            if newly.numel() and (newly[0] < 0 or newly[-1] >= self.state.num_rows):
                raise ValueError(f"select_rows returned row positions outside [0, {self.state.num_rows}).")
            newly, capped = self._apply_cap(newly, already, emb.losses)
            parts = [all_classes] + [[] for _ in range(world - 1)]
            payload = [
                {
                    "newly": newly.tolist(),
                    "capped": capped,
                    "seconds": time.perf_counter() - start,
                    "classes_per_rank": parts,
                    "evidence": self._evidence.to_record() if self._evidence is not None else None,
                }
            ]
        if world > 1:
            payload = broadcast_object_list(payload, from_process=0)
        return payload

    def _selection_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~hf_epic.selection.find_isolated` for this round."""
        s = self.settings
        assert s is not None
        return {
            "fraction": s["epic_fraction"],
            "metric": s["epic_metric"],
            "greedy": s["epic_greedy"],
            "cluster_threshold": s["epic_cluster_threshold"],
            "seed": self.seed + len(self.state.rounds) if self.state is not None else self.seed,
            "epsilon": s["epic_stochastic_epsilon"],
            "memory_budget_mb": s["epic_memory_budget_mb"],
        }

    # ----------------------------------------------------------------- training-pass recording

    @property
    def recording(self) -> bool:
        """Whether the current epoch records training-pass embeddings (the epoch before a round)."""
        return self._recording

    def start_recording(self, model: Any) -> None:
        """Record the embeddings of the rows the training forward passes see, until :meth:`stop_recording`."""
        assert self.settings is not None
        self.stop_recording()
        self._recorded = []
        self._captured = {}
        self._device_labels = None
        if self.settings["epic_embedding"] == "last_layer_grad":
            classifier = find_classifier(model)
            captured = self._captured

            def hook(_module: Any, inputs: tuple) -> None:
                captured["h"] = inputs[0]

            self._hook = classifier.register_forward_pre_hook(hook)
        self._recording = True

    def stop_recording(self) -> None:
        """Stop recording (the rows recorded so far are kept for the next round)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._recording = False

    def record_training_batch(self, rows: torch.Tensor, logits: torch.Tensor) -> None:
        """Record the embeddings of one training micro-batch from its forward pass.

        Args:
            rows: int64 row positions of the batch's rows (in the training set), in batch order.
            logits: ``(B, C)`` logits of the training forward pass (penultimate features for
                ``last_layer_grad`` come from the classifier's pre-hook set by :meth:`start_recording`).
        """
        if not self._recording:
            return
        assert self.settings is not None and self.labels is not None
        kind = self.settings["epic_embedding"]
        rows = rows.detach().to(torch.long).flatten()
        if self._device_labels is None or self._device_labels.device != rows.device:
            self._device_labels = self.labels.to(rows.device)
        labels = self._device_labels[rows]
        features = self._captured.pop("h", None)
        with torch.no_grad():
            # Up to 128 classes the embeddings stay on the accelerator until the round (no synchronisation
            # per step); wider ones (many classes, last-layer embeddings) go to the CPU at once.
            wide = kind == "last_layer_grad" or logits.shape[-1] > 128
            g, losses = gradient_embedding(logits, labels, kind, features, to_cpu=wide)
        self._recorded.append((rows.to(g.device), g, losses))

    def _class_shares(self, dropped: list[int]) -> dict[str, float]:
        """Share of each class's rows among ``dropped`` (every class of the training set, by label)."""
        assert self.labels is not None
        counts = torch.bincount(self.labels)
        gone = torch.bincount(self.labels[torch.as_tensor(dropped, dtype=torch.long)], minlength=len(counts))
        return {str(c): float(gone[c]) / float(counts[c]) for c in range(len(counts)) if counts[c] > 0}

    def _apply_cap(
        self, newly: torch.Tensor, already: torch.Tensor, losses: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, int]]:
        """Limit the cumulative drop of every class to ``epic_max_drop_fraction`` and keep one row of each.

        Where a class's new drops would pass its allowance, the rows with the highest loss are dropped
        (ties: lowest position first) and the others kept. Returns the drops and, per class, how many
        rows the cap kept.
        """
        assert self.settings is not None and self.labels is not None
        cap = float(self.settings["epic_max_drop_fraction"])
        labels = self.labels
        counts = torch.bincount(labels)
        before = torch.bincount(labels[already], minlength=len(counts))
        keep: list[torch.Tensor] = []
        capped: dict[str, int] = {}
        new_labels = labels[newly]
        for c in torch.unique(new_labels).tolist():
            rows = newly[new_labels == c]
            limit = min(math.floor(cap * int(counts[c]) + 1e-9), int(counts[c]) - 1)
            allowed = max(limit - int(before[c]), 0)
            if rows.numel() > allowed:
                # ``rows`` is sorted, so the stable sort breaks loss ties by the lowest position.
                order = torch.sort(-losses[rows].double(), stable=True).indices
                capped[str(c)] = int(rows.numel()) - allowed
                rows = torch.sort(rows[order[:allowed]]).values
            keep.append(rows)
        result = torch.sort(torch.cat(keep)).values if keep else newly
        return result, capped

    def _warn_about_shares(
        self, record: dict[str, Any], before: dict[str, float], after: dict[str, float]
    ) -> None:
        assert self.settings is not None
        cap = float(self.settings["epic_max_drop_fraction"])
        if record["capped_per_class"]:
            logger.warning(
                "EPIC round %d: the per-class cap (epic_max_drop_fraction=%s; every class keeps at least one "
                "row) kept rows EPIC selected, per class: %s.",
                record["round"],
                cap,
                record["capped_per_class"],
            )
        crossed = {c: v for c, v in after.items() if v > cap / 2 and before.get(c, 0.0) <= cap / 2}
        if crossed:
            shown = ", ".join(f"class {c}: {100 * v:.1f} %" for c, v in list(crossed.items())[:20])
            logger.warning(
                "EPIC has now removed more than half of epic_max_drop_fraction=%s of some classes (%s%s). If that "
                "is more than you expect, lower epic_fraction or epic_cluster_threshold, or set "
                "epic_max_drop_fraction.",
                cap,
                shown,
                ", ..." if len(crossed) > 20 else "",
            )

    def _save_embeddings(
        self,
        args: TrainingArguments,
        record: dict,
        embeddings: torch.Tensor,
        before: torch.Tensor,
        newly: torch.Tensor,
    ) -> None:
        from safetensors.torch import save_file

        n = self.state.num_rows
        dropped_before = torch.zeros(n, dtype=torch.bool)
        dropped_before[before] = True
        newly_mask = torch.zeros(n, dtype=torch.bool)
        newly_mask[newly] = True
        tensors = {
            "embeddings": embeddings.float().contiguous(),
            "labels": self.labels.clone(),
            "dropped_before": dropped_before,
            "newly_dropped": newly_mask,
        }
        if self.is_poison is not None:
            tensors["is_poison"] = self.is_poison.clone()
        folder = os.path.join(args.output_dir, "epic_embeddings")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"round_{record['round']:03d}.safetensors")
        save_file(
            tensors, path + ".tmp", metadata={"round": str(record["round"]), "epoch": str(record["epoch"])}
        )
        os.replace(path + ".tmp", path)

    def _log(self, args: TrainingArguments, state: TrainerState, record: dict[str, Any]) -> None:
        logs: dict[str, float] = {
            "epic/round": record["round"],
            "epic/dropped_new": len(record["newly_dropped"]),
            "epic/dropped_total": record["num_dropped_total"],
            "epic/kept": record["num_kept"],
            "epic/max_class_dropped_share": max(record["dropped_share_per_class"].values(), default=0.0),
            "epic/capped": sum(record["capped_per_class"].values()),
            "epic/embedding_seconds": record["embedding_seconds"],
            "epic/eval_pass_rows": record["eval_pass_rows"],
            "epic/selection_seconds": record["selection_seconds"],
        }
        if record["poisons_dropped"] is not None:
            logs.update(
                {
                    "epic/poisons_dropped": record["poisons_dropped"],
                    "epic/clean_dropped": record["clean_dropped"],
                    "epic/poisons_dropped_total": record["poisons_dropped_total"],
                    "epic/clean_dropped_total": record["clean_dropped_total"],
                }
            )
        if self.trainer is not None:
            self.trainer.log(logs)
        else:
            state.log_history.append({**logs, "epoch": state.epoch, "step": state.global_step})
        shares = record["dropped_share_per_class"]
        logger.info(
            "EPIC round %d (epoch %d): dropped %d new, %d total, %d kept; share of each class dropped: %s",
            record["round"],
            record["epoch"],
            len(record["newly_dropped"]),
            record["num_dropped_total"],
            record["num_kept"],
            ", ".join(f"{c}: {100 * v:.1f} %" for c, v in list(shares.items())[:50])
            + (", ..." if len(shares) > 50 else ""),
        )
