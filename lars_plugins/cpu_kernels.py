"""AdamW's direction and its norms in one pass over memory on the CPU, compiled with Numba (optional).

LAMB and ``Layerwise(AdamW)`` need, per tensor, the moments, ``d = m̂/(√v̂+ε) + wd·w``, ``‖w‖`` and
``‖d‖`` before they may update ``w``. torch offers these as separate passes (its fused AdamW kernel,
then dot products: :mod:`lars_plugins.cpu_directions`); here one compiled loop reads ``g``, ``m``,
``v`` and ``w`` once, writes the moments and ``−d`` into a scratch buffer and sums both squares
(in float64), and a second loop applies ``w ← w − a·d``. On the 2-core test machine this took
0.03-0.18× of ``AdamW(fused=True)``'s step time off LAMB's step in most runs, not all
(docs/performance.md); above fused AdamW remain the second pass over ``w`` and the per-tensor
bookkeeping around the loops (``benchmarks/lamb_cpu_routes.py`` times the loops without it).

It is used where all of these hold, and the callers take torch's kernels otherwise:

* Numba is installed (``pip install "lars_plugins[numba]"``) and :data:`enabled` is true (the
  environment variable ``LARS_PLUGINS_NUMBA=0`` sets it false at import);
* the dtype is float32 or float64 (Numba has no bfloat16);
* Numba's threading layer is OpenMP or TBB: its fallback ("workqueue") was several times slower
  in a prototype and may not be called from several threads at once;
* the process is not a fork of one where the loops already ran (DataLoader workers, fork-started
  processes): OpenMP's threads do not survive ``fork``, and Numba would end the child.

The loops run on ``torch.get_num_threads()`` threads (at most Numba's own maximum). They are compiled
on first use (about 2 s per dtype, cached on disk where Numba can write) and checked once against
the same arithmetic in torch before the first step relies on them. Floating-point differences from
torch's kernel: the sums are reassociated (vectorised) and products may be fused (FMA), so ``d``
and the norms agree with torch's to rounding, not bit for bit.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["enabled", "available", "adamw_direction", "OnePassDirection"]

enabled: bool = os.environ.get("LARS_PLUGINS_NUMBA", "1").strip().lower() not in ("0", "false", "off", "no")
"""Whether :func:`available` may say yes; set it false to take torch's kernels (benchmarks compare the two)."""

_DTYPES = (torch.float32, torch.float64)


@functools.lru_cache(maxsize=None)
def _kernels() -> Optional[tuple[Any, Any]]:
    """The two compiled loops, or ``None`` where Numba is not installed."""
    try:
        import numba
    except ImportError:
        return None

    def compiled(loop: Any) -> Any:
        # reassoc: the sums vectorise; contract: multiply-adds fuse. Not the rest of fastmath: NaN and inf
        # must propagate as IEEE says (a non-finite gradient must show in the norms), and divisions stay exact.
        fastmath = {"reassoc", "contract"}
        try:
            return numba.njit(loop, cache=True, parallel=True, fastmath=fastmath)
        except RuntimeError:  # no writable place for Numba's cache: compiled in every process instead
            return numba.njit(loop, parallel=True, fastmath=fastmath)

    def direction(w, g, m, v, max_v, s, one_minus_beta1, beta2, one_minus_beta2, correction1, root_correction2, eps,
                  weight_decay, amsgrad, maximize):  # pragma: no cover - compiled
        w_sq = 0.0
        d_sq = 0.0
        for i in numba.prange(w.shape[0]):
            gi = -g[i] if maximize else g[i]
            mi = m[i] + one_minus_beta1 * (gi - m[i])
            vi = beta2 * v[i] + one_minus_beta2 * gi * gi
            m[i] = mi
            v[i] = vi
            if amsgrad:
                mv = max_v[i]
                if vi > mv or vi != vi:  # NaN propagates, as in torch.maximum
                    mv = vi
                max_v[i] = mv
                vi = mv
            wi = w[i]
            di = (mi / correction1) / (math.sqrt(vi) / root_correction2 + eps) + weight_decay * wi
            s[i] = -di
            w_sq += float(wi) * float(wi)
            d_sq += float(di) * float(di)
        return w_sq, d_sq

    def add_scaled(w, s, alpha):  # pragma: no cover - compiled
        for i in numba.prange(w.shape[0]):
            w[i] += alpha * s[i]

    return compiled(direction), compiled(add_scaled)


def _numpy(t: Tensor) -> Any:
    """A dense tensor's elements in memory order as a 1-d NumPy array sharing its memory."""
    if t.requires_grad:
        t = t.detach()
    return (t.view(-1) if t.is_contiguous() else t.as_strided((t.numel(),), (1,))).numpy()


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


@functools.lru_cache(maxsize=None)
def _checked(dtype: torch.dtype) -> bool:
    """Compile for ``dtype``, check the threading layer and the arithmetic once (against torch's
    eager ops in float64 on a small example); warn and say no where either fails."""
    global _started_in
    try:
        kernels = _kernels()
    except Exception as error:  # a broken Numba install must not stop training: torch's kernels serve
        warnings.warn(f"lars_plugins: Numba's CPU loops failed to compile ({error!r}); torch's kernels are used "
                      "instead.", RuntimeWarning, stacklevel=3)
        return False
    if kernels is None:
        return False
    import numba

    _started_in = os.getpid()
    gen = torch.Generator().manual_seed(0)
    w, g, m = (torch.randn(64, generator=gen, dtype=torch.float64) for _ in range(3))
    v = torch.rand(64, generator=gen, dtype=torch.float64)
    betas, eps, wd, step = (0.9, 0.99), 1e-3, 0.1, 3
    expected_m = m + (1 - betas[0]) * (g - m)
    expected_v = betas[1] * v + (1 - betas[1]) * g * g
    expected_d = expected_m / (1 - betas[0] ** step) / (expected_v.sqrt() / math.sqrt(1 - betas[1] ** step) + eps) \
        + wd * w
    s = torch.full_like(w, float("nan"), dtype=dtype)
    w, g, m, v = (x.to(dtype) for x in (w, g, m, v))
    w_before = w.double().clone()  # (a float64 w would be itself)
    try:
        found = adamw_direction(w, g, m, v, None, s, step, beta1=betas[0], beta2=betas[1], eps=eps,
                                weight_decay=wd, maximize=False)
        found.apply(0.5)
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
    good = (torch.allclose(-s.double(), expected_d, rtol=tol, atol=0)
            and torch.allclose(m.double(), expected_m, rtol=tol)
            and torch.allclose(w.double(), w_before - 0.5 * expected_d, rtol=tol, atol=tol)
            and math.isclose(found.w_norm, w_before.norm().item(), rel_tol=tol)
            and math.isclose(found.d_norm, expected_d.norm().item(), rel_tol=tol))
    if not good:
        warnings.warn(f"lars_plugins: Numba's CPU loops disagree with torch's arithmetic for {dtype}; torch's "
                      "kernels are used instead. Please report this with your Numba and LLVM versions.",
                      RuntimeWarning, stacklevel=3)
    return good


@functools.lru_cache(maxsize=64)
def _constants(scalar: Any, beta1: float, beta2: float, eps: float, weight_decay: float, step: float) -> tuple:
    """The loop's constants in the tensors' dtype (``scalar``: NumPy's type), as torch's kernel
    computes in float32 for float32 tensors; the same for every tensor of a step, so made once."""
    return (scalar(1 - beta1), scalar(beta2), scalar(1 - beta2), scalar(1 - beta1 ** step),
            scalar(math.sqrt(1 - beta2 ** step)), scalar(eps), scalar(weight_decay))


@dataclass
class OnePassDirection:
    """What :func:`adamw_direction` found: ``‖w‖``, ``‖d‖``, and ``w`` and ``s = −d`` as arrays for :meth:`apply`."""

    w_norm: float
    d_norm: float
    w: Any
    s: Any

    def apply(self, alpha: float) -> None:
        """``w ← w − alpha·d`` in one compiled loop."""
        _threads()
        _kernels()[1](self.w, self.s, self.w.dtype.type(alpha))  # type: ignore[index]


def adamw_direction(w: Tensor, g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, max_exp_avg_sq: Optional[Tensor],
                    s: Tensor, step: float, *, beta1: float, beta2: float, eps: float, weight_decay: float,
                    maximize: bool) -> OnePassDirection:
    """Update the moments (``max_exp_avg_sq`` too, where given: amsgrad) as torch's AdamW does at step
    ``step`` (already counted) and write ``−d`` into ``s``; ``w`` is not changed until the result is
    applied. Every tensor dense with ``w``'s strides and dtype (float32 or float64), ``s`` not
    aliasing the others."""
    direction, _ = _kernels()  # type: ignore[misc]
    _threads()
    w_array, s_array, v_array = _numpy(w), _numpy(s), _numpy(exp_avg_sq)
    max_v = _numpy(max_exp_avg_sq) if max_exp_avg_sq is not None else v_array[:0]
    w_sq, d_sq = direction(w_array, _numpy(g), _numpy(exp_avg), v_array, max_v, s_array,
                           *_constants(w_array.dtype.type, beta1, beta2, eps, weight_decay, step),
                           max_exp_avg_sq is not None, bool(maximize))
    return OnePassDirection(math.sqrt(w_sq), math.sqrt(d_sq), w_array, s_array)  # NaN stays NaN
