"""``memory_budget_mb``: a class whose similarity matrix does not fit is never materialised.

Each run is a fresh process, so its peak resident memory (``VmHWM``) is its own: the peak before
the selection (everything else already done) and after it give the selection's extra peak, which
is compared with the budget and with the size of the dense matrix it must avoid.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROWS = 6000  # one class: a dense float32 similarity matrix is 6000^2 * 4 B = 137 MiB
DENSE_MIB = ROWS * ROWS * 4 / 2**20

CHILD = rf"""
import json, sys
import torch
torch.set_num_threads(1)
from hf_epic.selection import find_isolated
budget = float(sys.argv[1])
generator = torch.Generator().manual_seed(0)
embeddings = torch.randn({ROWS}, 10, generator=generator)
embeddings[:: {ROWS} // 20] *= 8  # a few far-out rows to be isolated
labels = torch.zeros({ROWS}, dtype=torch.long)
find_isolated(embeddings[:50], labels[:50], 0.2)  # warm up every code path's allocations
def high_water_kib():  # this process's own peak (ru_maxrss would carry the parent's over fork + exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
before = high_water_kib()
dropped = find_isolated(embeddings, labels, 0.05, memory_budget_mb=budget).dropped.tolist()
peak = high_water_kib()
print(json.dumps({{"before_kib": before, "peak_kib": peak, "dropped": dropped}}))
"""


def _child(budget_mb: float) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(budget_mb)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status (Linux)")
def test_selection_stays_within_the_memory_budget_and_matches_the_dense_result():
    budget = 16
    tiled = _child(budget)
    dense = _child(4 * DENSE_MIB)
    extra_tiled = (tiled["peak_kib"] - tiled["before_kib"]) / 1024
    extra_dense = (dense["peak_kib"] - dense["before_kib"]) / 1024
    # The dense run really holds the matrix (so the measurement can see it) ...
    assert extra_dense > 0.6 * DENSE_MIB, f"the dense run grew by only {extra_dense:.0f} MiB"
    # ... and the budgeted run stays within its budget (plus the embeddings-sized vectors it keeps).
    assert extra_tiled < budget + 40, f"peak grew by {extra_tiled:.0f} MiB with memory_budget_mb={budget}"
    # Tiling changes how the kernel is computed, not which rows are dropped.
    assert tiled["dropped"] == dense["dropped"] and len(tiled["dropped"]) > 0
