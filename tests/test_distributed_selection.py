"""Selection spread over processes: classes partitioned by rows, results merged (hf_epic.selection).

The merged result of disjoint class subsets must equal one-process selection exactly; two CPU
processes (torch.distributed, gloo) each select their share and gather the same dropped set.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hf_epic.selection import SelectionResult, find_isolated, merge_results, partition_classes


def _data(n: int = 900, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient-like embeddings with imbalanced classes and arbitrary label values."""
    g = torch.Generator().manual_seed(seed)
    values = torch.tensor([40, 2, 7, 11, 5, 30])
    weights = torch.tensor([6.0, 1.0, 3.0, 2.0, 1.0, 0.5])
    labels = values[torch.multinomial(weights, n, replacement=True, generator=g)]
    logits = 2.0 * torch.randn(n, 6, generator=g)
    emb = torch.softmax(logits, 1)
    return emb, labels


def _assert_same(a: SelectionResult, b: SelectionResult) -> None:
    for name in ("medoids", "assignment", "cluster_sizes", "dropped", "kept"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.per_class == b.per_class
    assert list(a.per_class) == list(b.per_class)


def test_partition_is_balanced_deterministic_and_complete():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 30 + [3] * 20 + [4] * 20 + [9] * 10)
    parts = partition_classes(labels, 2)
    # longest processing time first: 50 -> r0, 30 -> r1, 30 -> r1 (60), 20 -> r0 (70) ...
    assert parts == [[0, 3, 9], [1, 2, 4]]
    loads = [sum(int((labels == c).sum()) for c in part) for part in parts]
    assert loads == [80, 80]
    assert partition_classes(labels.numpy(), 2) == parts  # numpy in, same answer
    assert sorted(c for part in partition_classes(labels, 4) for c in part) == [0, 1, 2, 3, 4, 9]
    # more processes than classes: some get nothing
    many = partition_classes(labels, 8)
    assert len(many) == 8 and sum(len(p) for p in many) == 6 and many.count([]) == 2
    assert partition_classes(labels, 1) == [[0, 1, 2, 3, 4, 9]]
    with pytest.raises(ValueError, match="world_size"):
        partition_classes(labels, 0)


@pytest.mark.parametrize("greedy", ["lazy", "stochastic"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_merged_partitions_equal_one_process(greedy, world_size):
    emb, labels = _data()
    whole = find_isolated(emb, labels, 0.2, greedy=greedy, seed=4)
    parts = [
        find_isolated(emb, labels, 0.2, greedy=greedy, seed=4, classes=share)
        for share in partition_classes(labels, world_size)
    ]
    for part, share in zip(parts, partition_classes(labels, world_size)):
        assert sorted(part.per_class) == share
        mine = torch.isin(labels, torch.tensor(share, dtype=labels.dtype))
        assert bool((part.assignment[~mine] == -1).all()) and bool((part.assignment[mine] >= 0).all())
        assert set(part.dropped.tolist()) | set(part.kept.tolist()) == set(mine.nonzero().squeeze(1).tolist())
    _assert_same(merge_results(parts), whole)
    _assert_same(merge_results(parts[::-1]), whole)  # order of the parts does not matter


def test_classes_argument_and_merge_errors():
    emb, labels = _data(200)
    empty = find_isolated(emb, labels, 0.2, classes=[])
    assert empty.medoids.numel() == 0 and empty.dropped.numel() == 0 and bool((empty.assignment == -1).all())
    with pytest.raises(ValueError, match=r"classes contains label\(s\) \[3\]"):
        find_isolated(emb, labels, 0.2, classes=[2, 3])
    one = find_isolated(emb, labels, 0.2, classes=[2, 7])
    with pytest.raises(ValueError, match="selected by two results"):
        merge_results([one, one])
    with pytest.raises(ValueError, match="no result selected"):
        merge_results([one])
    with pytest.raises(ValueError, match="at least one"):
        merge_results([])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rank_main(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        emb, labels = _data()
        share = partition_classes(labels, world_size)[rank]
        mine = find_isolated(emb, labels, 0.2, classes=share)
        gathered: list[SelectionResult | None] = [None] * world_size
        dist.all_gather_object(gathered, mine)
        merged = merge_results([r for r in gathered if r is not None])
        record = {"share": share, "dropped": merged.dropped.tolist(), "medoids": merged.medoids.tolist()}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_processes_select_disjoint_classes_and_gather_the_one_process_result(tmp_path):
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    emb, labels = _data()
    whole = find_isolated(emb, labels, 0.2)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert set(records[0]["share"]).isdisjoint(records[1]["share"])
    assert sorted(records[0]["share"] + records[1]["share"]) == sorted(set(labels.tolist()))
    for record in records:
        assert record["dropped"] == whole.dropped.tolist()
        assert record["medoids"] == whole.medoids.tolist()


def test_merged_partitions_carry_the_isolation_scores_of_one_process():
    emb, labels = _data()
    whole = find_isolated(emb, labels, 0.2, isolation_scores=True)
    shares = partition_classes(labels, 3)
    parts = [find_isolated(emb, labels, 0.2, classes=share, isolation_scores=True) for share in shares]
    merged = merge_results(parts[::-1])
    _assert_same(merged, whole)
    assert torch.equal(merged.isolation_scores, whole.isolation_scores)
    # a part without scores: the merged result has none
    parts[0] = find_isolated(emb, labels, 0.2, classes=shares[0])
    assert merge_results(parts).isolation_scores is None
