"""Benchmark EPIC and baseline defenses against poisoning attacks: trials x attacks x defenses.

Every (trial, attack, defense) cell trains one model and appends its record to
``<output_dir>/results.jsonl`` as soon as it finishes; rerunning the same command skips the finished
cells, so an interrupted run loses at most the cell in progress. At the end ``results.md`` (table),
``results.json`` (summary, every record, settings) and ``results.png`` are written. The library behind
it is :mod:`hf_epic.experiments.benchmark`; ``--help`` lists every flag, and the attacks and defenses
registered in :mod:`hf_epic.attacks.registry` and :mod:`hf_epic.experiments.defenses`. Commands (from
the repository root):

    # smallest smoke run (one trial, BadNets, no defense vs EPIC-0.2; checks the plumbing, not the defense)
    python recipes/benchmark.py --trials 1 --attacks badnets --defenses none epic-0.2 \\
        --max_train_rows 200 --max_eval_rows 100 --image_size 16 --num_train_epochs 2 \\
        --epic_start_epoch 1 --epic_interval 1 --num_threads 1 --output_dir bench_out/smoke

    # the offline default: plain 16x16 digits, tiny ResNet, AdamW 3e-3, 40 epochs, EPIC rounds every
    # 2 epochs from epoch 2; attack settings: hf_epic.experiments.poisons.DIGITS_ATTACK_KWARGS
    python recipes/benchmark.py --trials 12 --attacks gradient_matching \\
        --defenses none epic-0.2 clean-control --num_threads 1 --output_dir bench_out/digits

    # EPIC against the loss/confidence baselines
    python recipes/benchmark.py --trials 12 --attacks gradient_matching \\
        --defenses none epic-0.2 random high-loss low-confidence --output_dir bench_out/gm

    # the field's 1 % / 16/255 gradient matching instead of the offline preset
    python recipes/benchmark.py --trials 12 --attacks gradient_matching \\
        --attack_kwargs '{"gradient_matching": {"epsilon": 0.0627, "budget": 0.01}}' --output_dir bench_out/gm16

    # the hard digits (32x32 colour digits on textures); run two processes on disjoint --trials
    # (e.g. 0-5 and 6-11) into one folder to use two cores: the last to finish writes the report
    python recipes/benchmark.py --digits_variant hard --image_size 32 --num_channels 3 \\
        --epic_start_epoch 10 --trials 0-5 --attacks gradient_matching \\
        --defenses none epic-0.2 clean-control clean-epic-0.2 --num_threads 1 --output_dir bench_out/hard_digits

    # a data set from the Hub (needs the internet), with the field's from-scratch training
    python recipes/benchmark.py --dataset_name cifar10 --model_kind cnn --image_size 32 --num_channels 3 \\
        --optimizer sgd --learning_rate 0.1 --weight_decay 5e-4 --per_device_train_batch_size 128 \\
        --num_train_epochs 40 --epic_start_epoch 10 --trials 12 --output_dir bench_out/cifar10
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import HfArgumentParser

from hf_epic.experiments import BenchmarkArguments, BenchmarkConfig, run_benchmark


def build_parser() -> HfArgumentParser:
    """The command line: the grid (``BenchmarkArguments``) and every ``BenchmarkConfig`` setting."""
    return HfArgumentParser((BenchmarkArguments, BenchmarkConfig))


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the missing cells and print where the report is."""
    grid, config = build_parser().parse_args_into_dataclasses(args=argv)
    if grid.num_threads is not None:
        torch.set_num_threads(grid.num_threads)
    run_benchmark(
        config,
        trials=grid.trial_numbers,
        attacks=grid.attacks,
        defenses=grid.defenses,
        output_dir=grid.output_dir,
    )
    report = Path(grid.output_dir) / "results.md"
    print(report.read_text())
    print(f"Report: {report}, {report.with_suffix('.json')}, {report.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
