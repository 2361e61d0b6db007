"""Two CPU processes under ``accelerate launch``: same kept set on every rank, equal to one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "epic_ddp_run.py"
ROWS = 256
PER_DEVICE_BATCH = 16


def _launch(command: list[str], tmp_path: Path) -> None:
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.multiprocess
def test_two_processes_agree_with_each_other_and_with_one_process(tmp_path):
    accelerate = Path(sys.executable).parent / "accelerate"
    common = ["--rows", str(ROWS), "--epochs", "2"]
    _launch(
        [
            str(accelerate),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            str(SCRIPT),
            "--output_dir",
            str(tmp_path / "two"),
            "--batch_size",
            str(PER_DEVICE_BATCH),
            *common,
        ],
        tmp_path,
    )
    # One process with the same global batch (2 x 16) sees the same rows at every step.
    _launch(
        [
            sys.executable,
            str(SCRIPT),
            "--output_dir",
            str(tmp_path / "one"),
            "--batch_size",
            str(2 * PER_DEVICE_BATCH),
            *common,
        ],
        tmp_path,
    )
    rank0, rank1 = (json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1))
    single = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert (rank0["world_size"], rank1["world_size"], single["world_size"]) == (2, 2, 1)

    # Identical EPIC state on both ranks, and equal to the single-process run.
    assert rank0["dropped"] and rank0["dropped"] == rank1["dropped"] == single["dropped"]
    assert rank0["rounds"] == rank1["rounds"] == single["rounds"]
    assert rank0["epoch_start_steps"] == rank1["epoch_start_steps"] == single["epoch_start_steps"]
    assert rank0["epoch"] == rank1["epoch"] == 2.0
    assert rank0["global_step"] == rank0["max_steps"]

    dropped = set(rank0["dropped"])
    kept = set(range(ROWS))
    for epoch, (start, end) in enumerate(zip(rank0["epoch_start_steps"], rank0["epoch_end_steps"])):
        if epoch >= 1:
            kept = set(range(ROWS)) - dropped
        rows0 = [r for b in rank0["batches"][start:end] for r in b]
        rows1 = [r for b in rank1["batches"][start:end] for r in b]
        # Each rank iterates its own shard: together they cover the kept rows exactly, and they overlap
        # only in the few rows accelerate repeats to even out the last batch.
        assert set(rows0) | set(rows1) == kept
        padding = len(rows0) + len(rows1) - len(kept)
        assert len(set(rows0) & set(rows1)) <= padding < 2 * PER_DEVICE_BATCH
        if epoch == 0:
            assert padding == 0 and not set(rows0) & set(rows1)  # 256 rows split evenly
        else:
            assert not (set(rows0) | set(rows1)) & dropped  # a dropped row reaches no rank
        # And the union of both ranks' step-k batches is the single process's step-k batch.
        for k in range(start, end):
            if epoch == 0:
                assert sorted(rank0["batches"][k] + rank1["batches"][k]) == sorted(single["batches"][k])


TEXT_SCRIPT = Path(__file__).parent / "scripts" / "epic_text_run.py"


@pytest.mark.multiprocess
def test_text_classifier_with_dynamic_padding_on_two_processes(tmp_path):
    """A tiny BERT on variable-length sentences, padded per batch by DataCollatorWithPadding, three rounds."""
    accelerate = Path(sys.executable).parent / "accelerate"
    _launch(
        [
            str(accelerate),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            str(TEXT_SCRIPT),
            "--output_dir",
            str(tmp_path / "text"),
        ],
        tmp_path,
    )
    rank0, rank1 = (json.loads((tmp_path / "text" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (rank0["world_size"], rank1["world_size"]) == (2, 2)
    assert rank0["round_epochs"] == [2, 3, 4]
    assert rank0["rounds"] == rank1["rounds"] and rank0["dropped"] == rank1["dropped"]
    assert rank0["epoch_start_steps"] == rank1["epoch_start_steps"]
    assert rank0["epoch"] == rank1["epoch"] == 5.0
    assert rank0["global_step"] == rank0["max_steps"]
    assert 0 < len(rank0["dropped"]) < 0.3 * 120
    assert rank0["poisons_dropped_total"] >= 3  # of the 6 rows planted with the other class's label
