"""Fused C kernels for the euclidean similarity on the CPU, compiled on first use.

Exact greedy on a class too large for a dense kernel recomputes ``O(n^2)`` similarities per pass.
In torch each block of them takes about ten tensor calls, each a trip through memory; the C kernels
of ``native.c`` compute a similarity and add it to its sums in registers, about 2x faster. They are
compiled by the system's C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``) for the embedding
dimension at hand, once per machine, and cached under ``$HF_EPIC_CACHE`` (default
``~/.cache/hf_epic/native``); loading takes milliseconds, a first compile under a second.

Where no compiler is found, or it fails, selection runs its torch kernels instead and a warning
says why; the results are the same (:mod:`hf_epic.kernels` defines the similarity so that both
compute it bit for bit alike in practice). ``HF_EPIC_NATIVE=0`` turns the C kernels off.

Pure Python standard library and torch (no Hugging Face imports); the compiled code is called
through :mod:`ctypes`, which releases the GIL, so the selection's threads run it in parallel.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import threading
from pathlib import Path

import torch

__all__ = ["MAX_DIM", "NativeKernels", "cache_dir", "load"]

logger = logging.getLogger(__name__)

MAX_DIM = 64
"""Largest embedding dimension with C kernels (wider embeddings are dominated by the matrix product,
which torch does well)."""

_SOURCE = Path(__file__).with_name("native.c")
_FLAGS = [
    "-O3",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fopenmp-simd",
    "-fPIC",
    "-shared",
]
# tried in order: the first set the compiler accepts is used
_TARGET_FLAGS = (["-march=native", "-mprefer-vector-width=512"], ["-march=native"], ["-mcpu=native"], [])
_LOCK = threading.Lock()
_LOADED: dict[int, NativeKernels | None] = {}
_WARNED: set[str] = set()

_P = ctypes.c_void_p
_L = ctypes.c_long
_I = ctypes.c_int


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$HF_EPIC_CACHE``, else ``$XDG_CACHE_HOME/hf_epic`` or
    ``~/.cache/hf_epic``, then ``native``."""
    root = os.environ.get("HF_EPIC_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hf_epic")
    return Path(root) / "native"


def _enabled() -> bool:
    return os.environ.get("HF_EPIC_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _compiler() -> list[str] | None:
    for candidate in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if not candidate:
            continue
        words = candidate.split()
        if shutil.which(words[0]):
            return words
    return None


def _machine() -> str:
    """What a binary built with ``-march=native`` depends on: the architecture and the CPU's features."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features", "model name")):
                    text += line
    except OSError:
        text += platform.processor()
    return text


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning(message)


def _build(dim: int) -> Path | None:
    """The path of the compiled library for ``dim``, compiling it when it is not cached."""
    cc = _compiler()
    if cc is None:
        _warn_once(
            "cc",
            "hf_epic: no C compiler found (tried $CC, cc, gcc, clang); selection of large classes uses its "
            "torch kernels, about 2x slower. Install one (e.g. `apt-get install gcc`) or set HF_EPIC_NATIVE=0 "
            "to silence this.",
        )
        return None
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    source = _SOURCE.read_bytes()
    machine = _machine().encode()
    errors = []
    for target in _TARGET_FLAGS:
        flags = [*_FLAGS, *target, f"-DDIM={dim}"]
        key = hashlib.sha256(b"\0".join([source, " ".join(cc + flags).encode(), version.encode(), machine]))
        path = cache_dir() / f"epic_d{dim}_{key.hexdigest()[:24]}.so"
        if path.exists():
            return path
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
            os.close(fd)
            done = subprocess.run(
                [*cc, *flags, "-o", tmp, str(_SOURCE), "-lm"], capture_output=True, text=True, timeout=300
            )
            if done.returncode == 0:
                os.replace(tmp, path)  # atomic: concurrent processes each write a whole file
                return path
            errors.append(done.stderr.strip().splitlines()[-1:] or ["(no message)"])
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append([str(exc)])
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    _warn_once(
        "build",
        f"hf_epic: compiling the C selection kernels with {' '.join(cc)} failed ({errors[-1][0]}); selection "
        "of large classes uses its torch kernels, about 2x slower. Set CC to a working C compiler, or "
        "HF_EPIC_NATIVE=0 to silence this.",
    )
    return None


class NativeKernels:
    """The C kernels compiled for one embedding dimension; arguments are CPU tensors (see ``native.c``).

    Row-major float64 points ``x`` (rows x D, contiguous), their transpose ``xt`` (D x n, any row
    stride ``ldb``), float64 squared norms, float32 clamp bounds, float64 sums.
    """

    def __init__(self, path: Path, dim: int) -> None:
        self.dim = dim
        lib = ctypes.CDLL(str(path))
        self._block = lib.epic_block
        self._block.argtypes = [_P, _P, _P, _L, _P, _L, _L, _I, _P, _L]
        self._block.restype = None
        self._band = lib.epic_band_sums
        self._band.argtypes = [_P, _P, _P, _L, _L, _L, _I, _I, _P, _P, _P]
        self._band.restype = None
        self._clamped = lib.epic_clamped_sums
        self._clamped.argtypes = [_P, _P, _P, _P, _P, _L, _P, _L, _P, _L, _I, _P]
        self._clamped.restype = None
        self._column = lib.epic_column
        self._column.argtypes = [_P, ctypes.c_double, _P, _P, _L, _L, _L, _L, _I, _P, _P, _P]
        self._column.restype = _L
        self._cell_pairs = lib.epic_cell_pairs
        self._cell_pairs.argtypes = [_P, _P, _P, _P, _P, _P, _L, _L, _I, _P]
        self._cell_pairs.restype = None

    def block(
        self,
        xa: torch.Tensor,
        sqa: torch.Tensor,
        xbt: torch.Tensor,
        sqb: torch.Tensor,
        quantize: bool,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """``out`` (float32 m x k, rows contiguous, any row stride) = s(rows of ``xa``, columns of ``xbt``)."""
        m, k = int(xa.shape[0]), int(xbt.shape[1])
        if tuple(out.shape) != (m, k) or out.dtype != torch.float32 or (out.stride(1) != 1 and k > 1):
            raise ValueError(f"out must be a float32 {m} x {k} tensor with contiguous rows")
        xa, sqa, sqb = xa.contiguous(), sqa.contiguous(), sqb.contiguous()
        if xbt.stride(1) != 1:
            xbt = xbt.contiguous()
        ldo = out.stride(0) if m > 1 else k
        self._block(
            _ptr(xa), _ptr(sqa), _ptr(xbt), xbt.stride(0), _ptr(sqb), m, k, int(quantize), _ptr(out), ldo
        )
        return out

    def band_sums(
        self,
        x: torch.Tensor,
        xt: torch.Tensor,
        sq: torch.Tensor,
        r0: int,
        r1: int,
        quantize: bool,
        mode: int,
        lo: torch.Tensor | None,
        hi: torch.Tensor | None,
        total: torch.Tensor,
    ) -> None:
        """Adds the band ``[r0, r1)``'s share of the column sums to ``total`` (``epic_band_sums``)."""
        n = int(x.shape[0])
        self._band(
            _ptr(x), _ptr(xt), _ptr(sq), n, r0, r1, int(quantize), mode, _ptr(lo), _ptr(hi), _ptr(total)
        )

    def clamped_sums(
        self,
        xa: torch.Tensor,
        sqa: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
        own: torch.Tensor,
        xbt: torch.Tensor,
        sqb: torch.Tensor,
        quantize: bool,
        total: torch.Tensor,
    ) -> None:
        """``total[c] += sum_i clamp(s(i, c), lo_i, hi_i)`` (``own[i]``: row i's own column, s = 1)."""
        m, k = int(xa.shape[0]), int(xbt.shape[1])
        if xbt.stride(1) != 1:
            xbt = xbt.contiguous()
        self._clamped(
            _ptr(xa),
            _ptr(sqa),
            _ptr(lo),
            _ptr(hi),
            _ptr(own),
            m,
            _ptr(xbt),
            xbt.stride(0),
            _ptr(sqb),
            k,
            int(quantize),
            _ptr(total),
        )

    def column(
        self,
        x: torch.Tensor,
        xt: torch.Tensor,
        sq: torch.Tensor,
        j: int,
        r0: int,
        r1: int,
        quantize: bool,
        cur: torch.Tensor | None,
        out: torch.Tensor,
        changed: torch.Tensor | None,
    ) -> int:
        """``out[r0:r1]`` = s(rows r0..r1-1, j) (``out[j] = 1``); with ``cur``, the rows among them whose
        similarity exceeds ``cur`` go to the front of ``changed`` (int64, ascending), and their count
        is returned."""
        n = int(x.shape[0])
        return int(
            self._column(
                _ptr(x[j]),
                float(sq[j]),
                _ptr(xt),
                _ptr(sq),
                n,
                r0,
                r1,
                j,
                int(quantize),
                _ptr(cur),
                _ptr(out),
                _ptr(changed),
            )
        )

    def cell_pairs(
        self,
        cell_xt: torch.Tensor,
        cell_sq: torch.Tensor,
        cell: torch.Tensor,
        x: torch.Tensor,
        sq: torch.Tensor,
        cands: torch.Tensor,
        quantize: bool,
    ) -> torch.Tensor:
        """s(every row of cell ``cell[p]``, row ``cands[p]``) as a float32 P x L tensor, for cells whose
        rows are held transposed (``cell_xt``: cells x D x L, float64; ``cell_sq``: cells x L)."""
        cell, cands = cell.contiguous(), cands.contiguous()
        count, width = int(cell.numel()), int(cell_xt.shape[2])
        out = torch.empty((count, width), dtype=torch.float32)
        self._cell_pairs(
            _ptr(cell_xt),
            _ptr(cell_sq),
            _ptr(cell),
            _ptr(x),
            _ptr(sq),
            _ptr(cands),
            count,
            width,
            int(quantize),
            _ptr(out),
        )
        return out


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _agrees_with_torch(kernels: NativeKernels) -> bool:
    """Whether a 64 x 64 block of the C kernel equals the torch kernel of :mod:`hf_epic.kernels`
    (``exp(-||a - b|| / D)`` in float64, rounded to float32), bit for bit."""
    from hf_epic.kernels import DistanceKernel, EuclideanKernel  # imports this module

    g = torch.Generator().manual_seed(0)
    euclidean = EuclideanKernel()
    x, sq, _ = euclidean.prepare(
        torch.softmax(3.0 * torch.randn(64, kernels.dim, generator=g), dim=1).double()
    )
    assert sq is not None
    xt = x.T.contiguous()
    want = DistanceKernel.tile(euclidean, x, xt, sq, sq, kernels.dim)  # torch's, not the C kernel
    got = kernels.block(x, sq, xt, sq, False, torch.empty(64, 64))
    return bool(torch.equal(got, want))


def load(dim: int) -> NativeKernels | None:
    """The C kernels for embeddings of ``dim`` dimensions, or None (turned off, ``dim`` above
    :data:`MAX_DIM`, or no working compiler: then a warning says why, once)."""
    if not _enabled() or not 1 <= dim <= MAX_DIM:
        return None
    with _LOCK:
        if dim not in _LOADED:
            path = _build(dim)
            kernels = None
            if path is not None:
                try:
                    kernels = NativeKernels(path, dim)
                    if not _agrees_with_torch(kernels):
                        kernels = None
                        _warn_once(
                            "check",
                            f"hf_epic: the C selection kernels built by {path} do not reproduce torch's "
                            "similarities (a compiler that fuses or reorders floating-point operations?); "
                            "using torch's. Set CC to another compiler, or HF_EPIC_NATIVE=0 to silence this.",
                        )
                except OSError as exc:
                    _warn_once(
                        "load", f"hf_epic: loading the C selection kernels failed ({exc}); using torch's."
                    )
            _LOADED[dim] = kernels
        return _LOADED[dim]
