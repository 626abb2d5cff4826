"""AdamW's direction, its norms and the update on the CPU in two compiled passes over a group of
tensors, with Numba (optional).

LAMB and ``Layerwise(AdamW)`` need, per tensor, the moments, ``d = m̂/(√v̂+ε) + wd·w``, ``‖w‖`` and
``‖d‖`` before they may update ``w``. torch offers these as separate passes per tensor (its fused
AdamW kernel, then dot products, then an update: :mod:`lars_plugins.cpu_directions`). Here
(:class:`AdamWBatch`) one compiled call walks all the tensors of a step: per tensor, one loop reads
``g``, ``m``, ``v`` and ``w``, writes the moments and sums ``‖w‖²`` and ``‖d‖²`` (in float64); the
caller turns the norms into ratios; a second call applies ``w ← w − a·d`` per tensor, computing
``d`` again from the stored moments, so that no buffer holds it in between and nothing of the
model's size is allocated, and the Python work per tensor is a table entry rather than a dozen
operator calls. On the 2-core test machine that took 0.1-0.2× of fused AdamW's step time off LAMB's
in most runs, not all (docs/performance.md has the times).

It is used where all of these hold, and the callers take torch's kernels otherwise:

* Numba is installed (``pip install "lars_plugins[numba]"``) and :data:`enabled` is true (the
  environment variable ``LARS_PLUGINS_NUMBA=0`` sets it false at import);
* the tensors are dense CPU tensors of float32 or float64 (Numba has no bfloat16), each with its
  gradient and moments in its own dtype and memory layout (checked per tensor: the loops read memory
  by address);
* Numba's threading layer is OpenMP or TBB: its fallback ("workqueue") was several times slower in a
  prototype and may not be called from several threads at once;
* the process is not a fork of one where the loops already ran (DataLoader workers, fork-started
  processes): OpenMP's threads do not survive ``fork``, and Numba would end the child.

The loops run on ``torch.get_num_threads()`` threads (at most Numba's own maximum). They are compiled
on first use (a few seconds, cached on disk where Numba can write) and checked once per dtype
against the rule computed by torch in float64 before the first step relies on them. Floating-point
differences from torch's kernel: the sums are reassociated (vectorised) and products may be fused
(FMA), so the results agree with torch's to rounding, not bit for bit.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import warnings
from types import ModuleType
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .tensor_lists import same_dense_layout

__all__ = ["enabled", "available", "takes", "AdamWBatch"]

enabled: bool = os.environ.get("LARS_PLUGINS_NUMBA", "1").strip().lower() not in ("0", "false", "off", "no")
"""Whether :func:`available` may say yes; set it false to take torch's kernels (benchmarks compare the two)."""

_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


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


def takes(w: Tensor, *others: Optional[Tensor]) -> bool:
    """Whether ``w`` and its gradient and state (``others``; ``None`` entries skipped) can go through
    the loops: dense CPU tensors of one dtype and memory layout (the loops read them by address)."""
    return w.device.type == "cpu" and same_dense_layout(w, w, None) and all(
        t is None or (same_dense_layout(w, t, None) and t.device.type == "cpu" and t.dtype == w.dtype
                      and t.shape == w.shape and not t.is_conj() and not t.is_neg()) for t in others)


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
    w, g, m = ([torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(3))
    v = [torch.rand(s, generator=gen, dtype=torch.float64) for s in shapes]
    betas, eps, wd, steps, alphas = (0.9, 0.99), 1e-3, 0.1, [3.0, 1.0], [0.5, 0.25]
    expected_m = [mi + (1 - betas[0]) * (gi - mi) for mi, gi in zip(m, g)]
    expected_v = [betas[1] * vi + (1 - betas[1]) * gi * gi for vi, gi in zip(v, g)]
    expected_d = [mi / (1 - betas[0] ** t) / (vi.sqrt() / math.sqrt(1 - betas[1] ** t) + eps) + wd * wi
                  for mi, vi, wi, t in zip(expected_m, expected_v, w, steps)]
    expected_w = [wi - a * d for wi, a, d in zip(w, alphas, expected_d)]
    expected_norms = [(wi.norm().item(), d.norm().item()) for wi, d in zip(w, expected_d)]
    w, g, m, v = ([x.to(dtype) for x in xs] for xs in (w, g, m, v))
    try:
        batch = AdamWBatch(w, g, m, v, None, steps, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=wd,
                           maximize=False)
        norms = batch.norms()
        batch.update(alphas)
        layer = numba.threading_layer()
    except Exception as error:  # a broken Numba install must not stop training: torch's kernels serve
        warnings.warn(f"lars_plugins: Numba's CPU loops failed to compile or run for {dtype} ({error!r}); "
                      "torch's kernels are used instead.", RuntimeWarning, stacklevel=3)
        return False
    if layer not in ("omp", "tbb"):
        warnings.warn(f"lars_plugins: Numba's threading layer here is {layer!r}, slower than torch's kernels and "
                      "not safe to call from several threads; torch's kernels are used instead. Install Numba's "
                      "OpenMP (libgomp) or TBB (`pip install tbb`) support to use the one-pass loops.",
                      RuntimeWarning, stacklevel=3)
        return False
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    good = all(torch.allclose(a.double(), b, rtol=tol, atol=tol) for a, b in zip(w + m, expected_w + expected_m))
    good = good and all(math.isclose(a, b, rel_tol=tol) for found, expected in zip(norms, expected_norms)
                        for a, b in zip(found, expected))
    if not good:
        warnings.warn(f"lars_plugins: Numba's CPU loops disagree with torch's arithmetic for {dtype}; torch's "
                      "kernels are used instead. Please report this with your Numba and LLVM versions.",
                      RuntimeWarning, stacklevel=3)
    return good


class AdamWBatch:
    """AdamW's step through the compiled loops for tensors of one dtype, in two calls: :meth:`norms`
    updates the moments (``max_exp_avg_sqs`` too, where given: amsgrad) as torch's AdamW does and
    returns ``(‖w‖, ‖d‖)`` per tensor, ``d = m̂/(√v̂+ε) + weight_decay·w``, with ``w`` unchanged;
    :meth:`update` then applies ``w ← w − alpha·d`` with one ``alpha`` per tensor. ``steps``: each
    tensor's count, already advanced (``bias_correction=False``: ``m̂ = m``, ``v̂ = v``, as LAMB's option
    says). Every tensor must pass :func:`takes` with its gradient and state, and :func:`available` must
    hold for the dtype: the loops read the memory by address."""

    def __init__(self, params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                 exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Optional[Sequence[Tensor]], steps: Sequence[float], *,
                 beta1: float, beta2: float, eps: float, weight_decay: float, maximize: bool,
                 bias_correction: bool = True) -> None:
        from .lamb_rule import _corrections  # (lamb_rule imports this module)

        self.params = list(params)
        dtype = self.params[0].dtype if self.params else torch.float32
        scalar = _DTYPES[dtype]
        self._like = np.zeros(1, dtype=scalar)  # tells the loops the dtype the addresses hold
        # Each tensor's address; the tensors stay referenced here until the update.
        self._columns = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)
        self._table = np.array([[0 if column is None else column[k].data_ptr() for column in self._columns]
                                for k in range(len(self.params))], dtype=np.int64).reshape(-1, 5)
        self._sizes = np.array([w.numel() for w in self.params], dtype=np.int64)
        n = len(self.params)
        corrections1, root_corrections2 = _corrections([float(t) for t in steps], n, beta1, beta2, bias_correction)
        # one scalar (bias_correction=False) or one per tensor; contiguous, as the compiled loops take them
        self._corrections1, self._root_corrections2 = (np.array(np.broadcast_to(np.asarray(c, dtype=scalar), (n,)))
                                                       for c in (corrections1, root_corrections2))
        self._constants = (scalar(1 - beta1), scalar(beta2), scalar(1 - beta2))
        self._eps, self._weight_decay, self._scalar = scalar(eps), scalar(weight_decay), scalar
        self._amsgrad, self._maximize = max_exp_avg_sqs is not None, bool(maximize)

    def norms(self) -> list[tuple[float, float]]:
        """The moments updated; ``(‖w‖, ‖d‖)`` of each tensor (NaN where its values are not finite)."""
        loops = _loops()
        _threads()
        out = np.empty((len(self.params), 2), dtype=np.float64)
        loops.norms_of_table(self._table, self._sizes, self._like, *self._constants,  # type: ignore[union-attr]
                             self._corrections1, self._root_corrections2, self._eps, self._weight_decay,
                             self._amsgrad, self._maximize, out)
        return [(math.sqrt(w_sq), math.sqrt(d_sq)) for w_sq, d_sq in out.tolist()]  # NaN stays NaN

    def update(self, alphas: Sequence[float]) -> None:
        """``w ← w − alphas[k]·d`` for each tensor, after :meth:`norms`."""
        loops = _loops()
        _threads()
        loops.update_table(self._table, self._sizes, self._like,  # type: ignore[union-attr]
                           self._corrections1, self._root_corrections2, self._eps, self._weight_decay,
                           np.asarray(alphas, dtype=self._scalar), self._amsgrad)

