"""The compiled loops of :mod:`lars_plugins.cpu_kernels` (imported only there, and only when Numba is installed).

Two steps over a table of tensors (their addresses, a row per tensor: ``w``, ``g``, ``m``, ``v``,
``max_v``): :func:`norms_of_table` updates the moments and sums ``‖w‖²`` and ``‖d‖²`` of each tensor's
direction ``d = m̂/(√v̂+ε) + wd·w``; :func:`update_table` applies ``w ← w − alpha·d``, computing ``d``
again from the moments the first step stored (no buffer holds it in between). The table is walked
serially and each tensor's loop runs in parallel: Numba's parallel loops nested in a parallel
function lose their stores to arrays made from addresses (Numba 0.68).

Compiled with ``reassoc`` (the sums vectorise) and ``contract`` (multiply-adds fuse) only, not the
rest of fastmath: NaN and inf propagate as IEEE says, divisions and square roots stay exact.
"""

# mypy: ignore-errors
# (Numba's decorators and intrinsics are typed for Numba, not for mypy; cpu_kernels is the typed face.)

from __future__ import annotations

import math

import numba
from numba import types
from numba.extending import intrinsic

_FASTMATH = {"reassoc", "contract"}


def _compiled(parallel: bool):
    # nogil: the loops touch no Python object, so other Python threads (data loading, logging) run
    # meanwhile; Numba's parallel loops let go of the GIL anyway, this covers the serial walk too
    def compile_(loop):
        try:
            return numba.njit(loop, cache=True, parallel=parallel, fastmath=_FASTMATH, nogil=True)
        except RuntimeError:  # no writable place for Numba's cache: compiled in every process instead
            return numba.njit(loop, parallel=parallel, fastmath=_FASTMATH, nogil=True)
    return compile_


@intrinsic
def _at(typingctx, address, like):
    """A pointer to ``like``'s dtype at an integer address (a tensor's ``data_ptr()``)."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))
    return types.CPointer(like.dtype)(address, like), codegen


@_compiled(parallel=True)
def _moments_and_norms(w, g, m, v, max_v, one_minus_beta1, beta2, one_minus_beta2, correction1, root_correction2,
                       eps, weight_decay, amsgrad, maximize):
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
        w_sq += float(wi) * float(wi)
        d_sq += float(di) * float(di)
    return w_sq, d_sq


@_compiled(parallel=True)
def _update(w, m, v, correction1, root_correction2, eps, weight_decay, alpha):
    for i in numba.prange(w.shape[0]):
        wi = w[i]
        di = (m[i] / correction1) / (math.sqrt(v[i]) / root_correction2 + eps) + weight_decay * wi
        w[i] = wi - alpha * di


@_compiled(parallel=False)
def norms_of_table(table, sizes, like, one_minus_beta1, beta2, one_minus_beta2, corrections1, root_corrections2, eps,
                   weight_decay, amsgrad, maximize, out):
    """Moments updated; ``out[k] = (‖w‖², ‖d‖²)`` of tensor ``k`` (float64)."""
    for k in range(sizes.shape[0]):
        n = sizes[k]
        out[k, 0], out[k, 1] = _moments_and_norms(
            numba.carray(_at(table[k, 0], like), n), numba.carray(_at(table[k, 1], like), n),
            numba.carray(_at(table[k, 2], like), n), numba.carray(_at(table[k, 3], like), n),
            numba.carray(_at(table[k, 4], like), n if amsgrad else 0), one_minus_beta1, beta2, one_minus_beta2,
            corrections1[k], root_corrections2[k], eps, weight_decay, amsgrad, maximize)


@_compiled(parallel=False)
def update_table(table, sizes, like, corrections1, root_corrections2, eps, weight_decay, alphas, amsgrad):
    """``w ← w − alphas[k]·d`` for each tensor ``k``, ``d`` from the moments :func:`norms_of_table` left."""
    for k in range(sizes.shape[0]):
        n = sizes[k]
        _update(numba.carray(_at(table[k, 0], like), n), numba.carray(_at(table[k, 2], like), n),
                numba.carray(_at(table[k, 4 if amsgrad else 3], like), n), corrections1[k], root_corrections2[k], eps,
                weight_decay, alphas[k])
