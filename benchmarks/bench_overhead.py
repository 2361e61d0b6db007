"""Wall-time cost of EPIC against a plain ``Trainer``, and the embedding pass against ``Trainer.evaluate``.

Case ``overhead``: the same tiny-model digits run with ``Trainer``, with ``EpicTrainer`` embedding by a
training-pass recording (``epic_embedding_source="training_pass"``, target <= 1.05x the plain
Trainer) and with ``EpicTrainer`` embedding by an extra eval pass (the default). All train the same
model (same seed, data, hyper-parameters) for ``--epochs`` epochs; EPIC selects every 2 epochs from
epoch 2 (rounds after epochs 2, 4, 6, 8 for 10 epochs). The runs rotate their order over
``--repeats`` so machine load hits all alike; medians are printed.

Case ``eval-speed``: rows per second of EPIC's embedding pass (``EpicCallback.embedding_pass``)
against ``Trainer.evaluate`` on the same rows, same model, same eval batch size and dataloader
settings, alternating ``--eval-repeats`` times (target >= 0.9x).

    .venv/bin/python benchmarks/bench_overhead.py                          # both cases, tiny ResNet and ViT
    .venv/bin/python benchmarks/bench_overhead.py --cases eval-speed --models vit --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from hf_epic.data import load_digits_dataset
from hf_epic.epic_config import EpicConfig
from hf_epic.epic_trainer import EpicTrainer
from hf_epic.models import build_tiny_cnn, build_tiny_timm, build_tiny_vit, image_transform

BUILDERS = {"cnn": build_tiny_cnn, "vit": build_tiny_vit, "timm-vit": build_tiny_timm}
KINDS = ("trainer", "epic-training-pass", "epic-eval-pass")


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min) on {os.cpu_count()} CPUs"


def _common(output_dir: str, options: argparse.Namespace) -> dict:
    return {
        "output_dir": output_dir,
        "num_train_epochs": options.epochs,
        "per_device_train_batch_size": options.batch_size,
        "per_device_eval_batch_size": options.eval_batch_size,
        "learning_rate": 3e-3,
        "remove_unused_columns": False,
        "report_to": [],
        "disable_tqdm": True,
        "use_cpu": not torch.cuda.is_available(),
        "save_strategy": "no",
        "logging_strategy": "epoch",
        "seed": 0,
        "dataloader_num_workers": options.workers,
    }


def _epic_args(output_dir: str, options: argparse.Namespace, source: str) -> EpicConfig:
    return EpicConfig(
        **_common(output_dir, options),
        epic_fraction=options.fraction,
        epic_start_epoch=2,
        epic_interval=2,
        epic_embedding_source=source,
    )


def run_once(kind: str, model_name: str, options: argparse.Namespace, train) -> dict:
    """Train once with ``kind`` in :data:`KINDS`; return wall time and EPIC figures."""
    torch.manual_seed(0)
    model = BUILDERS[model_name](10, options.image_size, 1)
    with tempfile.TemporaryDirectory() as output_dir:
        if kind == "trainer":
            trainer = Trainer(
                model=model, args=TrainingArguments(**_common(output_dir, options)), train_dataset=train
            )
        else:
            source = "training_pass" if kind == "epic-training-pass" else "eval_pass"
            trainer = EpicTrainer(
                model=model, args=_epic_args(output_dir, options, source), train_dataset=train
            )
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    result = {"kind": kind, "model": model_name, "seconds": seconds}
    if kind != "trainer":
        rounds = trainer.epic_state.rounds
        result.update(
            embedding_seconds=sum(r["embedding_seconds"] for r in rounds),
            selection_seconds=sum(r["selection_seconds"] for r in rounds),
            eval_pass_rows=sum(r["eval_pass_rows"] for r in rounds),
            rounds=len(rounds),
            dropped=trainer.epic_state.num_dropped,
            rows=trainer.epic_state.num_rows,
        )
    return result


def case_overhead(model_name: str, options: argparse.Namespace, train) -> dict:
    """Rotate the three kinds over ``--repeats``; print and return medians and ratios."""
    runs: list[dict] = []
    for repeat in range(options.repeats):
        order = KINDS[repeat % 3 :] + KINDS[: repeat % 3]
        for kind in order:
            runs.append(run_once(kind, model_name, options, train))
            print(f"  [{repeat}] {model_name} {kind:18s} {runs[-1]['seconds']:.2f} s", flush=True)
    median = {k: statistics.median(r["seconds"] for r in runs if r["kind"] == k) for k in KINDS}
    summary: dict = {"model": model_name, "median_seconds": median, "runs": runs}
    for kind in KINDS[1:]:
        mine = [r for r in runs if r["kind"] == kind]
        ratio = median[kind] / median["trainer"]
        emb = statistics.median(r["embedding_seconds"] for r in mine)
        sel = statistics.median(r["selection_seconds"] for r in mine)
        summary[kind] = {
            "ratio": ratio,
            "embedding_seconds": emb,
            "selection_seconds": sel,
            "eval_pass_rows": mine[0]["eval_pass_rows"],
            "rounds": mine[0]["rounds"],
            "dropped": mine[0]["dropped"],
        }
        target = (
            " (target <= 1.05x: " + ("met" if ratio <= 1.05 else "NOT met") + ")"
            if "training" in kind
            else ""
        )
        print(
            f"  {model_name} {kind:18s} {median[kind]:7.2f} s vs Trainer {median['trainer']:7.2f} s: "
            f"{ratio:.3f}x{target}; embeddings {emb:.2f} s, selection {sel:.2f} s, rows embedded by an eval "
            f"pass {mine[0]['eval_pass_rows']}, rounds {mine[0]['rounds']}, dropped {mine[0]['dropped']}",
            flush=True,
        )
    return summary


def case_eval_speed(model_name: str, options: argparse.Namespace, train, workers: int) -> dict:
    """Rows/s of the embedding pass against ``Trainer.evaluate`` on the same rows, alternating."""
    options = argparse.Namespace(**{**vars(options), "workers": workers})
    torch.manual_seed(0)
    model = BUILDERS[model_name](10, options.image_size, 1)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = EpicTrainer(
            model=model,
            args=_epic_args(output_dir, options, "eval_pass"),
            train_dataset=train,
            eval_dataset=train,
        )
        trainer.remove_callback(PrinterCallback)
        callback = trainer.epic_callback
        callback.collate_fn = trainer.data_collator
        callback.prepare(trainer.args, trainer.model, train)
        trainer.model.to(trainer.args.device)
        rows = len(train)
        trainer.evaluate()  # warm-up of both paths
        callback.embedding_pass(trainer.args, trainer.model)
        evaluate_s, embed_s = [], []
        for repeat in range(options.eval_repeats):
            for which in ("evaluate", "embed") if repeat % 2 == 0 else ("embed", "evaluate"):
                start = time.perf_counter()
                if which == "evaluate":
                    trainer.evaluate()
                    evaluate_s.append(time.perf_counter() - start)
                else:
                    callback.embedding_pass(trainer.args, trainer.model)
                    embed_s.append(time.perf_counter() - start)
    ev, em = statistics.median(evaluate_s), statistics.median(embed_s)
    ratio = (rows / em) / (rows / ev)
    print(
        f"  {model_name} eval batch {options.eval_batch_size}, workers {options.workers}: Trainer.evaluate "
        f"{rows / ev:8.0f} rows/s, embedding pass {rows / em:8.0f} rows/s: {ratio:.3f}x "
        f"(target >= 0.9x: {'met' if ratio >= 0.9 else 'NOT met'}; medians of {len(embed_s)})",
        flush=True,
    )
    return {
        "model": model_name,
        "workers": workers,
        "rows": rows,
        "evaluate_seconds": evaluate_s,
        "embedding_seconds": embed_s,
        "evaluate_rows_per_s": rows / ev,
        "embedding_rows_per_s": rows / em,
        "ratio": ratio,
    }


def main() -> None:
    """Parse the options, run the cases, print the comparison."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cases", default="eval-speed,overhead", help="comma-separated: eval-speed, overhead"
    )
    parser.add_argument("--models", default="cnn,vit", help=f"comma-separated of {sorted(BUILDERS)}")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--eval_batch_size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="dataloader_num_workers of the overhead runs")
    parser.add_argument("--eval_workers", default="0,2", help="dataloader_num_workers values of eval-speed")
    parser.add_argument("--image_size", type=int, default=16)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument(
        "--repeats", type=int, default=3, help="rotations of (Trainer, training pass, eval pass)"
    )
    parser.add_argument("--eval-repeats", type=int, default=10, help="evaluate / embedding-pass pairs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps timings steadier)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    cases = [c.strip() for c in options.cases.split(",") if c.strip()]
    models = [m.strip() for m in options.models.split(",") if m.strip()]

    train = load_digits_dataset(variant="plain", seed=0, image_size=options.image_size)["train"]
    train = train.with_transform(image_transform(options.image_size, 1))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"device {device}, torch {torch.__version__}, {options.threads} thread(s); before: {_load()}")
    print(
        f"rows={len(train)} epochs={options.epochs} batch={options.batch_size} image={options.image_size}px "
        f"fraction={options.fraction}, rounds every 2 epochs from epoch 2",
        flush=True,
    )
    results: dict = {"options": vars(options), "device": device, "load_before": os.getloadavg()}
    if "eval-speed" in cases:
        print("eval-speed: EPIC's embedding pass against Trainer.evaluate on the same rows")
        workers = [int(w) for w in options.eval_workers.split(",") if w.strip()]
        results["eval_speed"] = [case_eval_speed(m, options, train, w) for m in models for w in workers]
    if "overhead" in cases:
        print("overhead: EpicTrainer (training-pass / eval-pass embeddings) against Trainer")
        results["overhead"] = [case_overhead(m, options, train) for m in models]
    results["load_after"] = os.getloadavg()
    print(f"after: {_load()}")
    if options.json:
        with open(options.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
