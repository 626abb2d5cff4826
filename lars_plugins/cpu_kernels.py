"""AdamW's direction, its norms, a trust ratio and the update on the CPU in one compiled call over a
group of tensors, with Numba (optional).

LAMB and ``Layerwise(AdamW)`` need, per tensor, the moments, ``d = m̂/(√v̂+ε) + wd·w``, ``‖w‖`` and
``‖d‖`` before they may update ``w``. torch offers these as separate passes per tensor (its fused
AdamW kernel, then dot products, then an update: :mod:`lars_plugins.cpu_directions`). Here
(:class:`AdamWBatch`) one compiled call walks all the tensors of a step. Per tensor: one loop reads
``g``, ``m``, ``v`` and ``w``, writes the moments and ``d`` (into a scratch buffer the optimizer
keeps) and sums ``‖w‖²`` and ``‖d‖²`` in float64; the ratio follows, by the same rule as on the
other routes (:class:`LambRatio`, :class:`TrustRatio`: Numba compiles the project's Python
functions); a second loop applies ``w ← w − lr·r·d`` while ``d`` and ``w`` are still in cache. The
Python work per tensor is a table entry rather than a dozen operator calls, and nothing is allocated
in the step. The buffer holds the largest tensor up to :data:`SCRATCH_LIMIT` elements; a larger
tensor has ``d`` computed again from its stored moments in the second loop instead (slower: the
square root and division run twice). On the 2-core test machine LAMB's step took 1.2-1.5x fused
AdamW's this way, against 1.7-1.9x with torch's kernels (docs/performance.md has the times).

It is used where all of these hold, and the callers take torch's kernels otherwise:

* Numba is installed (``pip install "lars_plugins[numba]"``) and :data:`enabled` is true (the
  environment variable ``LARS_PLUGINS_NUMBA=0`` sets it false at import);
* the tensors are dense CPU tensors of float32 or float64 (Numba has no bfloat16), each with its
  gradient and moments in its own dtype and memory layout (checked per tensor: the loops read memory
  by address);
* Numba's threading layer is OpenMP or TBB: on its fallback ("workqueue") the call ran 2.7-3.5×
  slower than on OpenMP (ResNet-50's parameters, docs/performance.md), and that layer may not be
  called from several threads at once;
* the process is not a fork of one where the loops already ran (DataLoader workers, fork-started
  processes): OpenMP's threads do not survive ``fork``, and Numba would end the child.

The loops run on ``torch.get_num_threads()`` threads (at most Numba's own maximum). They are compiled
on first use (a few seconds; the loops are cached on disk where Numba can write) and checked once
per dtype against the rule computed by torch in float64 before the first step relies on them.
Floating-point differences from torch's kernel: the sums are reassociated (vectorised) and products
may be fused (FMA), so the results agree with torch's to rounding, not bit for bit.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .cpu_directions import Scratch
from .tensor_lists import same_dense_layout

__all__ = ["enabled", "available", "takes", "advance_counts", "LambRatio", "TrustRatio", "AdamWBatch",
           "SCRATCH_LIMIT"]

enabled: bool = os.environ.get("LARS_PLUGINS_NUMBA", "1").strip().lower() not in ("0", "false", "off", "no")
"""Whether :func:`available` may say yes; set it false to take torch's kernels (benchmarks compare the two)."""

_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}

LAMB_RULE, TRUST_RULE = 0, 1  # how the compiled loops tell the two rules apart

SCRATCH_LIMIT: int = 1 << 22
"""The most elements of ``d`` the scratch buffer holds (16 MiB of float32): larger tensors compute ``d``
twice instead, so that the buffer stays small beside a large embedding's moments."""


@dataclass(frozen=True)
class LambRatio:
    """LAMB's trust ratio of ``‖w‖`` and ``‖u‖`` (:func:`lars_plugins.lamb_rule.lamb_trust_ratio`)."""

    weight_norm_bounds: Optional[tuple[float, float]]
    trust_clip: bool

    def __call__(self, w_norm: float, u_norm: float) -> float:
        from .lamb_rule import _host_lamb_ratio  # (lamb_rule imports this module)

        return _host_lamb_ratio(w_norm, u_norm, self.weight_norm_bounds, self.trust_clip)

    def _compiled(self) -> tuple[int, np.ndarray]:
        bounds = self.weight_norm_bounds
        return LAMB_RULE, np.array([bounds is not None, *(bounds or (0.0, 0.0)), self.trust_clip], dtype=np.float64)


@dataclass(frozen=True)
class TrustRatio:
    """LARS's trust ratio of ``‖w‖`` and a direction's norm (:func:`lars_plugins.trust_ratio`)."""

    trust_coefficient: float
    weight_decay: float
    eps: float
    lr: float
    trust_clip: bool

    def __call__(self, w_norm: float, d_norm: float) -> float:
        from .lars_rule import host_trust_ratio

        return host_trust_ratio(w_norm, d_norm, self.trust_coefficient, self.weight_decay, self.eps, self.lr,
                                self.trust_clip)

    def _compiled(self) -> tuple[int, np.ndarray]:
        return TRUST_RULE, np.array([self.trust_coefficient, self.weight_decay, self.eps, self.lr, self.trust_clip],
                           dtype=np.float64)


Ratio = Union[LambRatio, TrustRatio]


@functools.lru_cache(maxsize=None)
def _loops() -> Optional[ModuleType]:
    """:mod:`lars_plugins._numba_loops` (compiling on first use), or ``None`` where Numba is not installed."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return None
    from . import _numba_loops

    return _numba_loops


_threads_set: dict[int, int] = {}  # calling thread -> the thread count its loops were last set to


def _threads() -> None:
    """Run the loops on as many threads as torch's operators use (Numba's setting is per calling thread)."""
    wanted, caller = torch.get_num_threads(), threading.get_ident()
    if _threads_set.get(caller) != wanted:
        import numba

        most: int = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]  # set at Numba's import
        numba.set_num_threads(max(1, min(wanted, most)))
        _threads_set[caller] = wanted


_started_in: Optional[int] = None  # the process whose Numba threads run the loops (set on first use)


def available(dtype: torch.dtype) -> bool:
    """Whether the compiled loops serve CPU tensors of ``dtype`` now (see the module's conditions)."""
    if not enabled or dtype not in _DTYPES:
        return False
    if _started_in is not None and _started_in != os.getpid():
        # A process forked after the loops ran: GNU OpenMP's threads do not survive fork, and Numba
        # ends such a child at its first parallel loop. Its steps take torch's kernels.
        return False
    return _checked(dtype)


_FLOAT32 = np.zeros(1, dtype=np.float32)  # tells the loops that an address holds a float32


def advance_counts(counts: Sequence[Tensor]) -> None:
    """Add one to each step count, as ``torch._foreach_add_(counts, 1.0)`` does: in one compiled
    call where the loops serve float32 and every count is one float32 CPU element (torch's op
    dispatches once per 0-d count), else by torch. For the steps of CPU tensors: the first
    call compiles the loops (:func:`available`)."""
    addresses: Optional[list[int]] = [] if available(torch.float32) else None
    if addresses is not None:
        for count in counts:
            if count.dtype != torch.float32 or not count.is_cpu or count.numel() != 1:
                addresses = None
                break
            addresses.append(count.data_ptr())
    if addresses is None:
        torch._foreach_add_(list(counts), 1.0)
    elif addresses:
        _loops().advance_counts(np.array(addresses, dtype=np.int64), _FLOAT32)  # type: ignore[union-attr]


def takes(w: Tensor, *others: Optional[Tensor]) -> bool:
    """Whether ``w`` and its gradient and state (``others``; ``None`` entries skipped) can go through
    the loops: dense CPU tensors of one dtype, shape and memory layout (the loops read them by
    address). Called per tensor and step, hence written for speed: the layout is
    :func:`~lars_plugins.tensor_lists.same_dense_layout`'s (``w`` dense, the others with its
    strides), and the others with its shape as well are dense in the same order; real dtypes carry
    no conjugate bit (a real tensor may carry the negative bit: the imaginary part of a conjugate view)."""
    dtype = w.dtype
    if dtype not in _DTYPES or not w.is_cpu or not same_dense_layout(w, *others):
        return False
    shape = w.shape
    for t in others:  # (a loop, not all() over a generator: a third less time)
        if t is not None and (t.shape != shape or t.dtype != dtype or not t.is_cpu or t.is_neg()):
            return False
    return True


@functools.lru_cache(maxsize=None)
def _checked(dtype: torch.dtype) -> bool:
    """Compile for ``dtype``, check the threading layer and the arithmetic once (against the rule in
    torch in float64, on a small example of two tensors); warn and say no where either fails."""
    global _started_in
    try:
        loops = _loops()
    except Exception as error:  # a broken Numba install must not stop training: torch's kernels serve
        warnings.warn(f"lars_plugins: Numba's CPU loops failed to compile ({error!r}); torch's kernels are used "
                      "instead.", RuntimeWarning, stacklevel=3)
        return False
    if loops is None:
        return False
    import numba

    _started_in = os.getpid()
    gen = torch.Generator().manual_seed(0)
    shapes = [(8, 8), (5,)]
    w0, g, m0 = ([torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(3))
    v0 = [torch.rand(s, generator=gen, dtype=torch.float64) for s in shapes]
    betas, eps, wd, steps, lr = (0.9, 0.99), 1e-3, 0.1, [3.0, 1.0], 0.5
    expected_m = [mi + (1 - betas[0]) * (gi - mi) for mi, gi in zip(m0, g)]
    expected_v = [betas[1] * vi + (1 - betas[1]) * gi * gi for vi, gi in zip(v0, g)]
    expected_d = [mi / (1 - betas[0] ** t) / (vi.sqrt() / math.sqrt(1 - betas[1] ** t) + eps) + wd * wi
                  for mi, vi, wi, t in zip(expected_m, expected_v, w0, steps)]
    expected = [(wi.norm().item(), d.norm().item()) for wi, d in zip(w0, expected_d)]
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    good = True
    # both rules; the second with a buffer too small for the first tensor (d computed twice)
    for ratio, limit in ((LambRatio((0.0, 10.0), False), SCRATCH_LIMIT), (TrustRatio(0.02, 0.0, 1e-8, lr, True), 16)):
        expected_r = [ratio(*norms) for norms in expected]
        expected_w = [wi - lr * r * d for wi, r, d in zip(w0, expected_r, expected_d)]
        w, m, v = ([x.to(dtype, copy=True) for x in xs] for xs in (w0, m0, v0))  # float64: not w0 itself
        try:
            found = AdamWBatch(w, [gi.to(dtype) for gi in g], m, v, None, steps, beta1=betas[0], beta2=betas[1],
                               eps=eps, weight_decay=wd, maximize=False, scratch_limit=limit).step(lr, ratio, Scratch())
            layer = numba.threading_layer()
        except Exception as error:  # a broken Numba install must not stop training: torch's kernels serve
            warnings.warn(f"lars_plugins: Numba's CPU loops failed to compile or run for {dtype} ({error!r}); "
                          "torch's kernels are used instead.", RuntimeWarning, stacklevel=3)
            return False
        if layer not in ("omp", "tbb"):
            warnings.warn(f"lars_plugins: Numba's threading layer here is {layer!r}, slower than torch's kernels "
                          "and not safe to call from several threads; torch's kernels are used instead. Install "
                          "Numba's OpenMP (libgomp) or TBB (`pip install tbb`) support to use the one-pass loops.",
                          RuntimeWarning, stacklevel=3)
            return False
        good = good and all(torch.allclose(a.double(), b, rtol=tol, atol=tol)
                            for a, b in zip(w + m, expected_w + expected_m))
        good = good and all(math.isclose(a, b, rel_tol=tol) for row, norms, r in zip(found, expected, expected_r)
                            for a, b in zip(row, (*norms, r)))
    if not good:
        warnings.warn(f"lars_plugins: Numba's CPU loops disagree with torch's arithmetic for {dtype}; torch's "
                      "kernels are used instead. Please report this with your Numba and LLVM versions.",
                      RuntimeWarning, stacklevel=3)
    return good


class AdamWBatch:
    """AdamW's step with a trust ratio through the compiled loops, for tensors of one dtype, in one
    call (:meth:`step`): the moments (``max_exp_avg_sqs`` too, where given: amsgrad) as torch's
    AdamW updates them, ``d = m̂/(√v̂+ε) + weight_decay·w``, the ratio ``r`` of ``‖w‖`` and ``‖d‖``,
    and ``w ← w − lr·r·d``. ``steps``: each tensor's count, already advanced
    (``bias_correction=False``: ``m̂ = m``, ``v̂ = v``, as LAMB's option says). Every tensor must pass
    :func:`takes` with its gradient and state, and :func:`available` must hold for the dtype: the
    loops read the memory by address. ``scratch_limit``: the largest tensor whose ``d`` the scratch
    buffer holds (larger ones compute it twice). ``ratio_slots``, where given: a 0-d tensor per
    tensor (or ``None``) that receives its ratio inside the call, as ``slot.fill_(r)`` would (slots
    that are not one CPU element of the tensors' dtype are filled after the call instead)."""

    def __init__(self, params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                 exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Optional[Sequence[Tensor]], steps: Sequence[float], *,
                 beta1: float, beta2: float, eps: float, weight_decay: float, maximize: bool,
                 bias_correction: bool = True, scratch_limit: int = SCRATCH_LIMIT,
                 ratio_slots: Optional[Sequence[Optional[Tensor]]] = None) -> None:
        from .lamb_rule import _corrections  # (lamb_rule imports this module)

        self.params = list(params)
        self.dtype = self.params[0].dtype if self.params else torch.float32
        scalar = _DTYPES[self.dtype]
        self._like = np.zeros(1, dtype=scalar)  # tells the loops the dtype the addresses hold
        # Each tensor's addresses (w, g, m, v, max_v, ratio slot; 0: none), one row per tensor, in
        # one pass (this runs every step); the tensors stay referenced here until the step.
        self._columns = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, ratio_slots)
        slots = ratio_slots if ratio_slots is not None else (None,) * len(self.params)
        self._late_slots: list[tuple[int, Tensor]] = []  # filled after the call (see the class)
        rows: list[int] = []
        for k, (w, g, m, v, slot) in enumerate(zip(self.params, grads, exp_avgs, exp_avg_sqs, slots)):
            if slot is not None and not (slot.dtype == self.dtype and slot.is_cpu and slot.numel() == 1):
                self._late_slots.append((k, slot))
                slot = None
            rows += (w.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(),
                     0 if max_exp_avg_sqs is None else max_exp_avg_sqs[k].data_ptr(),
                     0 if slot is None else slot.data_ptr())
        self._table = np.array(rows, dtype=np.int64).reshape(-1, 6)
        self._sizes = np.array([w.numel() for w in self.params], dtype=np.int64)
        n = len(self.params)
        corrections1, root_corrections2 = _corrections([float(t) for t in steps], n, beta1, beta2, bias_correction)
        # one scalar (bias_correction=False) or one per tensor; contiguous, as the compiled loops take them
        self._corrections1, self._root_corrections2 = (np.array(np.broadcast_to(np.asarray(c, dtype=scalar), (n,)))
                                                       for c in (corrections1, root_corrections2))
        self._constants = (scalar(1 - beta1), scalar(beta2), scalar(1 - beta2))
        self._eps, self._weight_decay, self._scalar = scalar(eps), scalar(weight_decay), scalar
        self._amsgrad, self._maximize = max_exp_avg_sqs is not None, bool(maximize)
        self._scratch_limit = scratch_limit

    @property
    def scratch_elements(self) -> int:
        """The elements the step takes from its scratch buffer: the largest tensor up to
        ``scratch_limit`` (:data:`SCRATCH_LIMIT`), and room to align its place."""
        fitting = [n for n in self._sizes.tolist() if n <= self._scratch_limit]
        return max(fitting) + 64 if fitting else 0

    def step(self, lr: float, ratio: Ratio, scratch: Scratch) -> list[tuple[float, float, float]]:
        """Step every tensor; returns ``(‖w‖, ‖d‖, r)`` of each, with ``‖w‖`` before the update (NaN
        where a tensor's values are not finite). ``scratch`` keeps the buffer for ``d`` from step to
        step (grown here where it is smaller than :attr:`scratch_elements`)."""
        loops = _loops()
        _threads()
        buffer = scratch.flat(self.dtype, self.scratch_elements).numpy()
        rule, rule_args = ratio._compiled()
        out = np.empty((len(self.params), 3), dtype=np.float64)
        loops.step_table(self._table, self._sizes, self._like, buffer,  # type: ignore[union-attr]
                         *self._constants, self._corrections1, self._root_corrections2, self._eps,
                         self._weight_decay, self._amsgrad, self._maximize, self._scratch_limit, float(lr), rule,
                         rule_args,
                         np.empty(len(self.params), dtype=self._scalar), out)
        stepped = [(w_norm, d_norm, r) for w_norm, d_norm, r in out.tolist()]
        for k, slot in self._late_slots:
            slot.fill_(stepped[k][2])
        return stepped
