"""Process helpers of the scripts: which process prints, section banners, wall time, clean shutdown."""

from __future__ import annotations

import os
import time

__all__ = ["Timer", "banner", "is_main_process", "shutdown_distributed"]


def is_main_process() -> bool:
    """True on the process that prints and writes (rank 0, or the only one)."""
    return int(os.environ.get("RANK", "0")) == 0


def banner(title: str) -> None:
    """Print a section banner (main process only), so the log reads like the recipe."""
    if is_main_process():
        print(f"\n{'=' * 24} {title} {'=' * max(2, 60 - len(title))}", flush=True)


class Timer:
    """Wall time since construction."""

    def __init__(self) -> None:
        self.start = time.time()

    def __call__(self) -> float:
        return time.time() - self.start


def shutdown_distributed() -> None:
    """Wait for every process, then tear the process group down before the interpreter exits.

    Left to interpreter exit, gloo's teardown can abort a process ("terminate called without an
    active exception") after the work is done, which fails the launch.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
