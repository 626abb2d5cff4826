"""Adam-family directions on the CPU through torch's fused kernels, one tensor at a time, without a copy of ``w``.

(Where Numba is installed, LAMB and ``Layerwise(AdamW)`` take :mod:`lars_plugins.cpu_kernels` instead,
for float32 and float64; this module serves the rest, and every CPU step without Numba.)

LAMB and ``Layerwise(AdamW)`` need ``d = m̂/(√v̂+ε) + wd·w`` and its norm before they may update
``w``. torch's fused AdamW kernel computes ``m̂/(√v̂+ε)`` in one vectorised pass with the moments,
but only as an update of some "parameter" ``s``: ``s ← s·(1 − lr·wd) − lr·m̂/(√v̂+ε)``. Run at
``lr = 1`` and ``wd = 1`` on a scratch buffer ``s`` holding finite values, the first term is exactly
zero, so ``s = −m̂/(√v̂+ε)`` whatever ``s`` held: no copy of ``w``, and ``w`` is not read. Then

* ``‖w‖²``, ``‖s‖²`` and ``⟨s, w⟩`` (BLAS dot products while the tensor is in cache) give
  ``‖d‖² = ‖s‖² − 2·wd·⟨s, w⟩ + wd²·‖w‖²``;
* ``w ← w − a·d = w − a·(wd·w − s)`` is one pass of torch's fused SGD kernel with ``s`` as the
  gradient, ``maximize`` (which negates it) and weight decay ``wd``.

Where the expansion would cancel (``d`` at most half as long as its two terms suggest), the step
forms ``s − wd·w = −d`` instead and takes its norm directly, so the ratio keeps the precision of a
direct norm. The scratch buffer (:class:`Scratch`) is a ring per dtype that the optimizer keeps
between steps; a non-finite ``s`` (a non-finite gradient) is zeroed after use, so that it cannot
reach the next tensor through ``0·inf``.

:func:`supported` probes once per dtype that this torch's kernels behave so (the zeroing included);
where they do not, the callers take their other routes. In half precision ``s − wd·w`` is
always formed and the norms accumulate in float32.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .tensor_lists import cpu_fused_adamw, cpu_fused_sgd, host_norm

__all__ = ["Scratch", "AdamWDirection", "adamw_direction", "supported"]

# Below this fraction of ‖s‖² + wd²·‖w‖², ‖d‖² is formed from d itself rather than from the expansion:
# a float32 dot product carries a relative error of about 5e-6, and the expansion multiplies it by
# (‖s‖² + wd²‖w‖²)/‖d‖² at most twice over, so here by at most 4.
_DIRECT_BELOW = 0.5


def _flat(t: Tensor) -> Tensor:
    """The elements of a dense tensor in memory order (contiguous or channels-last) as one vector."""
    return t.view(-1) if t.is_contiguous() else t.as_strided((t.numel(),), (1,))


class Scratch:
    """Where the kernels write their results: views of one zero-filled buffer per dtype, handed out
    with a tensor's own shape and strides at advancing offsets, wrapping around (a ring).

    The ring keeps the memory a kernel writes from having been read, just before, by the norms and
    the update of the previous tensors: on the 2-core test machine, in a state where its cores
    behave as if they did not share a last-level cache, the step measured up to 2x slower with one
    buffer reused from its start (docs/performance.md). So each
    buffer holds the largest tensor plus ``reuse_distance`` bytes (at most all the tensors it
    serves), and an optimizer keeps its ``Scratch`` from step to step: allocated on the first step,
    grown when a larger tensor comes. ``reuse_distance=0`` gives one buffer of the largest tensor."""

    def __init__(self, reuse_distance: int = 32 << 20) -> None:
        self.reuse_distance = reuse_distance
        self._rings: dict[torch.dtype, list] = {}  # dtype -> [buffer, next offset]

    def reserve(self, tensors: list[Tensor]) -> None:
        """Make sure each dtype's buffer serves ``tensors`` with the reuse distance."""
        largest: dict[torch.dtype, int] = {}
        total: dict[torch.dtype, int] = {}
        for t in tensors:
            largest[t.dtype] = max(largest.get(t.dtype, 0), t.numel())
            total[t.dtype] = total.get(t.dtype, 0) + _aligned(t.numel())
        for dtype, n in largest.items():
            size = max(n, min(total[dtype], n + self.reuse_distance // dtype.itemsize))
            ring = self._rings.get(dtype)
            if ring is None or ring[0].numel() < size:
                self._rings[dtype] = [torch.zeros(size, dtype=dtype), 0]

    @property
    def nbytes(self) -> int:
        """The bytes its buffers hold."""
        return sum(ring[0].numel() * ring[0].element_size() for ring in self._rings.values())

    def flat(self, dtype: torch.dtype, n: int) -> Tensor:
        """The buffer of ``dtype`` itself, flat, of at least ``n`` elements (grown where smaller), for a
        route that places its results in it (:mod:`lars_plugins.cpu_kernels`)."""
        ring = self._rings.get(dtype)
        if ring is None or ring[0].numel() < n:
            self._rings[dtype] = ring = [torch.zeros(n, dtype=dtype), 0]
        return ring[0]

    def like(self, t: Tensor) -> Tensor:
        """A view with ``t``'s shape and strides (``t`` dense: contiguous or channels-last), holding
        finite values."""
        n = t.numel()
        ring = self._rings.get(t.dtype)
        if ring is None or ring[0].numel() < n:
            self.reserve([t])
            ring = self._rings[t.dtype]
        buffer, offset = ring
        if offset + n > buffer.numel():
            offset = 0
        ring[1] = offset + _aligned(n)
        return buffer.as_strided(t.shape, t.stride(), offset)


def _aligned(n: int) -> int:
    """``n`` elements rounded up to a multiple of 16 (64 bytes of float32: a cache line), so that
    every view starts on a line as the kernels split their work in lines."""
    return -(-n // 16) * 16


@dataclass
class AdamWDirection:
    """One tensor's direction ``d``, held as ``s`` with ``d = decay·w − s``, and the two norms."""

    w: Tensor
    s: Tensor
    decay: float
    w_norm: float
    d_norm: float

    def apply(self, alpha: float) -> None:
        """``w ← w − alpha·d``, then a non-finite ``s`` is zeroed (the scratch must stay finite)."""
        if self.decay == 0:
            self.w.add_(self.s, alpha=alpha)
        else:
            torch._fused_sgd_([self.w], [self.s], [], weight_decay=self.decay, momentum=0.0, lr=alpha, dampening=0.0,
                              nesterov=False, maximize=True, is_first_step=False)
        if not (math.isfinite(self.w_norm) and math.isfinite(self.d_norm)):
            self.s.zero_()


def adamw_direction(w: Tensor, g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, max_exp_avg_sq: Optional[Tensor],
                    step: Tensor, scratch: Scratch, *, beta1: float, beta2: float, eps: float, weight_decay: float,
                    maximize: bool) -> AdamWDirection:
    """Update ``w``'s moments (``max_exp_avg_sq`` too, where given: amsgrad) as torch's AdamW does at
    step ``step`` (a 0-d float32 count, already incremented), and return AdamW's direction
    ``d = m̂/(√v̂+ε) + weight_decay·w`` with ``‖w‖`` and ``‖d‖``; ``w`` is not changed. All tensors
    dense with ``w``'s strides, of a dtype :func:`supported` accepts."""
    s = scratch.like(w)
    torch._fused_adamw_([s], [g], [exp_avg], [exp_avg_sq], [max_exp_avg_sq] if max_exp_avg_sq is not None else [],
                        [step], lr=1.0, beta1=beta1, beta2=beta2, weight_decay=1.0, eps=eps,
                        amsgrad=max_exp_avg_sq is not None, maximize=maximize)
    if not _expands(w.dtype):  # half precision: d formed in place, norms accumulated in float32
        if weight_decay != 0:
            s.sub_(w, alpha=weight_decay)
        return AdamWDirection(w, s, 0.0, host_norm(w), host_norm(s))
    s_flat, w_flat = _flat(s), _flat(w)
    s_sq, w_sq = torch.dot(s_flat, s_flat).item(), torch.dot(w_flat, w_flat).item()
    decay, d_sq = weight_decay, s_sq
    if weight_decay != 0:
        d_sq = s_sq - 2 * weight_decay * torch.dot(s_flat, w_flat).item() + weight_decay * weight_decay * w_sq
        if not d_sq >= _DIRECT_BELOW * (s_sq + weight_decay * weight_decay * w_sq):  # not: NaN lands here too
            s.sub_(w, alpha=weight_decay)
            decay, d_sq = 0.0, torch.dot(s_flat, s_flat).item()
    return AdamWDirection(w, s, decay, math.sqrt(w_sq), math.sqrt(d_sq))  # d_sq >= 0 or NaN


@functools.lru_cache(maxsize=None)
def supported(dtype: torch.dtype) -> bool:
    """Whether this torch's fused AdamW kernel runs on CPU tensors of ``dtype`` and behaves as
    :func:`adamw_direction` relies on: at ``lr = wd = 1`` its result does not depend on what the
    "parameter" held (probed once, where :func:`~lars_plugins.tensor_lists.cpu_fused_adamw` found the kernel)."""
    if not cpu_fused_adamw(dtype):
        return False
    results = []
    for start in (0.0, 3.0):
        s = torch.full((2,), start, dtype=dtype)
        torch._fused_adamw_([s], [torch.ones(2, dtype=dtype)], [torch.zeros(2, dtype=dtype)],
                            [torch.zeros(2, dtype=dtype)], [], [torch.tensor(1.0)], lr=1.0, beta1=0.5, beta2=0.5,
                            weight_decay=1.0, eps=0.0, amsgrad=False, maximize=False)
        results.append(s)
    minus_one = torch.full((2,), -1.0, dtype=dtype)  # −m̂/√v̂ = −(0.5/0.5)/√(0.5/0.5)
    return all(torch.equal(r, minus_one) for r in results)


@functools.lru_cache(maxsize=None)
def _expands(dtype: torch.dtype) -> bool:
    """Whether ``‖d‖`` may come from the expansion and ``w ← w − a·d`` from the fused SGD kernel: float32
    and float64 (BLAS dot products, and :func:`~lars_plugins.tensor_lists.cpu_fused_sgd`'s dtypes), where
    SGD's ``maximize`` with weight decay gives ``w − lr·(wd·w − g)`` (probed once)."""
    if not cpu_fused_sgd(dtype):
        return False
    w = torch.full((2,), 2.0, dtype=dtype)
    torch._fused_sgd_([w], [torch.ones(2, dtype=dtype)], [], weight_decay=0.5, momentum=0.0, lr=0.25,
                      dampening=0.0, nesterov=False, maximize=True, is_first_step=False)
    return bool(torch.equal(w, torch.full((2,), 2.0 - 0.25 * (0.5 * 2.0 - 1.0), dtype=dtype)))
