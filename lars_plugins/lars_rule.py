"""LARS's update rule as functions over lists of tensors (no framework, no optimizer state).

Layout follows ``torch/optim/sgd.py``: :func:`lars` dispatches to ``_single_tensor_lars`` (one tensor
at a time: the CPU default), ``_multi_tensor_lars`` (``torch._foreach_*`` over a device/dtype
bucket) or the fused CUDA step (:mod:`lars_plugins.fused`). On accelerators no path reads a tensor
value on the host, so a step never forces a device synchronisation. On the CPU, where a host read
costs nothing, the single-tensor path takes each tensor's norms, ratio (a Python float) and update
back to back, the update through torch's fused SGD kernel where it can (see docs/performance.md).

For every parameter ``w`` with gradient ``g`` (``g`` negated under ``maximize``):

* adapted: ``ratio = η·‖w‖ / (‖g‖ + wd·‖w‖ + ε)`` (``min(ratio / lr, 1)`` under ``trust_clip``),
  ``d = ratio · (g + wd·w)``;
* excluded: ``d = g`` (no adaptation, no weight decay);

then torch.optim.SGD's momentum (first buffer = ``d``, dampening, Nesterov) and ``w -= lr · d``.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .tensor_lists import (BucketNormsFn, NormsFn, Scalar, axpy_, buckets, cpu_fused_sgd, foreach_axpy_, host_norm,
                           host_scalars, pick, ratio_dtype, same_dense_layout, scale_, use_fused_step)

__all__ = ["lars", "trust_ratio", "host_trust_ratio"]


def trust_ratio(
    w_norm: Tensor,
    g_norm: Tensor,
    *,
    trust_coefficient: float,
    weight_decay: float,
    eps: float,
    lr: Scalar,
    trust_clip: bool,
) -> Tensor:
    """Paper Eq. 6 on (stacked) norms: ``η·‖w‖ / (‖g‖ + wd·‖w‖ + ε)``, elementwise.

    Where the ratio is undefined or meaningless -- ``‖w‖ = 0`` (a zero-initialised tensor) or a zero
    denominator (``‖g‖ = 0`` with ``wd = ε = 0``) -- the ratio is ``η``: such a tensor takes the plain
    SGD step ``lr·η·g``. That is small (``lr·η`` is about 0.01 in the paper's settings) where the
    common fallback ``ratio = 1`` would apply the raw LARS learning rate (often 10 or more), and it
    is not zero, so a zero tensor is not frozen: after one step it has a norm and Eq. 6 takes over.
    Where a norm is NaN or inf (a NaN or inf gradient), the ratio is NaN: that layer's update is NaN
    as its gradient is, and the monitor shows NaN rather than a plausible ratio.
    """
    denominator = g_norm + weight_decay * w_norm + eps
    defined = (w_norm > 0) & (denominator > 0)
    ratio = torch.where(defined, trust_coefficient * w_norm / denominator, trust_coefficient)
    # A NaN or inf in the weights or gradients: the ratio is NaN, so that what happened is recorded
    # (the comparisons above would otherwise hand it the healthy-looking η).
    ratio = torch.where(torch.isfinite(w_norm) & torch.isfinite(g_norm), ratio, torch.nan)
    if trust_clip:
        # LARC clip mode: the adapted rate lr·ratio never exceeds lr.
        ratio = torch.clamp(ratio / lr, max=1.0)
    return ratio


def lars(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: list[Optional[Tensor]],
    trust_ratios: Sequence[Optional[Tensor]],
    *,
    excluded: Sequence[bool],
    lr: Scalar,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    trust_coefficient: float,
    eps: float,
    trust_clip: bool,
    maximize: bool,
    foreach: Optional[bool] = None,
    norms: Optional[NormsFn] = None,
    norms_out: Optional[list[Optional[tuple[Scalar, Scalar]]]] = None,
    fused: Optional[bool] = None,
) -> None:
    """One LARS step over one parameter group, in place.

    ``momentum_buffers[i]`` is ``None`` where no buffer exists yet; new buffers are written back
    into the list. ``excluded[i]`` says whether parameter ``i`` is excluded from the layer-wise rate
    (:meth:`~lars_plugins.base.LayerwiseOptimizer.is_excluded`). ``trust_ratios[i]`` is a 0-d tensor
    (:func:`ratio_dtype`) that receives the ratio used for parameter ``i`` (``None`` where excluded).
    ``fused=None`` runs CUDA buckets through the fused Triton step (:mod:`lars_plugins.fused`) where
    it applies (``foreach`` not given, Triton installed, dense float32/float16/bfloat16 tensors,
    whole tensors: ``norms`` is ``None``); ``fused=True`` insists (a ``ValueError`` where it cannot
    run, before any update), ``fused=False`` never takes it. Otherwise
    ``foreach=None`` picks the multi-tensor path for accelerator tensors and the
    single-tensor path on CPU (see docs/performance.md for the measurements behind this).
    ``norms(indices, params, grads, dtype) -> (w_norms, g_norms)`` replaces the local norms of the
    parameters at ``indices`` (sharded training: :class:`lars_plugins.distributed.ShardedNorms`).
    ``norms_out[i]``, where given, receives ``(‖w‖, ‖g‖)`` of adapted parameter ``i`` as this step
    took them (Python floats on the CPU path, 0-d tensors elsewhere): a monitor then need not take
    them again.
    """
    for g in grads:
        if g.is_sparse:
            raise RuntimeError("LARS does not support sparse gradients; use dense gradients")
    by_bucket = buckets(params)
    # Decided for every bucket before any is updated: a refused fused=True leaves the parameters as they were.
    use_fused = {key: use_fused_step("LARS", fused, foreach, norms is not None,
                                     [(params[i], grads[i], momentum_buffers[i]) for i in indices])
                 for key, indices in by_bucket.items()}
    for (device, dtype), indices in by_bucket.items():
        if use_fused[device, dtype]:
            from .fused import fused_lars

            bufs = [momentum_buffers[i] for i in indices]
            fused_taken: Optional[list] = [None] * len(indices) if norms_out is not None else None
            fused_lars([params[i] for i in indices], [grads[i] for i in indices], bufs,
                       [trust_ratios[i] for i in indices], excluded=[excluded[i] for i in indices], lr=lr,
                       momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                       trust_coefficient=trust_coefficient, eps=eps, trust_clip=trust_clip, maximize=maximize,
                       norms_out=fused_taken)
            for k, i in enumerate(indices):
                momentum_buffers[i] = bufs[k]
                if fused_taken is not None:
                    norms_out[i] = fused_taken[k]  # type: ignore[index]
            continue
        use_foreach = foreach if foreach is not None else device.type != "cpu"
        impl = _multi_tensor_lars if use_foreach else _single_tensor_lars
        for adapted in (True, False):
            idx = [i for i in indices if excluded[i] != adapted]
            if not idx:
                continue
            bufs = [momentum_buffers[i] for i in idx]
            taken: Optional[list] = [None] * len(idx) if norms_out is not None and adapted else None
            impl(
                [params[i] for i in idx],
                [grads[i] for i in idx],
                bufs,
                pick(trust_ratios, idx) if adapted else None,
                lr=lr,
                momentum=momentum,
                dampening=dampening,
                weight_decay=weight_decay,
                nesterov=nesterov,
                trust_coefficient=trust_coefficient,
                eps=eps,
                trust_clip=trust_clip,
                maximize=maximize,
                norms=None if norms is None or not adapted else functools.partial(norms, idx),
                norms_out=taken,
            )
            for i, buf in zip(idx, bufs):
                momentum_buffers[i] = buf
            if taken is not None:
                for i, pair in zip(idx, taken):
                    norms_out[i] = pair  # type: ignore[index]


def _ratios(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    trust_ratios: Sequence[Tensor],
    *,
    trust_coefficient: float,
    weight_decay: float,
    eps: float,
    lr: Scalar,
    trust_clip: bool,
    norms: Optional[BucketNormsFn] = None,
    norms_out: Optional[list] = None,
) -> tuple[Tensor, Sequence[Tensor]]:
    """Trust ratios of one bucket as a vector and as its 0-d views; copied into ``trust_ratios``
    (and the norms into ``norms_out``, where given).

    Norms are taken in at least float32 (:func:`ratio_dtype`) whatever the parameter dtype; the
    ratio arithmetic is a handful of vector ops for the whole bucket, not a handful per parameter.
    """
    dtype = ratio_dtype(params[0].dtype)
    if norms is not None:
        w_norms, g_norms = norms(params, grads, dtype)
    else:
        w_norms = torch.stack(torch._foreach_norm(list(params), 2, dtype=dtype))
        g_norms = torch.stack(torch._foreach_norm(list(grads), 2, dtype=dtype))
    if norms_out is not None:
        norms_out[:] = list(zip(w_norms.unbind(), g_norms.unbind()))
    ratios = trust_ratio(
        w_norms,
        g_norms,
        trust_coefficient=trust_coefficient,
        weight_decay=weight_decay,
        eps=eps,
        lr=lr,
        trust_clip=trust_clip,
    )
    per_tensor = ratios.unbind()
    torch._foreach_copy_(list(trust_ratios), list(per_tensor))
    return ratios, per_tensor


def _single_tensor_lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Optional[Tensor]],
    trust_ratios: Optional[list[Tensor]],
    *,
    lr: Scalar,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    trust_coefficient: float,
    eps: float,
    trust_clip: bool,
    maximize: bool,
    norms: Optional[BucketNormsFn] = None,
    norms_out: Optional[list] = None,
) -> None:
    # The direction is d = a·g + b·w with per-tensor coefficients a = ±ratio and b = ratio·wd
    # (a = ±1, no b for excluded tensors). d is never materialised: the coefficients are folded into
    # fused add_/addcmul_ calls, which saves two passes over memory per tensor.
    if host_scalars(params[0].device) and norms is None:
        _host_lars(params, grads, momentum_buffers, trust_ratios, lr=lr.item() if isinstance(lr, Tensor) else lr,
                   momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                   trust_coefficient=trust_coefficient, eps=eps, trust_clip=trust_clip, maximize=maximize,
                   norms_out=norms_out)
        return
    # Elsewhere (and while torch.compile traces) the coefficients stay 0-d tensors: no sync, no
    # graph break. Every scaled coefficient is one vector op per bucket, not one per tensor.
    n = len(params)
    sign = -1.0 if maximize else 1.0
    a_vec: Optional[Tensor] = None  # None: excluded tensors, a = ±1 and no b
    b_vec: Optional[Tensor] = None
    if trust_ratios is not None:
        ratios, _ = _ratios(params, grads, trust_ratios, trust_coefficient=trust_coefficient,
                            weight_decay=weight_decay, eps=eps, lr=lr, trust_clip=trust_clip, norms=norms,
                            norms_out=norms_out)
        a_vec = ratios * sign
        b_vec = ratios * weight_decay if weight_decay != 0 else None

    def scaled_a(scale: Scalar) -> Sequence[Scalar]:
        return [sign * scale] * n if a_vec is None else (a_vec * scale).unbind()

    def scaled_b(scale: Scalar, offset: float = 0.0) -> Sequence[Optional[Scalar]]:
        return [None] * n if b_vec is None else (offset + b_vec * scale).unbind()

    neg_lr = -lr
    a, b = scaled_a(1.0), scaled_b(1.0)
    step_a, keep = (scaled_a(neg_lr), scaled_b(neg_lr, offset=1.0)) if nesterov or momentum == 0 else (a, b)
    a_damped, b_damped = (scaled_a(1.0 - dampening), scaled_b(1.0 - dampening)) if dampening else (a, b)
    for i, (w, g) in enumerate(zip(params, grads)):
        _update_tensor_(i, w, g, momentum_buffers, a=a[i], b=b[i], a_damped=a_damped[i], b_damped=b_damped[i],
                        step_a=step_a[i], keep=keep[i], neg_lr=neg_lr, momentum=momentum, nesterov=nesterov)


def _host_lars(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Optional[Tensor]],
               trust_ratios: Optional[list[Tensor]], *, lr: float, momentum: float, dampening: float,
               weight_decay: float, nesterov: bool, trust_coefficient: float, eps: float, trust_clip: bool,
               maximize: bool, norms_out: Optional[list]) -> None:
    """The CPU path. A host read costs nothing there (there is no device to wait for): each tensor's
    norms, ratio and update run back to back, while w and g are still in cache from the norms, so
    the update reads memory no more than SGD's does. Coefficients are Python floats."""
    sign = -1.0 if maximize else 1.0
    damped = 1.0 - dampening
    for i, (w, g) in enumerate(zip(params, grads)):
        ratio, decay = 1.0, 0.0  # excluded: d = ±g
        if trust_ratios is not None:
            w_norm, g_norm = host_norm(w), host_norm(g)
            if norms_out is not None:
                norms_out[i] = (w_norm, g_norm)
            ratio = host_trust_ratio(w_norm, g_norm, trust_coefficient=trust_coefficient,
                                      weight_decay=weight_decay, eps=eps, lr=lr, trust_clip=trust_clip)
            trust_ratios[i].fill_(ratio)
            decay = weight_decay
        buf = momentum_buffers[i]
        if not nesterov and (momentum == 0 or buf is not None) and cpu_fused_sgd(w.dtype) \
                and same_dense_layout(w, g, buf):
            # torch's fused SGD kernel (one pass over w, g and buf) computes d' = ±g + decay·w and
            # buf = m·buf + (1 - dampening')·d', w -= lr'·(buf or d'). With dampening' =
            # 1 - (1 - dampening)·ratio, or lr' = lr·ratio without momentum, that is LARS exactly.
            torch._fused_sgd_([w], [g], [buf] if momentum != 0 and buf is not None else [], weight_decay=decay,
                              momentum=momentum, lr=lr if momentum != 0 else lr * ratio,
                              dampening=1.0 - damped * ratio, nesterov=False, maximize=maximize,
                              is_first_step=False)
            continue
        a, b = sign * ratio, (ratio * decay if decay != 0 else None)
        _update_tensor_(i, w, g, momentum_buffers, a=a, b=b, a_damped=a * damped,
                        b_damped=None if b is None else b * damped, step_a=-lr * a,
                        keep=None if b is None else 1.0 - lr * b, neg_lr=-lr, momentum=momentum,
                        nesterov=nesterov)


def _update_tensor_(i: int, w: Tensor, g: Tensor, momentum_buffers: list[Optional[Tensor]], *, a: Scalar,
                    b: Optional[Scalar], a_damped: Scalar, b_damped: Optional[Scalar], step_a: Scalar,
                    keep: Optional[Scalar], neg_lr: Scalar, momentum: float, nesterov: bool) -> None:
    """Tensor i's update with d = a·g + b·w: torch.optim.SGD's momentum (first buffer = d, damped
    ``a_damped``/``b_damped`` later, Nesterov) and ``w -= lr·d``. ``step_a = -lr·a`` and
    ``keep = 1 - lr·b`` serve Nesterov and momentum 0."""
    if momentum == 0:
        # w -= lr·(a·g + b·w): shrink w by (1 - lr·b) first, then add the rest.
        scale_(w, keep)
        axpy_(w, g, step_a)
        return
    buf = momentum_buffers[i]
    if buf is None:
        # torch.optim.SGD convention: the first buffer is d itself, undamped. Clone, then scale only
        # by a factor other than 1: torch.compile (inductor) folds g·1.0, even clone(g)·1.0, into an
        # alias of p.grad, and the buffer would then follow the grad.
        buf = torch.clone(g)
        scale_(buf, a)
        axpy_(buf, w, b)
        momentum_buffers[i] = buf
    else:
        buf.mul_(momentum)
        axpy_(buf, g, a_damped)
        axpy_(buf, w, b_damped)
    if nesterov:
        # w -= lr·(a·g + b·w + m·buf)
        scale_(w, keep)
        axpy_(w, g, step_a)
        axpy_(w, buf, neg_lr * momentum)
    else:
        axpy_(w, buf, neg_lr)


def host_trust_ratio(w_norm: float, g_norm: float, trust_coefficient: float, weight_decay: float, eps: float,
                     lr: float, trust_clip: bool) -> float:
    """:func:`trust_ratio` for one layer's norms as Python floats (the CPU path): the same rule,
    the same fallbacks. (Numba compiles this very function for its CPU loops,
    :mod:`lars_plugins._numba_loops`: hence positional parameters, which Numba binds, and nothing
    beyond ``math``.)"""
    if not (math.isfinite(w_norm) and math.isfinite(g_norm)):
        ratio = math.nan
    else:
        denominator = g_norm + weight_decay * w_norm + eps
        ratio = trust_coefficient * w_norm / denominator if w_norm > 0 and denominator > 0 else trust_coefficient
    if not trust_clip or math.isnan(ratio):
        return ratio
    return min(ratio / lr, 1.0) if lr > 0 else 1.0  # ratio/0 is inf, clipped to 1, as in trust_ratio


def _multi_tensor_lars(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Optional[Tensor]],
    trust_ratios: Optional[list[Tensor]],
    *,
    lr: Scalar,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    trust_coefficient: float,
    eps: float,
    trust_clip: bool,
    maximize: bool,
    norms: Optional[BucketNormsFn] = None,
    norms_out: Optional[list] = None,
) -> None:
    # d = r·u with u = ±g + wd·w. u is built with fast foreach ops (Python scalars); the per-tensor
    # ratio r, a list of 0-d device tensors, forces foreach onto its per-tensor fallback (one kernel
    # per tensor), so it is applied exactly once per step, fused into the op that consumes d:
    # buf += (1-dampening)·r·u, or w -= lr·r·u. Excluded tensors (r = 1) take only fast ops.
    u = list(torch._foreach_neg(grads)) if maximize else list(grads)  # list(grads): never written to
    r: Optional[Sequence[Tensor]] = None
    if trust_ratios is not None:
        ratios, r = _ratios(
            params,
            grads,
            trust_ratios,
            trust_coefficient=trust_coefficient,
            weight_decay=weight_decay,
            eps=eps,
            lr=lr,
            trust_clip=trust_clip,
            norms=norms,
            norms_out=norms_out,
        )
        if weight_decay != 0:
            if maximize:
                torch._foreach_add_(u, params, alpha=weight_decay)
            else:
                u = list(torch._foreach_add(grads, params, alpha=weight_decay))

    def scaled(scale: Scalar) -> Optional[Sequence[Tensor]]:
        if r is None or (isinstance(scale, float) and scale == 1.0):
            return r
        return (ratios * scale).unbind()

    if momentum == 0:
        # w -= lr·r·u
        foreach_axpy_(params, u, scaled(-lr), -lr)
        return
    old = [i for i, buf in enumerate(momentum_buffers) if buf is not None]
    if old:
        old_bufs = pick(momentum_buffers, old)
        damped = scaled(1.0 - dampening)
        torch._foreach_mul_(old_bufs, momentum)
        foreach_axpy_(old_bufs, [u[i] for i in old], None if damped is None else [damped[i] for i in old],
                       1.0 - dampening)
    for i, buf in enumerate(momentum_buffers):
        if buf is None:
            # torch.optim.SGD convention: the first buffer is d itself, undamped (once per tensor).
            momentum_buffers[i] = torch.mul(u[i], r[i]) if r is not None else u[i].detach().clone()
    bufs = [buf for buf in momentum_buffers if buf is not None]
    if nesterov:
        # w -= lr·(r·u + m·buf)
        foreach_axpy_(params, u, scaled(-lr), -lr)
        foreach_axpy_(params, bufs, None, -lr * momentum)
    else:
        foreach_axpy_(params, bufs, None, -lr)
