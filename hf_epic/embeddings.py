"""Per-row gradient embeddings of a classifier, the input of EPIC's selection.

``logits_grad``: ``g = softmax(z) - onehot(y)``, the gradient of the cross-entropy loss with respect
to the logits (C dims), as in the reference code (logits include the classifier bias).
``last_layer_grad``: ``g (x) h``, the gradient with respect to the final linear layer's weight, where
``h`` is the classifier's input (penultimate features, captured with a forward pre-hook); C x H dims.

The pass runs in eval mode under ``torch.no_grad`` over the rows it is given. With several
processes each rank embeds a disjoint shard and the shards are gathered with accelerate, then
de-duplicated by row position, so every rank ends with all N rows.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "EmbeddingResult",
    "collate_rows",
    "compute_gradient_embeddings",
    "find_classifier",
    "gather_rows",
    "gradient_embedding",
    "model_input_names",
]

LABEL_KEYS = ("labels", "label", "label_ids")


@dataclass
class EmbeddingResult:
    """Gradient embeddings of a set of rows.

    Args:
        rows: int64 row positions, sorted.
        embeddings: float32 ``(len(rows), D)``.
        labels: int64 labels of the rows.
        losses: float32 per-row cross-entropy.
        seconds: Wall time of the pass (including the gather).
    """

    rows: torch.Tensor
    embeddings: torch.Tensor
    labels: torch.Tensor
    losses: torch.Tensor
    seconds: float


def find_classifier(model: nn.Module) -> nn.Linear:
    """Return the final ``nn.Linear`` whose output are the logits.

    Looks at ``model.classifier`` (ViT and most HF classifiers), then ``model.timm_model.get_classifier()``
    (``TimmWrapperForImageClassification``), then the last ``nn.Linear`` with ``num_labels`` outputs.

    Args:
        model: An image classifier.

    Raises:
        ValueError: If no final linear layer is found.
    """
    candidate = getattr(model, "classifier", None)
    if isinstance(candidate, nn.Linear):
        return candidate
    timm_model = getattr(model, "timm_model", None)
    if timm_model is not None and hasattr(timm_model, "get_classifier"):
        head = timm_model.get_classifier()
        if isinstance(head, nn.Linear):
            return head
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if num_labels is not None:
        linears = [m for m in linears if m.out_features == num_labels]
    if not linears:
        raise ValueError(
            f"{type(model).__name__} has no final nn.Linear producing the logits, which "
            "epic_embedding='last_layer_grad' needs; use epic_embedding='logits_grad'."
        )
    return linears[-1]


def model_input_names(model: nn.Module) -> list[str]:
    """Names of ``model.forward``'s parameters that a dataset row can feed (labels excluded)."""
    params = inspect.signature(model.forward).parameters
    skip = set(LABEL_KEYS) | {"return_dict", "output_attentions", "output_hidden_states", "kwargs"}
    return [n for n, p in params.items() if n not in skip and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def extract_logits(output: object) -> torch.Tensor:
    """Return the logits of a model output (ModelOutput, dict, tuple or tensor).

    Raises:
        ValueError: If the output holds no logits.
    """
    logits = None
    if isinstance(output, torch.Tensor):
        logits = output
    elif isinstance(output, dict) or hasattr(output, "keys"):
        logits = output.get("logits") if hasattr(output, "get") else None
    else:
        logits = getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        raise ValueError(
            f"the model returned {type(output).__name__} without 2-D 'logits' (batch, num_labels); EPIC needs a "
            "classifier whose output has a `logits` field, e.g. an *ForImageClassification model."
        )
    return logits


def _collate(items: list[dict], input_names: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Stack the model-input columns of a list of transformed rows into tensors on ``device``."""
    batch: dict[str, torch.Tensor] = {}
    for name in input_names:
        if name not in items[0]:
            continue
        values = [item[name] for item in items]
        if isinstance(values[0], torch.Tensor):
            tensor = torch.stack(values)
        else:
            tensor = torch.as_tensor(values)
        if tensor.is_floating_point():
            tensor = tensor.float()
        batch[name] = tensor.to(device)
    if not batch:
        raise ValueError(
            f"dataset rows have columns {sorted(items[0])} but the model's forward takes {list(input_names)}; "
            "give the dataset a transform (set_transform/with_transform) producing e.g. 'pixel_values'."
        )
    return batch


def _model_device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return param.device, (floats[0] if floats else torch.float32)


def collate_rows(items: list[dict], model: nn.Module, collate_fn: Any = None) -> dict[str, Any]:
    """Turn transformed rows into the keyword arguments of ``model.forward``, as training does.

    With ``collate_fn`` (the trainer's data collator, e.g. ``DataCollatorWithPadding``) the rows are
    collated by it and the model's inputs are taken from its output (labels are left out: the
    embedding pass uses its own). Without it, the model-input columns are stacked. Floating tensors
    are cast to the model's floating dtype and everything is moved to the model's device.

    Raises:
        ValueError: If the collated batch feeds none of the model's inputs.
    """
    device, dtype = _model_device_and_dtype(model)
    batch = _LoaderCollate(collate_fn, model_input_names(model))(items)
    return _to_model(batch, device, dtype, non_blocking=False)


class _LoaderCollate:
    """The embedding loader's ``collate_fn``: collates rows where the loader runs it (its workers).

    With the trainer's data collator the batch is collated by it, as in ``Trainer.evaluate``; without
    one the model-input columns are stacked. The result stays on the CPU (pinned by the loader when
    asked); :func:`_to_model` moves it to the model.
    """

    def __init__(self, collate_fn: Any, input_names: Sequence[str]) -> None:
        self.collate_fn = collate_fn
        self.input_names = list(input_names)

    def __call__(self, items: list[dict]) -> dict[str, Any]:
        if self.collate_fn is None:
            return _collate(items, self.input_names, torch.device("cpu"))
        collated = self.collate_fn(items)
        if not hasattr(collated, "items"):
            raise ValueError(
                f"the data collator returned a {type(collated).__name__}; EPIC needs a dict of model inputs "
                "(as Trainer passes model(**batch))."
            )
        batch = {k: v for k, v in collated.items() if k in self.input_names}
        if not batch:
            raise ValueError(
                f"the data collator returns {sorted(collated)} but the model's forward takes "
                f"{self.input_names}; make the collator (or the dataset's transform) produce the model's inputs."
            )
        return batch


def _to_model(batch: dict[str, Any], device: torch.device, dtype: torch.dtype, non_blocking: bool) -> dict:
    """Cast floating tensors to the model's dtype and move every tensor to its device."""
    out: dict[str, Any] = {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and value.dtype != dtype:
                value = value.to(dtype)
            value = value.to(device, non_blocking=non_blocking)
        out[name] = value
    return out


def gradient_embedding(
    logits: torch.Tensor,
    labels: torch.Tensor,
    kind: str,
    features: torch.Tensor | None = None,
    to_cpu: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding and cross-entropy of a batch from its logits (and penultimate features).

    Args:
        logits: ``(B, C)`` logits (any floating dtype; computed in float32).
        labels: ``(B,)`` int64 labels.
        kind: ``"logits_grad"`` (``softmax - onehot``) or ``"last_layer_grad"`` (its outer product with
            ``features``).
        features: ``(B, H)`` classifier inputs, needed for ``"last_layer_grad"``.
        to_cpu: Move the result to the CPU (False: leave it on the logits' device, no synchronisation).

    Returns:
        (embeddings, losses), float32.

    Raises:
        ValueError: If ``"last_layer_grad"`` gets no 2-D features.
    """
    logits = logits.detach().float()
    y = labels.to(logits.device)
    probs = torch.softmax(logits, dim=-1)
    g = probs - F.one_hot(y, probs.shape[-1]).to(probs.dtype)
    if kind == "last_layer_grad":
        if features is None or features.ndim != 2:
            raise ValueError(
                "could not read 2-D penultimate features at the classifier's input; "
                "use epic_embedding='logits_grad' for this model."
            )
        g = (g[:, :, None] * features.detach().float()[:, None, :]).flatten(1)
    losses = F.cross_entropy(logits, y, reduction="none")
    return (g.cpu(), losses.cpu()) if to_cpu else (g, losses)


def _local_pass(
    model: nn.Module,
    dataset,
    rows: torch.Tensor,
    labels: torch.Tensor,
    kind: str,
    batch_size: int,
    show_progress: bool,
    num_workers: int = 0,
    collate_fn: Any = None,
    pin_memory: bool = False,
    loader_options: dict[str, Any] | None = None,
    forward_context: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed ``rows`` on this process. Returns (embeddings, losses)."""
    import contextlib

    from tqdm.auto import tqdm

    captured: dict[str, torch.Tensor] = {}
    handle = None
    if kind == "last_layer_grad":
        classifier = find_classifier(model)

        def hook(_module: nn.Module, args: tuple) -> None:
            captured["h"] = args[0]

        handle = classifier.register_forward_pre_hook(hook)
    chunks, loss_chunks = [], []
    was_training = model.training
    device, dtype = _model_device_and_dtype(model)
    model.eval()
    try:
        with torch.no_grad():
            chunks_of_rows = [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]
            options = dict(loader_options or {})
            if num_workers == 0:  # DataLoader refuses worker-only options without workers
                for name in ("prefetch_factor", "persistent_workers", "multiprocessing_context"):
                    options.pop(name, None)
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_sampler=[idx.tolist() for idx in chunks_of_rows],
                collate_fn=_LoaderCollate(collate_fn, model_input_names(model)),
                num_workers=num_workers,
                pin_memory=pin_memory,
                **options,
            )
            # A bar without the iterable: tqdm.auto's asyncio tqdm calls iter() on what it wraps, which
            # would start a second set of loader workers.
            progress = tqdm(
                total=len(chunks_of_rows), desc="EPIC embeddings", disable=not show_progress, leave=False
            )
            for idx, batch in zip(chunks_of_rows, loader):
                progress.update(1)
                inputs = _to_model(batch, device, dtype, non_blocking=pin_memory)
                with forward_context() if forward_context is not None else contextlib.nullcontext():
                    logits = extract_logits(model(**inputs))
                g, losses = gradient_embedding(logits, labels[idx], kind, captured.pop("h", None))
                chunks.append(g)
                loss_chunks.append(losses)
            progress.close()
    finally:
        if handle is not None:
            handle.remove()
        model.train(was_training)
    if not chunks:
        return torch.zeros(0, 0), torch.zeros(0)
    return torch.cat(chunks), torch.cat(loss_chunks)


def gather_rows(
    rows: torch.Tensor, embeddings: torch.Tensor, losses: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather per-process (rows, embeddings, losses) onto every process, sorted and de-duplicated by row.

    Every process must call it (a collective). Shards may differ in length (even empty); a row that
    several processes (or one process several times) hold keeps the copy of the lowest rank, first
    occurrence, so every process ends with the identical result. Without torch.distributed the
    input is only sorted and de-duplicated.

    Args:
        rows: int64 ``(n,)`` row positions held here.
        embeddings: float32 ``(n, D)`` (``D`` may be 0 when ``n`` is 0).
        losses: float32 ``(n,)``.

    Returns:
        (rows, embeddings, losses) over the union of the processes' rows, in row order, on the CPU.
    """
    from accelerate.state import PartialState
    from accelerate.utils import gather

    rows = rows.to(torch.long).cpu()
    embeddings = embeddings.float().cpu().reshape(len(rows), -1) if len(rows) else embeddings.float().cpu()
    losses = losses.float().cpu()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        device = PartialState().device
        sizes = gather(
            torch.tensor([len(rows), embeddings.shape[1] if embeddings.ndim == 2 else 0], device=device)
        )
        sizes = sizes.reshape(-1, 2).cpu()
        longest, dim = int(sizes[:, 0].max()), int(sizes[:, 1].max())
        pad = longest - len(rows)
        emb = embeddings.reshape(len(rows), dim) if len(rows) else torch.zeros(0, dim)
        emb_p = torch.cat([emb, torch.zeros(pad, dim)]).to(device)
        loss_p = torch.cat([losses, torch.zeros(pad)]).to(device)
        rows_p = torch.cat([rows, torch.full((pad,), -1, dtype=torch.long)]).to(device)
        rows, embeddings, losses = gather(rows_p).cpu(), gather(emb_p).cpu(), gather(loss_p).cpu()
        valid = rows >= 0
        rows, embeddings, losses = rows[valid], embeddings[valid], losses[valid]
    if len(rows) == 0:
        return rows, embeddings.reshape(0, embeddings.shape[-1] if embeddings.ndim == 2 else 0), losses
    order = torch.sort(rows, stable=True).indices
    rows, embeddings, losses = rows[order], embeddings[order], losses[order]
    keep = torch.ones(len(rows), dtype=torch.bool)
    keep[1:] = rows[1:] != rows[:-1]  # de-duplicate by row position
    return rows[keep], embeddings[keep], losses[keep]


def compute_gradient_embeddings(
    model: nn.Module,
    dataset,
    labels: torch.Tensor | Sequence[int],
    *,
    kind: str = "logits_grad",
    batch_size: int = 256,
    show_progress: bool = False,
    distributed: bool = True,
    num_workers: int = 0,
    collate_fn: Any = None,
    pin_memory: bool = False,
    rows: torch.Tensor | Sequence[int] | None = None,
    loader_options: dict[str, Any] | None = None,
    forward_context: Any = None,
) -> EmbeddingResult:
    """Compute the gradient embedding of every row of ``dataset`` (or of ``rows``).

    Args:
        model: A classifier returning ``logits``; it is put in eval mode for the pass and restored after.
        dataset: A map-style ``datasets.Dataset`` (with its transform) whose rows feed ``model.forward``.
        labels: The label of every row (int64, length ``len(dataset)``).
        kind: ``"logits_grad"`` or ``"last_layer_grad"``.
        batch_size: Rows per forward pass.
        show_progress: Show a tqdm progress bar.
        num_workers: DataLoader worker processes that load, transform and collate rows (0: in this process).
        collate_fn: The data collator training uses (e.g. ``DataCollatorWithPadding`` for text of
            varying length); it runs where the loader collates (in the workers, as in
            ``Trainer.evaluate``). None: stack the model-input columns.
        pin_memory: Pin the loaded batches' memory (as ``dataloader_pin_memory``; only useful on a GPU).
        distributed: With several processes (accelerate/torch.distributed), shard the rows across
            ranks and gather the result so every rank gets all rows. If False, embed all rows here.
        rows: Embed only these row positions (default: every row); the result covers exactly them.
        loader_options: Further ``DataLoader`` keywords (``prefetch_factor``, ``persistent_workers``,
            ``multiprocessing_context``), as the trainer's arguments set them.
        forward_context: A callable returning a context manager the forward passes run in (e.g. the
            trainer's autocast for mixed precision).

    Returns:
        An :class:`EmbeddingResult` over the rows, in row order.
    """
    from accelerate.state import PartialState

    start = time.perf_counter()
    labels = torch.as_tensor(labels, dtype=torch.long)
    num_rows = len(dataset)
    wanted = (
        torch.arange(num_rows, dtype=torch.long)
        if rows is None
        else torch.unique(torch.as_tensor(rows, dtype=torch.long).flatten())
    )
    world, rank = 1, 0
    multi = distributed and torch.distributed.is_available() and torch.distributed.is_initialized()
    if multi:
        state = PartialState()
        world, rank = state.num_processes, state.process_index
    mine = wanted[rank::world]
    emb, losses = _local_pass(
        model,
        dataset,
        mine,
        labels,
        kind,
        batch_size,
        show_progress,
        num_workers,
        collate_fn,
        pin_memory,
        loader_options,
        forward_context,
    )
    if multi and world > 1:
        got, emb, losses = gather_rows(mine, emb, losses)
        if not torch.equal(got, wanted):
            raise RuntimeError(f"gathered embeddings cover {len(got)} of {len(wanted)} rows.")
    return EmbeddingResult(
        rows=wanted,
        embeddings=emb.float(),
        labels=labels[wanted],
        losses=losses.float(),
        seconds=time.perf_counter() - start,
    )
