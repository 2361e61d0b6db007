r"""Similarity kernels of the selection engine: one class per similarity, registered by name.

Pure torch (no Hugging Face imports). A kernel defines ``s(a, b)`` between two embedding rows
and what the greedy may use to skip work:

* :meth:`SimilarityKernel.prepare` turns a class's rows into the form :meth:`~SimilarityKernel.tile`
  works on (for example centred, or normalised) and says whether similarities must be rounded to
  multiples of ``2**-24`` for the greedy's sums to be exact;
* :meth:`SimilarityKernel.tile` computes a float32 block ``s(rows, cols)``;
* a :class:`DistanceKernel` is ``s = f(||a - b||)`` with ``f`` decreasing, and adds the pruning
  bounds of the triangle inequality: the *reach* ``f^{-1}(cur)`` of a row whose best similarity
  is ``cur`` (no candidate farther than that can gain from it), used by the k-d cells of
  :mod:`hf_epic.cells`, and the threshold ``f(f^{-1}(old) + f^{-1}(new))`` below which a
  candidate's similarity to a new medoid rules it out of an incremental gain update.

Kernels register themselves once with :func:`register_kernel`; :func:`available_kernels` lists the
names ``find_isolated(metric=...)`` and the configuration accept. A new similarity is one class::

    @register_kernel("gaussian")
    class GaussianKernel(DistanceKernel):
        def from_distance_(self, d, dim):          # s = exp(-d^2 / D), in place
            return d.square_().mul_(-1.0 / dim).exp_()

        def to_distance(self, s, dim):             # its inverse, inf where s <= 0
            return torch.sqrt(-dim * torch.log(s.clamp_min(1e-300))).masked_fill_(s <= 0, math.inf)

Built in:

* ``"euclidean"``: ``s(a, b) = exp(-||a - b||_2 / D)`` with ``D`` the embedding dimension, the
  EPIC reference's kernel (submodlib's dense ``"euclidean"``), evaluated in float64 and rounded to
  float32 once; on the CPU, with ``D <= 64``, by fused C kernels that give the same bits
  (:meth:`SimilarityKernel.native`, :mod:`hf_epic.native`);
* ``"cosine"``: ``s(a, b) = <a, b> / (||a|| ||b||)`` (0 when a vector is zero); no pruning bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar, TypeVar

import torch

from hf_epic import native
from hf_epic.native import NativeKernels

__all__ = [
    "KERNELS",
    "CosineKernel",
    "DistanceKernel",
    "EuclideanKernel",
    "SimilarityKernel",
    "available_kernels",
    "get_kernel",
    "register_kernel",
    "unregister_kernel",
]


class SimilarityKernel:
    """A similarity ``s(a, b)`` between embedding rows, with ``s(a, a) = 1`` and ``s <= 1``.

    Subclasses implement :meth:`tile` (and usually :meth:`prepare`) and register with
    :func:`register_kernel`, which sets :attr:`name`.

    Attributes:
        name: The name ``find_isolated(metric=...)`` and the configuration use.
        nonnegative: Whether every similarity is ``>= 0`` (otherwise the greedy clips gains at 0
            from its first step, as facility location's ``max(0, .)`` requires).
        distance_based: Whether the kernel is a :class:`DistanceKernel` (pruning bounds exist).
    """

    name: ClassVar[str] = ""
    nonnegative: ClassVar[bool] = True
    distance_based: ClassVar[bool] = False

    def prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """Rows as :meth:`tile` takes them.

        Args:
            x: The class's embeddings, float64, rows x D.

        Returns:
            ``(points float64, squared norms of the points float64 or None, needs_rounding)``;
            ``needs_rounding`` is False only when every similarity is known to be a float32
            value in ``[0.5, 1]`` (already a multiple of ``2**-24``).
        """
        return x, None, True

    def tile(
        self,
        xa: torch.Tensor,
        xbt: torch.Tensor,
        sqa: torch.Tensor | None,
        sqb: torch.Tensor | None,
        dim: int,
        out: torch.Tensor | None = None,
        work: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Similarities ``s(a, b)`` of rows ``xa`` (m x D) and columns ``xbt`` (D x k), float32.

        Args:
            xa: Prepared rows.
            xbt: Prepared columns, transposed.
            sqa: Squared norms of ``xa`` (as :meth:`prepare` returned them) or None.
            sqb: Squared norms of the columns or None.
            dim: The embedding dimension ``D``.
            out: A float32 m x k buffer to write into (returned), or None for a new one.
            work: A contiguous m x k buffer of the rows' dtype for intermediate values, or None.
        """
        raise NotImplementedError

    def native(self, dim: int) -> NativeKernels | None:
        """Fused C kernels that compute exactly this similarity on the CPU (:mod:`hf_epic.native`),
        or None (the default): then the selection computes it with :meth:`tile` alone."""
        return None


class DistanceKernel(SimilarityKernel):
    """``s(a, b) = f(||a - b||_2)`` with ``f`` decreasing from ``f(0) = 1`` towards 0.

    Subclasses implement :meth:`from_distance_` (``f``) and :meth:`to_distance` (its inverse).
    Rows are centred (distances do not change; squared norms get smaller, so the expansion
    ``||a||^2 + ||b||^2 - 2 a.b`` cancels less).
    """

    distance_based: ClassVar[bool] = True

    def from_distance_(self, d: torch.Tensor, dim: int) -> torch.Tensor:
        """``f(d)`` in place on a float tensor of distances (returned)."""
        raise NotImplementedError

    def to_distance(self, s: torch.Tensor, dim: int) -> torch.Tensor:
        """``f^{-1}(s)`` (float64): the distance below which a similarity exceeds ``s``; inf for ``s <= 0``."""
        raise NotImplementedError

    def pair_threshold(self, old: torch.Tensor, new: torch.Tensor, dim: int) -> torch.Tensor:
        """A lower bound on ``s(c, j)`` for every candidate ``c`` that row ``i`` can still gain.

        Row ``i`` has best similarity ``old`` and ``new = s(i, j)`` for the new medoid ``j``; it
        changes the gain of ``c`` only if ``s(i, c) > old``, and then by the triangle inequality
        ``||c - j|| < f^{-1}(old) + f^{-1}(new)``, so ``s(c, j) > f(f^{-1}(old) + f^{-1}(new))``.
        """
        d = self.to_distance(old.to(torch.float64), dim) + self.to_distance(new.to(torch.float64), dim)
        return self.from_distance_(d, dim).to(old.dtype)

    def prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        x = x - x.mean(dim=0, keepdim=True)
        sq = (x * x).sum(dim=1)
        # every distance is at most twice the largest norm; if every similarity is then >= 0.5,
        # float32 already holds them as multiples of 2**-24
        largest = torch.tensor([2.0 * math.sqrt(float(sq.max())) * 1.001], dtype=torch.float64)
        needs_rounding = float(self.from_distance_(largest, x.shape[1])) < 0.5
        return x, sq, needs_rounding

    def from_sq_distance(self, d2: torch.Tensor, dim: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 similarities from squared distances (rounding residues below 0 count as 0).

        Rounding to float32 is monotone and keeps 0, so clamping after it gives the same values
        as clamping before, on half the bytes.
        """
        if out is None:
            out = d2.to(torch.float32)
        else:
            out.copy_(d2)
        return self.from_distance_(out.clamp_min_(0.0).sqrt_(), dim)

    def tile(
        self,
        xa: torch.Tensor,
        xbt: torch.Tensor,
        sqa: torch.Tensor | None,
        sqb: torch.Tensor | None,
        dim: int,
        out: torch.Tensor | None = None,
        work: torch.Tensor | None = None,
    ) -> torch.Tensor:
        assert sqa is not None and sqb is not None
        d2 = torch.add(sqa[:, None], sqb[None, :], out=work)
        d2.addmm_(xa, xbt, beta=1.0, alpha=-2.0)
        return self.from_sq_distance(d2, dim, out)


_K = TypeVar("_K", bound=type[SimilarityKernel])
KERNELS: dict[str, type[SimilarityKernel]] = {}
"""Every registered kernel class by name, in registration order."""


def register_kernel(name: str) -> Callable[[_K], _K]:
    """Class decorator: registers a :class:`SimilarityKernel` subclass under ``name``.

    Raises:
        ValueError: If ``name`` is empty or already registered.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a kernel name must be a non-empty string, got {name!r}.")

    def decorate(cls: _K) -> _K:
        if not (isinstance(cls, type) and issubclass(cls, SimilarityKernel)):
            raise TypeError(f"register_kernel({name!r}) decorates SimilarityKernel subclasses, got {cls!r}.")
        if name in KERNELS:
            raise ValueError(f"a kernel named {name!r} is already registered ({KERNELS[name].__name__}).")
        cls.name = name
        KERNELS[name] = cls
        return cls

    return decorate


def unregister_kernel(name: str) -> None:
    """Removes a registered kernel (for tests and plug-ins that replace one)."""
    KERNELS.pop(name, None)


def available_kernels() -> tuple[str, ...]:
    """Names of the registered kernels, in registration order (the built-in ones first)."""
    return tuple(KERNELS)


def get_kernel(name: str | SimilarityKernel) -> SimilarityKernel:
    """The kernel registered as ``name`` (an instance is returned as is).

    Raises:
        ValueError: If no kernel has that name.
    """
    if isinstance(name, SimilarityKernel):
        return name
    cls = KERNELS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown metric {name!r}; choose one of {', '.join(KERNELS)}.")
    return cls()


@register_kernel("euclidean")
class EuclideanKernel(DistanceKernel):
    """``s(a, b) = exp(-||a - b||_2 / D)``: the EPIC reference's kernel, in ``(0, 1]``."""

    def from_distance_(self, d: torch.Tensor, dim: int) -> torch.Tensor:
        return d.mul_(-1.0 / dim).exp_()

    def from_sq_distance(self, d2: torch.Tensor, dim: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """``exp(-sqrt(max(0, d2)) / D)`` in the dtype of ``d2`` (overwritten), rounded to float32
        once: from float64 distances, the correctly rounded similarity in all but about one case in
        10^8, which :mod:`hf_epic.native`'s kernels compute alike (torch's float32 ``sqrt`` and
        ``exp`` are not correctly rounded)."""
        s = self.from_distance_(d2.clamp_min_(0.0).sqrt_(), dim)
        if out is None:
            return s.to(torch.float32)
        return out.copy_(s)

    def to_distance(self, s: torch.Tensor, dim: int) -> torch.Tensor:
        s = s.to(torch.float64)
        return torch.where(s > 0, -dim * torch.log(s.clamp_min(1e-300)), math.inf)

    def native(self, dim: int) -> NativeKernels | None:
        # only this exact similarity (a subclass that redefines any part of it computes it in torch)
        cls = type(self)
        parts = ("prepare", "tile", "from_distance_", "from_sq_distance")
        same = all(getattr(cls, f) is getattr(EuclideanKernel, f) for f in parts)
        return native.load(dim) if same else None

    def tile(
        self,
        xa: torch.Tensor,
        xbt: torch.Tensor,
        sqa: torch.Tensor | None,
        sqb: torch.Tensor | None,
        dim: int,
        out: torch.Tensor | None = None,
        work: torch.Tensor | None = None,
    ) -> torch.Tensor:
        lib = self.native(dim) if xa.device.type == "cpu" and xa.dtype == torch.float64 else None
        if lib is None:
            return super().tile(xa, xbt, sqa, sqb, dim, out, work)
        assert sqa is not None and sqb is not None
        if out is None:
            out = torch.empty((int(xa.shape[0]), int(xbt.shape[1])), dtype=torch.float32)
        return lib.block(xa, sqa, xbt, sqb, False, out)

    def pair_threshold(self, old: torch.Tensor, new: torch.Tensor, dim: int) -> torch.Tensor:
        # exp(-(a + b) / D) = exp(-a / D) exp(-b / D)
        return old * new


@register_kernel("cosine")
class CosineKernel(SimilarityKernel):
    """``s(a, b) = <a, b> / (||a|| ||b||)``, 0 when a vector is zero; in ``[-1, 1]``, no pruning bound."""

    nonnegative: ClassVar[bool] = False

    def prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        norms = x.norm(dim=1, keepdim=True)
        x = torch.where(norms > 0, x / norms.clamp_min(1e-300), torch.zeros_like(x))
        return x, None, True

    def tile(
        self,
        xa: torch.Tensor,
        xbt: torch.Tensor,
        sqa: torch.Tensor | None,
        sqb: torch.Tensor | None,
        dim: int,
        out: torch.Tensor | None = None,
        work: torch.Tensor | None = None,
    ) -> torch.Tensor:
        sims = torch.mm(xa, xbt, out=work).clamp_(-1.0, 1.0)
        if out is None:
            return sims.to(torch.float32)
        return out.copy_(sims)
