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


def _two_processes(script: Path, *arguments: str) -> list[str]:
    accelerate = Path(sys.executable).parent / "accelerate"
    return [
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
        str(script),
        *arguments,
    ]


def _check_selection_spread(records: list[dict], folder: Path, seed: int = 0) -> None:
    """Each round: the ranks selected disjoint classes covering every label, and one-process selection on
    the round's saved embeddings gives the round's drops."""
    from safetensors.torch import load_file

    from hf_epic.selection import find_isolated

    before: set[int] = set()
    for record in records:
        first, second = record["selection_classes_per_rank"]
        assert first and second and not set(first) & set(second)
        saved = load_file(str(folder / "epic_embeddings" / f"round_{record['round']:03d}.safetensors"))
        assert sorted(first + second) == sorted(set(saved["labels"].tolist()))
        alone = find_isolated(saved["embeddings"], saved["labels"], 0.3, seed=seed + record["round"] - 1)
        assert sorted(set(alone.dropped.tolist()) - before) == record["newly_dropped"]
        before |= set(record["newly_dropped"])


def _untimed(records: list[dict]) -> list[dict]:
    """Round records without their timings (each rank times its own embedding pass)."""
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in records]


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
    common = ["--rows", str(ROWS), "--epochs", "2"]
    _launch(
        _two_processes(
            SCRIPT,
            "--output_dir",
            str(tmp_path / "two"),
            "--batch_size",
            str(PER_DEVICE_BATCH),
            "--save_embeddings",
            *common,
        ),
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
    # Selection spread over the processes: disjoint classes per rank, the one-process drops.
    assert _untimed(rank0["records"]) == _untimed(rank1["records"])
    _check_selection_spread(rank0["records"], tmp_path / "two")
    assert single["records"][0]["selection_classes_per_rank"] == [list(range(10))]

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


@pytest.mark.multiprocess
def test_training_pass_embeddings_on_two_processes(tmp_path):
    """Embeddings recorded from the training forward passes of both ranks: no embedding pass, every kept row
    recorded (accelerate's even_batches repeats dropped by row), the same drops on both ranks."""
    _launch(
        _two_processes(
            SCRIPT,
            "--output_dir",
            str(tmp_path / "two"),
            "--batch_size",
            str(PER_DEVICE_BATCH),
            "--rows",
            "250",
            "--epochs",
            "3",
            "--embedding_source",
            "training_pass",
            "--save_embeddings",
        ),
        tmp_path,
    )
    rank0, rank1 = (json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["dropped"] and rank0["dropped"] == rank1["dropped"]
    assert _untimed(rank0["records"]) == _untimed(rank1["records"]) and len(rank0["records"]) == 2
    assert rank0["eval_passes"] == rank1["eval_passes"] == 0
    kept = 250
    for record in rank0["records"]:
        assert record["embedding_source"] == "training_pass" and record["eval_pass_rows"] == 0
        assert record["recorded_rows"] == kept
        padding = record["recorded_row_copies"] - kept  # rows accelerate's even_batches repeats
        assert padding == (6 if kept == 250 else padding) and 0 <= padding < 2 * PER_DEVICE_BATCH
        kept = record["num_kept"]
    _check_selection_spread(rank0["records"], tmp_path / "two")


TEXT_SCRIPT = Path(__file__).parent / "scripts" / "epic_text_run.py"


@pytest.mark.multiprocess
def test_text_classifier_with_dynamic_padding_on_two_processes(tmp_path):
    """A tiny BERT on variable-length sentences, padded per batch by DataCollatorWithPadding, three rounds."""
    _launch(_two_processes(TEXT_SCRIPT, "--output_dir", str(tmp_path / "text")), tmp_path)
    rank0, rank1 = (json.loads((tmp_path / "text" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (rank0["world_size"], rank1["world_size"]) == (2, 2)
    assert rank0["round_epochs"] == [2, 3, 4]
    assert rank0["rounds"] == rank1["rounds"] and rank0["dropped"] == rank1["dropped"]
    assert rank0["epoch_start_steps"] == rank1["epoch_start_steps"]
    assert rank0["epoch"] == rank1["epoch"] == 5.0
    assert rank0["global_step"] == rank0["max_steps"]
    assert 0 < len(rank0["dropped"]) < 0.3 * 120
    assert rank0["poisons_dropped_total"] >= 3  # of the 6 rows planted with the other class's label


@pytest.mark.multiprocess
def test_a_drop_rule_decides_alike_on_two_processes_and_on_one(tmp_path):
    """With the 'ranked' rule the ranks merge their classes' isolation evidence and pick the same rows,
    the rows one process picks from the same evidence."""
    common = ["--rows", str(ROWS), "--epochs", "2", "--drop_rule", "ranked"]
    two = ["--output_dir", str(tmp_path / "two"), "--batch_size", str(PER_DEVICE_BATCH), *common]
    _launch(_two_processes(SCRIPT, *two), tmp_path)
    one = ["--output_dir", str(tmp_path / "one"), "--batch_size", str(2 * PER_DEVICE_BATCH), *common]
    _launch([sys.executable, str(SCRIPT), *one], tmp_path)
    rank0, rank1 = (json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1))
    single = json.loads((tmp_path / "one" / "rank0.json").read_text())
    evidence = ("isolated_rows", "isolation_scores", "newly_dropped", "drop_rule")
    per_rank = [[{k: r[k] for k in evidence} for r in run["records"]] for run in (rank0, rank1, single)]
    assert per_rank[0] == per_rank[1] == per_rank[2]
    assert rank0["dropped"] == rank1["dropped"] == single["dropped"]
    first = per_rank[0][0]
    assert first["drop_rule"] == "ranked" and set(first["newly_dropped"]) < set(first["isolated_rows"])
