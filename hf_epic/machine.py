"""The machine a result was measured on, so that reports can say which runs are comparable.

A seeded run is deterministic on one kind of machine, but not across kinds: torch dispatches its CPU
kernels by the processor's vector instructions (``torch.backends.cpu.get_cpu_capability()``: ``AVX2``,
``AVX512``, ...), GPUs have kernels of their own, and kernels of different widths round floating-point
sums differently. Training amplifies those last-bit differences, so one trial of an attack can end
on either side of the decision boundary on two machines. The benchmark harness records this
fingerprint with every cell, and its report lists the kinds of machine a folder's cells came from.
"""

from __future__ import annotations

import functools
import platform
import sys
from collections.abc import Mapping
from importlib import metadata

import torch

# the packages whose versions change what a seeded run computes (initialisation, kernels, data order)
_PACKAGES = ("torch", "transformers", "timm", "datasets", "numpy")


def _cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_fingerprint() -> dict[str, str]:
    """What decides whether two seeded runs of the same command compute the same numbers.

    Returns:
        A JSON-serialisable dict of strings: ``device`` (the CUDA device's name, or ``cpu``), ``cpu``
        (the processor's model name), ``cpu_capability`` (the vector instructions torch's CPU kernels
        use), ``platform``, ``python`` and the versions of torch, transformers, timm, datasets and numpy.
        Computed once per process; each call returns a fresh copy.

    Example:
        >>> from hf_epic.machine import machine_fingerprint
        >>> machine_fingerprint()["cpu_capability"]  # doctest: +SKIP
        'AVX512'
    """
    return dict(_fingerprint())


@functools.lru_cache(maxsize=1)
def _fingerprint() -> dict[str, str]:
    fingerprint = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "cpu": _cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "platform": f"{platform.system()} {platform.machine()}",
        "python": sys.version.split()[0],
    }
    fingerprint.update({package: _version(package) for package in _PACKAGES})
    fingerprint["torch"] = torch.__version__  # with the build's tag (e.g. +cpu, +cu130)
    return fingerprint


def describe_machine(fingerprint: Mapping[str, str]) -> str:
    """One line for a report, e.g. ``cpu: AMD EPYC (AVX512), Linux x86_64, torch 2.14.1, ...``."""
    device, cpu = fingerprint.get("device", "?"), fingerprint.get("cpu", "?")
    head = f"{device}: {cpu} ({fingerprint.get('cpu_capability', '?')})"
    versions = ", ".join(f"{p} {fingerprint[p]}" for p in _PACKAGES if p in fingerprint)
    return ", ".join(part for part in (head, fingerprint.get("platform", ""), versions) if part)
