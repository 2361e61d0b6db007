"""Benchmark EPIC and baseline defenses against poisoning attacks: trials x attacks x defenses.

Every (trial, attack, defense) cell trains one model and appends its record to
``<output_dir>/results.jsonl`` as soon as it finishes; rerunning the same command skips the finished
cells, so an interrupted run loses at most the cell in progress. At the end ``results.md`` (table),
``results.json`` (summary + every record + settings) and ``results.png`` (ASR, clean accuracy and poisons dropped per
attack and defense) are written. The library behind it is :mod:`hf_epic.harness`.

Defenses: none, epic-0.1, epic-0.2, epic-0.3, and at EPIC-0.2's drop counts (same rounds, same rows
per class): random, high-loss, low-confidence. Controls on the clean training set, scored on the same
targets: clean-control (no poison, no defense) and clean-epic-0.2 (no poison, EPIC-0.2). With them in
the folder, results.md also counts, for none and epic-0.2, the successes their clean run did not have.
For targeted attacks results.md gives the 95 % Wilson interval of each ASR and pairs every run with none
on the same trials (targets saved, targets lost, exact McNemar p).
Attacks: gradient_matching, bullseye_polytope (transfer), feature_collision (transfer), sleeper_agent,
badnets.

Ready-to-paste commands (from the repository root):

    # smallest smoke run (one trial, BadNets, no defense vs EPIC-0.2; well under a minute on a CPU;
    # the model barely learns in 2 epochs on 200 rows: this checks the plumbing, not the defense)
    .venv/bin/python recipes/benchmark.py --trials 1 --attacks badnets --defenses none epic-0.2 \\
        --train_size 200 --test_size 100 --image_size 16 --epochs 2 --epic_start 1 --epic_interval 1 \\
        --num_threads 1 --output_dir bench_out/smoke

    # the offline default (plain 16x16 digits, 1,438 training rows, tiny ResNet, AdamW 3e-3, 40 epochs;
    # EPIC rounds every 2 epochs from epoch 2; attack arguments: hf_epic.harness.DIGITS_ATTACK_KWARGS);
    # 10-20 s per cell on one CPU thread plus the crafting; resumable. Measured: docs/BENCHMARK_RESULTS.md
    .venv/bin/python recipes/benchmark.py --trials 12 --attacks gradient_matching \\
        --defenses none epic-0.2 clean-control --num_threads 1 --output_dir bench_out/digits
    .venv/bin/python recipes/benchmark.py --trials 12 --attacks badnets bullseye_polytope sleeper_agent \\
        --defenses none epic-0.2 --num_threads 1 --output_dir bench_out/digits

    # EPIC against the loss/confidence baselines on gradient matching only
    .venv/bin/python recipes/benchmark.py --trials 12 --attacks gradient_matching \\
        --defenses none epic-0.2 random high-loss low-confidence --output_dir bench_out/gm

    # the paper's 1 % / 16/255 gradient matching instead of the offline preset
    .venv/bin/python recipes/benchmark.py --trials 12 --attacks gradient_matching \\
        --attack_kwargs '{"gradient_matching": {"epsilon": 0.0627, "budget": 0.01}}' --output_dir bench_out/gm16

    # the hard digits (32x32 colour digits on textures, 4,314 training rows, 83-90 % clean accuracy);
    # gradient matching at its preset hf_epic.harness.HARD_DIGITS_ATTACK_KWARGS (1 %, 24/255, targets
    # among the 10 % lowest-margin digits); EPIC's 40-epoch schedule (every 2 epochs from epoch 10);
    # about 2.7 min a cell on one CPU thread, 1.5 min to craft a trial's poisons; run two processes on
    # disjoint --trials (e.g. 0-5 and 6-11) into the same folder to use two cores: the last to finish
    # writes the report over every trial. Measured: docs/BENCHMARK_RESULTS.md
    .venv/bin/python recipes/benchmark.py --digits_variant hard --image_size 32 --num_channels 3 \\
        --epic_start 10 --trials 12 --attacks gradient_matching \\
        --defenses none epic-0.2 clean-control clean-epic-0.2 --num_threads 1 --output_dir bench_out/hard_digits

    # the plain digits with three renderings of each training digit (the digit as it is and two mildly
    # jittered copies: 4,314 rows, still 99 % clean accuracy), the plain preset (1 %, 64/255), EPIC rounds
    # every 2 epochs from epoch 6; about 1.3 min a cell on one CPU thread, two processes on disjoint
    # --trials into one folder use both cores. Measured: docs/BENCHMARK_RESULTS.md ("three renderings")
    .venv/bin/python recipes/benchmark.py --digits_renders 3 --epic_start 6 --trials 12 \\
        --attacks gradient_matching --num_threads 1 --output_dir bench_out/plain_r3 \\
        --defenses none epic-0.2 random high-loss low-confidence clean-control clean-epic-0.2

    # a real dataset (needs the internet; the same code path; the field's from-scratch training and
    # EPIC's 40-epoch schedule; attacks at their own defaults: 1 %, 16/255)
    .venv/bin/python recipes/benchmark.py --dataset cifar10 --model cnn --image_size 32 --num_channels 3 \\
        --optimizer sgd --learning_rate 0.1 --weight_decay 5e-4 --batch_size 128 --epochs 40 \\
        --epic_start 10 --epic_interval 2 --epic_stop none --trials 12 --output_dir bench_out/cifar10

    # only rewrite the report from the records already there (every cell done -> no training)
    .venv/bin/python recipes/benchmark.py --trials 12 --attacks gradient_matching \\
        --defenses none epic-0.2 clean-control --output_dir bench_out/digits
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from hf_epic.epic_config import EMBEDDING_CHOICES, METRIC_CHOICES
from hf_epic.harness import ATTACKS, DEFENSES, HarnessConfig, run_benchmark


def _trials(text: str) -> list[int]:
    """Parse ``--trials``: ``N`` means trials 0..N-1; ``a-b`` a range; ``1,4,7`` a list."""
    text = text.strip()
    try:
        if "," in text:
            return [int(t) for t in text.split(",") if t.strip()]
        if "-" in text:
            first, last = (int(t) for t in text.split("-", 1))
            return list(range(first, last + 1))
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--trials {text!r}: pass a count (12), a range (3-7) or a list (0,4,9)."
        ) from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"--trials {count}: pass at least 1.")
    return list(range(count))


def _optional_int(text: str) -> int | None:
    """Parse ``--epic_stop``: an epoch number, or ``none`` for rounds until the end of training."""
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: pass an epoch number or 'none'.") from None


def _json_dict(text: str) -> dict:
    """Parse ``--attack_kwargs``: a JSON object of attack name -> keyword arguments."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(
            f'--attack_kwargs is not valid JSON ({err}); e.g. \'{{"badnets": {{"budget": 0.05}}}}\'.'
        ) from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise argparse.ArgumentTypeError(
            "--attack_kwargs must map attack names to objects of keyword arguments."
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (every ``HarnessConfig`` field plus the grid and output folder)."""
    defaults = HarnessConfig()
    parser = argparse.ArgumentParser(
        description="Run trials x attacks x defenses and write a results table (markdown, JSON, PNG).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--trials", type=_trials, default=_trials("12"), help="count N, range a-b, or list a,b"
    )
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS))
    parser.add_argument("--defenses", nargs="+", choices=DEFENSES, default=list(DEFENSES))
    parser.add_argument("--output_dir", default="bench_out", help="results, caches and the report go here")
    parser.add_argument(
        "--dataset", default=defaults.dataset, help="'digits' (offline) or a Hub dataset name"
    )
    parser.add_argument("--digits_variant", choices=("hard", "plain"), default=defaults.digits_variant)
    parser.add_argument(
        "--digits_renders",
        type=_optional_int,
        default=defaults.digits_renders,
        help="renderings of each training digit ('none': 3 for hard, 1 for plain; plain extras are jittered)",
    )
    parser.add_argument("--image_size", type=int, default=defaults.image_size)
    parser.add_argument("--num_channels", type=int, choices=(1, 3), default=defaults.num_channels)
    parser.add_argument("--model", choices=("cnn", "vit", "timm-vit"), default=defaults.model)
    parser.add_argument("--train_size", type=int, default=defaults.train_size, help="first N training rows")
    parser.add_argument("--test_size", type=int, default=defaults.test_size, help="first N test rows")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch_size", type=int, default=defaults.batch_size)
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default=defaults.optimizer)
    parser.add_argument("--learning_rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--weight_decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--finetune_learning_rate", type=float, default=defaults.finetune_learning_rate)
    parser.add_argument("--pretrain_epochs", type=int, default=defaults.pretrain_epochs)
    parser.add_argument("--epic_interval", type=int, default=defaults.epic_interval)
    parser.add_argument("--epic_start", type=int, default=defaults.epic_start)
    parser.add_argument(
        "--epic_stop",
        type=_optional_int,
        default=defaults.epic_stop,
        help="no EPIC round once this many epochs are done ('none': rounds until the end)",
    )
    parser.add_argument(
        "--epic_embedding",
        choices=EMBEDDING_CHOICES,
        default=defaults.epic_embedding,
        help="EPIC's gradient embedding (logits_grad: the reference's)",
    )
    parser.add_argument(
        "--epic_metric",
        choices=METRIC_CHOICES,
        default=defaults.epic_metric,
        help="EPIC's similarity",
    )
    parser.add_argument(
        "--epic_cluster_threshold",
        type=int,
        default=defaults.epic_cluster_threshold,
        help="EPIC drops rows in clusters of at most this many members",
    )
    parser.add_argument(
        "--baseline_reference",
        choices=("epic-0.1", "epic-0.2", "epic-0.3"),
        default=defaults.baseline_reference,
    )
    parser.add_argument(
        "--attack_kwargs",
        type=_json_dict,
        default=None,
        help="JSON: attack -> kwargs (default: hf_epic.harness.DIGITS_ATTACK_KWARGS on digits, "
        "HARD_DIGITS_ATTACK_KWARGS with --digits_variant hard, else {})",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--attack_seed_offset",
        type=int,
        default=defaults.attack_seed_offset,
        help="added to each trial's seed for the attack alone (0: the surrogate starts from the victim's "
        "initial weights; e.g. 1000000: an attacker who does not know the victim's seed)",
    )
    parser.add_argument("--num_workers", type=int, default=defaults.num_workers)
    parser.add_argument("--progress", action="store_true", help="show crafting/training progress bars")
    parser.add_argument(
        "--num_threads",
        type=int,
        default=None,
        help="torch CPU threads (1 is fastest on a shared, oversubscribed CPU; default: torch's choice)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the missing cells and print where the report is.

    Args:
        argv: arguments (None: ``sys.argv[1:]``).

    Returns:
        The process exit status.
    """
    args = build_parser().parse_args(argv)
    if args.num_threads is not None:
        if args.num_threads < 1:
            raise SystemExit(f"--num_threads {args.num_threads}: pass 1 or more.")
        torch.set_num_threads(args.num_threads)
    grid = {"trials", "attacks", "defenses", "output_dir", "num_threads"}
    config = HarnessConfig(**{k: v for k, v in vars(args).items() if k not in grid})
    run_benchmark(
        config, trials=args.trials, attacks=args.attacks, defenses=args.defenses, output_dir=args.output_dir
    )
    report = Path(args.output_dir) / "results.md"
    print(report.read_text())
    print(f"Report: {report}, {report.with_suffix('.json')}, {report.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
