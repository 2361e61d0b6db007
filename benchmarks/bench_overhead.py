"""Wall-time overhead of EPIC: the same tiny-model digits run with ``Trainer`` and with ``EpicTrainer``.

Both runs train the same model (same seed, same data, same hyper-parameters) for ``--epochs`` epochs;
the EPIC run selects every 2 epochs from epoch 2 (rounds after epochs 2, 4, 6, 8 for 10 epochs). The
runs alternate (``--repeats`` pairs) so machine load hits both alike. Printed: each run's wall time,
the EpicTrainer / Trainer ratio (target <= 1.25x), and where EPIC's extra time goes (embedding pass vs
selection).

    .venv/bin/python benchmarks/bench_overhead.py                # 10 epochs, tiny ResNet, 1,438 digits
    .venv/bin/python benchmarks/bench_overhead.py --model vit --repeats 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
from transformers import Trainer, TrainingArguments

from hf_epic.data import load_digits_dataset
from hf_epic.epic_config import EpicConfig
from hf_epic.epic_trainer import EpicTrainer
from hf_epic.models import build_tiny_cnn, build_tiny_timm, build_tiny_vit, image_transform

BUILDERS = {"cnn": build_tiny_cnn, "vit": build_tiny_vit, "timm-vit": build_tiny_timm}


def _common(output_dir: str, options: argparse.Namespace) -> dict:
    return {
        "output_dir": output_dir,
        "num_train_epochs": options.epochs,
        "per_device_train_batch_size": options.batch_size,
        "learning_rate": 3e-3,
        "remove_unused_columns": False,
        "report_to": [],
        "disable_tqdm": True,
        "use_cpu": True,
        "save_strategy": "no",
        "logging_strategy": "epoch",
        "seed": 0,
        "dataloader_num_workers": 0,
    }


def run_once(kind: str, options: argparse.Namespace, train) -> dict:
    """Train once with ``kind`` in {"trainer", "epic"}; return wall time and EPIC figures."""
    torch.manual_seed(0)
    model = BUILDERS[options.model](10, options.image_size, 1)
    with tempfile.TemporaryDirectory() as output_dir:
        if kind == "trainer":
            trainer = Trainer(
                model=model, args=TrainingArguments(**_common(output_dir, options)), train_dataset=train
            )
        else:
            args = EpicConfig(
                **_common(output_dir, options),
                epic_fraction=options.fraction,
                epic_start_epoch=2,
                epic_interval=2,
                epic_embedding_batch_size=256,
            )
            trainer = EpicTrainer(model=model, args=args, train_dataset=train)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    result = {"kind": kind, "seconds": seconds, "final_loss": trainer.state.log_history[-2].get("loss")}
    if kind == "epic":
        rounds = trainer.epic_state.rounds
        result.update(
            embedding_seconds=sum(r["embedding_seconds"] for r in rounds),
            selection_seconds=sum(r["selection_seconds"] for r in rounds),
            rounds=len(rounds),
            dropped=trainer.epic_state.num_dropped,
            rows=trainer.epic_state.num_rows,
        )
    return result


def main() -> None:
    """Parse the options, run the pairs, print the comparison."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(BUILDERS), default="cnn")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=16)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=1, help="pairs of (Trainer, EpicTrainer) runs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps timings steadier)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)

    train = load_digits_dataset(variant="plain", seed=0, image_size=options.image_size)["train"]
    train = train.with_transform(image_transform(options.image_size, 1))
    results = []
    for repeat in range(options.repeats):
        order = ("trainer", "epic") if repeat % 2 == 0 else ("epic", "trainer")
        for kind in order:
            results.append(run_once(kind, options, train))
            print(f"[{repeat}] {kind:8s} {results[-1]['seconds']:.2f} s")

    plain = [r["seconds"] for r in results if r["kind"] == "trainer"]
    epic = [r for r in results if r["kind"] == "epic"]
    ratio = statistics.median(e["seconds"] for e in epic) / statistics.median(plain)
    pair_ratios = [e["seconds"] / p for e, p in zip(epic, plain)]
    emb = statistics.median(e["embedding_seconds"] for e in epic)
    sel = statistics.median(e["selection_seconds"] for e in epic)
    epic_wall = statistics.median(e["seconds"] for e in epic)
    print()
    print(
        f"model={options.model} rows={epic[0]['rows']} epochs={options.epochs} batch={options.batch_size} "
        f"image={options.image_size}px fraction={options.fraction} rounds={epic[0]['rounds']} "
        f"dropped={epic[0]['dropped']}"
    )
    print(f"Trainer      wall time (median of {len(plain)}): {statistics.median(plain):8.2f} s")
    print(f"EpicTrainer  wall time (median of {len(epic)}): {epic_wall:8.2f} s")
    print(
        f"ratio EpicTrainer / Trainer: {ratio:.3f}x  (target <= 1.25x: {'met' if ratio <= 1.25 else 'NOT met'})"
    )
    pairs = ", ".join(f"{r:.3f}" for r in pair_ratios)
    print(f"per-pair ratios: {pairs} (median {statistics.median(pair_ratios):.3f})")
    print(
        f"EPIC time: embedding passes {emb:.2f} s ({100 * emb / epic_wall:.1f}% of the EPIC run), "
        f"selection {sel:.2f} s ({100 * sel / epic_wall:.1f}%)"
    )
    if options.json:
        with open(options.json, "w") as handle:
            json.dump(
                {"options": vars(options), "runs": results, "ratio": ratio, "pair_ratios": pair_ratios},
                handle,
                indent=1,
            )


if __name__ == "__main__":
    main()
