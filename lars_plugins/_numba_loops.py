"""The compiled loops of :mod:`lars_plugins.cpu_kernels` (imported only there, and only when Numba is installed).

:func:`step_table` steps AdamW's moments and a trust ratio's update over a table of tensors (their
addresses, a row per tensor: ``w``, ``g``, ``m``, ``v``, ``max_v``, the ratio's slot) in one call.
Per tensor, while its memory is still in cache: one parallel loop updates the moments, writes the
direction ``d = m̂/(√v̂+ε) + wd·w`` into a scratch buffer and sums ``‖w‖²`` and ``‖d‖²`` in float64;
the ratio follows from the two norms (and goes into the slot); a second parallel loop applies
``w ← w − lr·r·d`` from the buffer. A tensor larger than the buffer has ``d`` computed again from
the stored moments instead. The table is walked serially and each tensor's loops run in parallel:
Numba's parallel loops nested in a parallel function lose their stores to arrays made from
addresses (Numba 0.68). :func:`advance_counts` adds one to step counts by address.

The ratio rules are compiled from the very Python functions the other CPU routes call
(:func:`lars_plugins.lamb_rule._host_lamb_ratio`, :func:`lars_plugins.lars_rule.host_trust_ratio`):
one definition of each. For that reason the walk is compiled in each process rather than cached on
disk (Numba's cache would not notice an edit of those modules); the loops, which depend on nothing
outside this file, are cached.

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

from .cpu_kernels import LAMB_RULE
from .lamb_rule import _host_lamb_ratio
from .lars_rule import host_trust_ratio

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


@numba.njit(inline="always")
def _direction(m, v, w, correction1, root_correction2, eps, weight_decay):
    """AdamW's direction ``m̂/(√v̂+ε) + wd·w`` of one element (inlined into both loops)."""
    return (m / correction1) / (math.sqrt(v) / root_correction2 + eps) + weight_decay * w


@_compiled(parallel=True)
def _moments_and_norms(w, g, m, v, max_v, d, keep, one_minus_beta1, beta2, one_minus_beta2, correction1,
                       root_correction2, eps, weight_decay, amsgrad, maximize):
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
        di = _direction(mi, vi, wi, correction1, root_correction2, eps, weight_decay)
        if keep:
            d[i] = di
        w_sq += float(wi) * float(wi)
        d_sq += float(di) * float(di)
    return w_sq, d_sq


@_compiled(parallel=True)
def _update_from(w, d, alpha):
    for i in numba.prange(w.shape[0]):
        w[i] = w[i] - alpha * d[i]


@_compiled(parallel=True)
def _update_from_moments(w, m, v, correction1, root_correction2, eps, weight_decay, alpha):
    for i in numba.prange(w.shape[0]):
        wi = w[i]
        w[i] = wi - alpha * _direction(m[i], v[i], wi, correction1, root_correction2, eps, weight_decay)


@_compiled(parallel=False)
def advance_counts(addresses, like):
    """Add one to each step count (a float32 0-d tensor at each address), as ``torch._foreach_add_``
    does, without its dispatch per tensor."""
    for k in range(addresses.shape[0]):
        count = numba.carray(_at(addresses[k], like), 1)
        count[0] += 1


_lamb_ratio = numba.njit(_host_lamb_ratio, nogil=True)
_trust_ratio = numba.njit(host_trust_ratio, nogil=True)


@numba.njit(nogil=True)
def _ratio(rule, args, w_norm, d_norm):
    """The rule's ratio; ``args`` as :class:`lars_plugins.cpu_kernels.LambRatio` and ``TrustRatio`` make them."""
    if rule == LAMB_RULE:
        if args[0] != 0.0:
            return _lamb_ratio(w_norm, d_norm, (args[1], args[2]), args[3] != 0.0)
        return _lamb_ratio(w_norm, d_norm, None, args[3] != 0.0)
    return _trust_ratio(w_norm, d_norm, args[0], args[1], args[2], args[3], args[4] != 0.0)


@numba.njit(nogil=True)  # not cached: see the module's docstring
def step_table(table, sizes, like, scratch, one_minus_beta1, beta2, one_minus_beta2, corrections1, root_corrections2,
               eps, weight_decay, amsgrad, maximize, scratch_limit, lr, rule, rule_args, alphas, out):
    """The step of each tensor ``k``; ``out[k] = (‖w‖, ‖d‖, r)`` (float64), ``alphas[k] = lr·r``, and
    ``r`` written into the tensor's ratio slot where its row has one."""
    # Each tensor's d sits centred on the buffer's middle: the two threads of a 2-core machine then
    # write and read the same half of it for every tensor, whatever its size. A buffer reused from
    # its start moves lines between the cores (their split point moves with the tensor's size),
    # which was several times slower in a prototype on a machine whose cores seem not to share a cache.
    middle = (scratch.shape[0] // 2) // 16 * 16
    for k in range(sizes.shape[0]):
        n = sizes[k]
        w = numba.carray(_at(table[k, 0], like), n)
        m = numba.carray(_at(table[k, 2], like), n)
        v = numba.carray(_at(table[k, 3], like), n)
        max_v = numba.carray(_at(table[k, 4], like), n if amsgrad else 0)
        start = middle - (n // 2) // 16 * 16  # a multiple of 16 elements: the view starts on a cache line
        keep = n <= scratch_limit and start >= 0 and start + n <= scratch.shape[0]
        d = scratch[start:start + n] if keep else scratch[:0]
        w_sq, d_sq = _moments_and_norms(w, numba.carray(_at(table[k, 1], like), n), m, v, max_v, d, keep,
                                        one_minus_beta1, beta2, one_minus_beta2, corrections1[k],
                                        root_corrections2[k], eps, weight_decay, amsgrad, maximize)
        w_norm, d_norm = math.sqrt(w_sq), math.sqrt(d_sq)
        ratio = _ratio(rule, rule_args, w_norm, d_norm)
        alphas[k] = lr * ratio  # in the tensors' dtype, as the loops compute
        if keep:
            _update_from(w, d, alphas[k])
        else:  # larger than the buffer: d again from the moments the first loop stored
            _update_from_moments(w, m, max_v if amsgrad else v, corrections1[k], root_corrections2[k], eps,
                                 weight_decay, alphas[k])
        if table[k, 5] != 0:  # the tensor's ratio slot (a 0-d tensor of its dtype)
            numba.carray(_at(table[k, 5], like), 1)[0] = ratio
        out[k, 0] = w_norm
        out[k, 1] = d_norm
        out[k, 2] = ratio
