"""The LARS update as plain functions over lists of tensors (no framework, no optimizer state).

Layout follows ``torch/optim/sgd.py``: :func:`lars` dispatches to ``_single_tensor_lars`` (one tensor
at a time: the CPU default) or ``_multi_tensor_lars`` (``torch._foreach_*`` over a device/dtype
bucket: fewest kernel launches on accelerators). On accelerators neither path reads a tensor value
on the host, so a step never forces a device synchronisation. On the CPU, where a host read costs
nothing, the single-tensor path takes each tensor's norms, ratio (a Python float) and update back to
back, the update through torch's fused SGD kernel where it can (see docs/performance.md).

For every parameter ``w`` with gradient ``g`` (``g`` negated under ``maximize``):

* adapted: ``ratio = η·‖w‖ / (‖g‖ + wd·‖w‖ + ε)`` (``min(ratio / lr, 1)`` under ``trust_clip``),
  ``d = ratio · (g + wd·w)``;
* excluded: ``d = g`` (no adaptation, no weight decay);

then torch.optim.SGD's momentum (first buffer = ``d``, dampening, Nesterov) and ``w -= lr · d``.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from typing import Callable, Hashable, Iterable, Optional, Sequence, TypeVar, Union, cast

import torch
from torch import Tensor

__all__ = ["lars", "trust_ratio", "lamb", "lamb_trust_ratio", "ratio_dtype"]

Scalar = Union[float, Tensor]
K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
# (params, grads, dtype) -> (weight norms, grad norms), for one bucket; NormsFn also takes the bucket's indices.
BucketNormsFn = Callable[[Sequence[Tensor], Sequence[Tensor], torch.dtype], tuple[Tensor, Tensor]]
NormsFn = Callable[[Sequence[int], Sequence[Tensor], Sequence[Tensor], torch.dtype], tuple[Tensor, Tensor]]


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
    buckets = _buckets(params)
    # Decided for every bucket before any is updated: a refused fused=True leaves the parameters as they were.
    use_fused = {key: use_fused_step("LARS", fused, foreach, norms is not None,
                                     [(params[i], grads[i], momentum_buffers[i]) for i in indices])
                 for key, indices in buckets.items()}
    for (device, dtype), indices in buckets.items():
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


def use_fused_step(owner: str, fused: Optional[bool], foreach: Optional[bool], sharded: bool,
                   tensors: Sequence[Sequence[Optional[Tensor]]]) -> bool:
    """Whether one device/dtype bucket takes the fused step. ``tensors`` holds, per parameter, the
    parameter, its gradient and its state; ``fused=True`` where the fused step cannot run is a
    ``ValueError`` saying why and what to do."""
    if fused is False or (fused is None and foreach is not None) or not tensors:
        return False
    device = tensors[0][0].device  # type: ignore[union-attr]
    if fused is None and device.type != "cuda":
        return False
    if torch.compiler.is_compiling():
        reason: Optional[str] = "under torch.compile the multi-tensor step is traced instead (inductor fuses it)"
    elif sharded:
        reason = "the parameters are sharded (DTensor, FSDP1 or ZeRO pieces), whose norms need a collective"
    else:
        from .fused import unsupported

        reason = unsupported(tensors)
    if reason is None:
        return True
    if fused:
        raise ValueError(f"{owner}(fused=True) cannot run its fused step here: {reason}. Pass fused=None to let "
                         f"{owner} take the fastest path available")
    return False


def ratio_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of norms and trust ratios: float32 for half/bfloat16 parameters, else their own
    (the real counterpart of a complex dtype: a norm is real)."""
    return torch.promote_types(param_dtype.to_real() if param_dtype.is_complex else param_dtype, torch.float32)


def _indices_by(keys: Iterable[K]) -> dict[K, list[int]]:
    """Positions grouped by key, in first-seen order."""
    groups: dict[K, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key].append(i)
    return groups


def pick(items: Sequence[Optional[T]], indices: Iterable[int]) -> list[T]:
    """``items[j]`` for each ``j`` in ``indices``, which the caller chose among the present ones
    (the slots of adapted parameters, the views of pieces this rank holds)."""
    return [cast(T, items[j]) for j in indices]


def _buckets(tensors: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), the unit of a foreach kernel (and of
    torch's ``_group_tensors_by_device_and_dtype``): the one grouping every step and the monitor use."""
    return _indices_by((t.device, t.dtype) for t in tensors)


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
    if _host_scalars(params[0].device) and norms is None:
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
            w_norm, g_norm = _host_norm(w), _host_norm(g)
            if norms_out is not None:
                norms_out[i] = (w_norm, g_norm)
            ratio = _host_trust_ratio(w_norm, g_norm, trust_coefficient=trust_coefficient,
                                      weight_decay=weight_decay, eps=eps, lr=lr, trust_clip=trust_clip)
            trust_ratios[i].fill_(ratio)
            decay = weight_decay
        buf = momentum_buffers[i]
        if not nesterov and (momentum == 0 or buf is not None) and _cpu_fused_sgd(w.dtype) \
                and _same_dense_layout(w, g, buf):
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
        _scale_(w, keep)
        _axpy_(w, g, step_a)
        return
    buf = momentum_buffers[i]
    if buf is None:
        # torch.optim.SGD convention: the first buffer is d itself, undamped. Clone, then scale only
        # by a factor other than 1: torch.compile (inductor) folds g·1.0, even clone(g)·1.0, into an
        # alias of p.grad, and the buffer would then follow the grad.
        buf = torch.clone(g)
        _scale_(buf, a)
        _axpy_(buf, w, b)
        momentum_buffers[i] = buf
    else:
        buf.mul_(momentum)
        _axpy_(buf, g, a_damped)
        _axpy_(buf, w, b_damped)
    if nesterov:
        # w -= lr·(a·g + b·w + m·buf)
        _scale_(w, keep)
        _axpy_(w, g, step_a)
        _axpy_(w, buf, neg_lr * momentum)
    else:
        _axpy_(w, buf, neg_lr)


def _host_trust_ratio(w_norm: float, g_norm: float, *, trust_coefficient: float, weight_decay: float, eps: float,
                      lr: float, trust_clip: bool) -> float:
    """:func:`trust_ratio` for one layer's norms as Python floats (the CPU path): the same rule,
    the same fallbacks."""
    if not (math.isfinite(w_norm) and math.isfinite(g_norm)):
        ratio = math.nan
    else:
        denominator = g_norm + weight_decay * w_norm + eps
        ratio = trust_coefficient * w_norm / denominator if w_norm > 0 and denominator > 0 else trust_coefficient
    if not trust_clip or math.isnan(ratio):
        return ratio
    return min(ratio / lr, 1.0) if lr > 0 else 1.0  # ratio/0 is inf, clipped to 1, as in trust_ratio


def _host_norm(t: Tensor) -> float:
    """‖t‖ as a Python float, in at least float32. BLAS's dot is both faster than vector_norm on the
    CPU (it reads memory at the speed of a sum) and, with its blocked accumulation, more accurate
    for large float32 tensors."""
    if t.dtype in (torch.float32, torch.float64) and t.is_contiguous():
        flat = t.view(-1)
        return math.sqrt(torch.dot(flat, flat).item())
    return torch.linalg.vector_norm(t, dtype=ratio_dtype(t.dtype)).item()


def _same_dense_layout(w: Tensor, g: Tensor, buf: Optional[Tensor]) -> bool:
    """Whether the fused kernel, which walks the three tensors' memory in step, sees matching elements."""
    dense = w.is_contiguous() or w.is_contiguous(memory_format=torch.channels_last)
    return dense and g.stride() == w.stride() and (buf is None or buf.stride() == w.stride())


@functools.lru_cache(maxsize=None)
def _cpu_fused_sgd(dtype: torch.dtype) -> bool:
    """Whether this torch has the fused SGD kernel for CPU tensors of ``dtype`` (probed once)."""
    if dtype not in (torch.float32, torch.float64):
        return False
    try:
        w, g, buf = torch.ones(2, dtype=dtype), torch.ones(2, dtype=dtype), torch.zeros(2, dtype=dtype)
        torch._fused_sgd_([w], [g], [buf], weight_decay=0.0, momentum=0.5, lr=1.0, dampening=0.0, nesterov=False,
                          maximize=False, is_first_step=False)
    except (AttributeError, RuntimeError, TypeError, NotImplementedError):
        return False
    return bool(torch.equal(w, torch.zeros(2, dtype=dtype)) and torch.equal(buf, torch.ones(2, dtype=dtype)))


def _host_scalars(device: torch.device) -> bool:
    """Whether a step may read its norms on the host: on the CPU (free there), not while compiling."""
    return device.type == "cpu" and not torch.compiler.is_compiling()


def _axpy_(y: Tensor, x: Tensor, alpha: Optional[Scalar]) -> None:
    """``y += alpha·x`` for a Python or 0-d tensor ``alpha`` (``None`` means 0), without host sync."""
    if alpha is None:
        return
    if isinstance(alpha, Tensor):
        y.addcmul_(x, alpha)
    else:
        y.add_(x, alpha=alpha)


def _scale_(y: Tensor, factor: Optional[Scalar]) -> None:
    """``y *= factor`` (``None`` means 1); a Python 1 is skipped, never multiplied."""
    if factor is not None and not (isinstance(factor, (int, float)) and factor == 1):
        y.mul_(factor)


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
        _foreach_axpy_(params, u, scaled(-lr), -lr)
        return
    old = [i for i, buf in enumerate(momentum_buffers) if buf is not None]
    if old:
        old_bufs = pick(momentum_buffers, old)
        damped = scaled(1.0 - dampening)
        torch._foreach_mul_(old_bufs, momentum)
        _foreach_axpy_(old_bufs, [u[i] for i in old], None if damped is None else [damped[i] for i in old],
                       1.0 - dampening)
    for i, buf in enumerate(momentum_buffers):
        if buf is None:
            # torch.optim.SGD convention: the first buffer is d itself, undamped (once per tensor).
            momentum_buffers[i] = torch.mul(u[i], r[i]) if r is not None else u[i].detach().clone()
    bufs = [buf for buf in momentum_buffers if buf is not None]
    if nesterov:
        # w -= lr·(r·u + m·buf)
        _foreach_axpy_(params, u, scaled(-lr), -lr)
        _foreach_axpy_(params, bufs, None, -lr * momentum)
    else:
        _foreach_axpy_(params, bufs, None, -lr)


def _foreach_axpy_(ys: list[Tensor], xs: list[Tensor], alphas: Optional[Sequence[Tensor]], alpha: Scalar) -> None:
    """``y += a·x`` for each pair: ``a`` from ``alphas`` (0-d tensors, one per pair) or else ``alpha``.

    Without a host read: tensor factors go through ``addcmul_`` or a device-scalar multiply, never
    through ``alpha=`` (which would read them on the host).
    """
    if alphas is not None:
        torch._foreach_addcmul_(ys, xs, list(alphas))
    elif isinstance(alpha, Tensor):
        torch._foreach_add_(ys, torch._foreach_mul(xs, alpha.to(ys[0].device)))
    else:
        torch._foreach_add_(ys, xs, alpha=alpha)


# --- LAMB ------------------------------------------------------------------------------------------

def lamb_trust_ratio(
    w_norm: Tensor,
    u_norm: Tensor,
    *,
    weight_norm_bounds: Optional[tuple[float, float]] = None,
    trust_clip: bool = False,
) -> Tensor:
    """LAMB's ratio (You et al. 2019, Algorithm 2) on (stacked) norms: ``φ(‖w‖) / ‖u‖``, elementwise.

    ``φ`` is the identity, or ``min(max(‖w‖, low), high)`` with ``weight_norm_bounds=(low, high)``.
    Where ``‖w‖ = 0`` (a zero-initialised tensor) or ``‖u‖ = 0`` the ratio is 1: the tensor takes the
    plain AdamW step ``lr·u``, an already normalised step of about ``lr`` per element -- LAMB's
    counterpart of LARS's ``η`` fallback, small and never frozen. A NaN or inf norm gives NaN, as in
    :func:`trust_ratio`. ``trust_clip`` caps the ratio at 1 (timm's ``lambc``).
    """
    phi = w_norm if weight_norm_bounds is None else w_norm.clamp(min=weight_norm_bounds[0], max=weight_norm_bounds[1])
    defined = (w_norm > 0) & (u_norm > 0)
    ratio = torch.where(defined, phi / torch.where(defined, u_norm, 1.0), 1.0)
    ratio = torch.where(torch.isfinite(w_norm) & torch.isfinite(u_norm), ratio, torch.nan)
    if trust_clip:
        ratio = torch.clamp(ratio, max=1.0)
    return ratio


def lamb(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    trust_ratios: Sequence[Optional[Tensor]],
    *,
    excluded: Sequence[bool],
    step: Union[Scalar, Sequence[Scalar]],
    lr: Scalar,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool = True,
    weight_norm_bounds: Optional[tuple[float, float]] = None,
    trust_clip: bool = False,
    maximize: bool = False,
    foreach: Optional[bool] = None,
    norms: Optional[NormsFn] = None,
    weight_norms_out: Optional[list[Optional[Scalar]]] = None,
) -> None:
    """One LAMB step over one parameter group, in place (Algorithm 2 of You et al. 2019).

    For every parameter ``w`` with gradient ``g`` (negated under ``maximize``), at step ``t`` (counting
    from 1): ``step`` is every parameter's count, or a sequence of one count per parameter (parameters
    of one group may have taken different numbers of steps); each a Python number or a 0-d tensor, so
    no host read is needed:

    * ``m = β1·m + (1-β1)·g``, ``v = β2·v + (1-β2)·g²``; with ``bias_correction``
      ``m̂ = m / (1-β1^t)``, ``v̂ = v / (1-β2^t)``;
    * adapted: ``u = m̂ / (√v̂ + ε) + wd·w``, ``w -= lr · ratio · u`` with :func:`lamb_trust_ratio`;
    * excluded: ``u = m̂ / (√v̂ + ε)`` (no weight decay, no ratio): the AdamW step without decay.

    ``excluded[i]`` says whether parameter ``i`` is excluded; ``trust_ratios[i]`` receives the ratio
    of parameter ``i`` (``None`` where excluded).
    ``norms(indices, params, directions, dtype) -> (w_norms, u_norms)`` replaces the local norms
    (sharded training: :class:`lars_plugins.distributed.ShardedNorms`, the same as for LARS).
    ``weight_norms_out[i]``, where given, receives ``‖w‖`` of adapted parameter ``i`` as the step took
    it (for a monitor). Neither path reads a tensor value on the host.
    """
    for g in grads:
        if g.is_sparse:
            raise RuntimeError("LAMB does not support sparse gradients; use dense gradients")
    steps = [step] * len(params) if isinstance(step, (int, float, Tensor)) else list(step)
    for (device, _), indices in _buckets(params).items():
        use_foreach = foreach if foreach is not None else device.type != "cpu"
        for adapted in (True, False):
            idx = [i for i in indices if excluded[i] != adapted]
            if not idx:
                continue
            bucket = [params[i] for i in idx]
            if not use_foreach and norms is None and _host_scalars(device):
                taken = _host_lamb([(bucket[k], grads[i], exp_avgs[i], exp_avg_sqs[i],
                                     trust_ratios[i] if adapted else None, steps[i]) for k, i in enumerate(idx)],
                                   lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                   weight_decay=weight_decay if adapted else 0.0, bias_correction=bias_correction,
                                   weight_norm_bounds=weight_norm_bounds, trust_clip=trust_clip, maximize=maximize)
                if weight_norms_out is not None:
                    for i, w_norm in zip(idx, taken):
                        weight_norms_out[i] = w_norm
                continue
            u = lamb_directions(bucket, [grads[i] for i in idx], [exp_avgs[i] for i in idx],
                                [exp_avg_sqs[i] for i in idx], step=[steps[i] for i in idx], beta1=beta1,
                                beta2=beta2, eps=eps,
                                weight_decay=weight_decay if adapted else 0.0, bias_correction=bias_correction,
                                maximize=maximize, foreach=use_foreach)
            if not adapted:
                _foreach_or_loop_axpy_(bucket, u, None, -lr, use_foreach)
                continue
            dtype = ratio_dtype(bucket[0].dtype)
            if norms is not None:
                w_norms, u_norms = norms(idx, bucket, u, dtype)
            else:
                w_norms = torch.stack(torch._foreach_norm(bucket, 2, dtype=dtype))
                u_norms = torch.stack(torch._foreach_norm(u, 2, dtype=dtype))
            if weight_norms_out is not None:
                for i, norm in zip(idx, w_norms.unbind()):
                    weight_norms_out[i] = norm
            ratios = lamb_trust_ratio(w_norms, u_norms, weight_norm_bounds=weight_norm_bounds, trust_clip=trust_clip)
            torch._foreach_copy_(pick(trust_ratios, idx), list(ratios.unbind()))
            _foreach_or_loop_axpy_(bucket, u, (ratios * -lr).unbind(), -lr, use_foreach)


def _host_lamb(tensors: list[tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor], Scalar]], *, lr: Scalar,
               beta1: float, beta2: float, eps: float, weight_decay: float, bias_correction: bool,
               weight_norm_bounds: Optional[tuple[float, float]], trust_clip: bool,
               maximize: bool) -> list[Optional[float]]:
    """The CPU path: each tensor's moments, ``u``, norms, ratio (a Python float) and update back to
    back, while its memory is still in cache, with ``u`` for one tensor at a time (not a copy of
    every parameter). ``(w, g, m, v, ratio slot or None, step)`` per tensor; returns ``‖w‖`` of each
    adapted tensor (``None`` for the others)."""
    lr = lr.item() if isinstance(lr, Tensor) else lr
    weight_norms: list[Optional[float]] = []
    for w, g, m, v, slot, step in tensors:
        if bias_correction and _cpu_fused_adamw(w.dtype) and _same_dense_layout(w, g, m) \
                and _same_dense_layout(w, v, None):
            weight_norms.append(_host_lamb_fused(w, g, m, v, slot, step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                                 weight_decay=weight_decay, weight_norm_bounds=weight_norm_bounds,
                                                 trust_clip=trust_clip, maximize=maximize))
            continue
        step = step.item() if isinstance(step, Tensor) else step  # a CPU count: no device to wait for
        correction1, correction2 = (_one_minus_power(beta1, step), _one_minus_power(beta2, step)) \
            if bias_correction else (1.0, 1.0)
        root2 = math.sqrt(correction2)
        if maximize:
            g = torch.neg(g)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        u = v.sqrt().div_(root2).add_(eps)
        torch.div(m, u, out=u).div_(correction1)
        if weight_decay != 0:
            u.add_(w, alpha=weight_decay)
        ratio, w_norm = 1.0, None
        if slot is not None:
            w_norm = _host_norm(w)
            ratio = _host_lamb_ratio(w_norm, _host_norm(u), weight_norm_bounds=weight_norm_bounds,
                                     trust_clip=trust_clip)
            slot.fill_(ratio)
        weight_norms.append(w_norm)
        w.add_(u, alpha=-lr * ratio)
    return weight_norms


def _host_lamb_fused(w: Tensor, g: Tensor, m: Tensor, v: Tensor, slot: Optional[Tensor], step: Scalar, *, lr: float,
                     beta1: float, beta2: float, eps: float, weight_decay: float,
                     weight_norm_bounds: Optional[tuple[float, float]], trust_clip: bool,
                     maximize: bool) -> Optional[float]:
    """One tensor of the CPU path through torch's fused AdamW kernel, which updates the moments and
    applies ``m̂/(√v̂+ε)`` in one vectorised pass, computing the square root and the division once.

    AdamW's step with ``lr = 1`` turns ``s = w`` into ``w − u`` exactly (``u = m̂/(√v̂+ε) + wd·w``,
    its decoupled decay being LAMB's ``wd·w``), so on a copy of ``w``: ``s − w = −u``, whose norm and
    ``‖w‖`` give the ratio, and ``w ← w + lr·r·(s − w)``. The copy and the last two passes run while
    the tensor is in cache. An excluded tensor takes the kernel on ``w`` itself, with ``lr`` and no
    decay. Returns ``‖w‖`` of an adapted tensor."""
    count = step if isinstance(step, Tensor) else torch.tensor(float(step))
    if slot is None:
        torch._fused_adamw_([w], [g], [m], [v], [], [count], lr=lr, beta1=beta1, beta2=beta2, weight_decay=0.0,
                            eps=eps, amsgrad=False, maximize=maximize)
        return None
    w_norm = _host_norm(w)
    s = torch.empty_like(w)
    s.copy_(w)
    torch._fused_adamw_([s], [g], [m], [v], [], [count], lr=1.0, beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                        eps=eps, amsgrad=False, maximize=maximize)
    s.sub_(w)  # −u
    ratio = _host_lamb_ratio(w_norm, _host_norm(s), weight_norm_bounds=weight_norm_bounds, trust_clip=trust_clip)
    slot.fill_(ratio)
    w.add_(s, alpha=lr * ratio)
    return w_norm


@functools.lru_cache(maxsize=None)
def _cpu_fused_adamw(dtype: torch.dtype) -> bool:
    """Whether this torch has the fused AdamW kernel for CPU tensors of ``dtype`` (probed once)."""
    try:
        w = torch.ones(2, dtype=dtype)
        torch._fused_adamw_([w], [torch.ones(2, dtype=dtype)], [torch.zeros(2, dtype=dtype)],
                            [torch.zeros(2, dtype=dtype)], [], [torch.tensor(1.0)], lr=1.0, beta1=0.5, beta2=0.5,
                            weight_decay=0.0, eps=0.0, amsgrad=False, maximize=False)
    except (AttributeError, RuntimeError, TypeError, NotImplementedError):
        return False
    return bool(torch.allclose(w.float(), torch.zeros(2)))  # 1 − 1·(0.5/0.5)/(√(0.5/0.5)) = 0


def _host_lamb_ratio(w_norm: float, u_norm: float, *, weight_norm_bounds: Optional[tuple[float, float]],
                     trust_clip: bool) -> float:
    """:func:`lamb_trust_ratio` for one layer's norms as Python floats (the CPU path): the same rule."""
    if not (math.isfinite(w_norm) and math.isfinite(u_norm)):
        return math.nan
    phi = w_norm if weight_norm_bounds is None else min(max(w_norm, weight_norm_bounds[0]), weight_norm_bounds[1])
    ratio = phi / u_norm if w_norm > 0 and u_norm > 0 else 1.0
    return min(ratio, 1.0) if trust_clip else ratio


def lamb_directions(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], *,
                    step: Union[Scalar, Sequence[Scalar]], beta1: float, beta2: float, eps: float,
                    weight_decay: float, bias_correction: bool, maximize: bool, foreach: bool) -> list[Tensor]:
    """Update Adam's moments in place and return ``u = m̂/(√v̂ + ε) + wd·w`` for tensors of one
    device and dtype. ``u`` is materialised: its norm is needed before the update (as torch's Adam
    materialises its denominator). ``step`` as in :func:`lamb`: one count, or one per tensor."""
    if maximize:
        grads = list(torch._foreach_neg(grads)) if foreach else [torch.neg(g) for g in grads]
    correction1, root2 = _corrections(step, len(params), beta1, beta2, bias_correction)
    if foreach:
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        denom = list(torch._foreach_sqrt(exp_avg_sqs))
        _foreach_divide_(denom, root2)
        torch._foreach_add_(denom, eps)
        u = list(torch._foreach_div(exp_avgs, denom))
        _foreach_divide_(u, correction1)
        if weight_decay != 0:
            torch._foreach_add_(u, params, alpha=weight_decay)
        return u
    u = []
    for i, (w, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        c1, r2 = _pick_scalar(correction1, i), _pick_scalar(root2, i)
        direction = torch.div(m, v.sqrt().div_(r2).add_(eps)).div_(c1)
        if weight_decay != 0:
            direction.add_(w, alpha=weight_decay)
        u.append(direction)
    return u


# One scalar for every tensor, or one per tensor.
Corrections = Union[Scalar, Sequence[Scalar]]


def _corrections(step: Union[Scalar, Sequence[Scalar]], n: int, beta1: float, beta2: float,
                 bias_correction: bool) -> tuple[Corrections, Corrections]:
    """``(1 - β1^t, √(1 - β2^t))`` for one shared count (two scalars) or per tensor (two lists).

    Per-tensor counts that are tensors are stacked and corrected in a handful of vector ops (no
    host read, so a compiled step traces them); Python counts give Python floats."""
    if not bias_correction:
        return 1.0, 1.0
    if isinstance(step, (int, float, Tensor)):
        return _one_minus_power(beta1, step), _sqrt(_one_minus_power(beta2, step))
    steps = list(step)
    if len(steps) != n:
        raise ValueError(f"step: {len(steps)} step counts for {n} tensors")
    if not any(isinstance(s, Tensor) for s in steps):
        return ([_one_minus_power(beta1, s) for s in steps],
                [math.sqrt(_one_minus_power(beta2, s)) for s in steps])
    # In float64: the counts are float32 0-d tensors (on the CPU for the unfused paths), and the
    # corrections of float64 parameters must not be rounded to float32.
    device = next(s for s in steps if isinstance(s, Tensor)).device
    vector = torch.stack([s.to(torch.float64) if isinstance(s, Tensor)
                          else torch.tensor(float(s), dtype=torch.float64, device=device) for s in steps])
    return (list(_one_minus_power(beta1, vector).unbind()),  # type: ignore[union-attr]
            list(_sqrt(_one_minus_power(beta2, vector)).unbind()))  # type: ignore[union-attr]


def _pick_scalar(value: Corrections, i: int) -> Scalar:
    return value if isinstance(value, (int, float, Tensor)) else value[i]


def _foreach_divide_(tensors: list[Tensor], by: Corrections) -> None:
    """``t /= by`` for each tensor: one scalar (Python or 0-d tensor) or one per tensor."""
    if isinstance(by, (int, float)):
        if by != 1:
            torch._foreach_div_(tensors, by)
    elif isinstance(by, Tensor):
        torch._foreach_div_(tensors, by)
    elif all(isinstance(b, (int, float)) for b in by):
        torch._foreach_div_(tensors, list(by))  # type: ignore[arg-type]
    else:
        # 0-d tensors, one per tensor: on the CPU (a count) they may face accelerator tensors, as scalars do
        torch._foreach_div_(tensors, [b if isinstance(b, Tensor) else torch.tensor(b) for b in by])


def _one_minus_power(beta: float, step: Scalar) -> Scalar:
    """``1 - beta**step``. For a tensor step, as ``-expm1(step·ln beta)``: in float32 the plain form
    loses about half its digits to cancellation (1 - 0.999² has a relative error of 3e-5)."""
    if beta == 0:
        return 1.0
    if isinstance(step, Tensor):
        return -torch.expm1(step * math.log(beta))
    return 1 - beta ** step


def _sqrt(x: Scalar) -> Scalar:
    return x.sqrt() if isinstance(x, Tensor) else math.sqrt(x)


def _foreach_or_loop_axpy_(ys: list[Tensor], xs: list[Tensor], alphas: Optional[Sequence[Tensor]], alpha: Scalar,
                           use_foreach: bool) -> None:
    if use_foreach:
        _foreach_axpy_(ys, xs, alphas, alpha)
        return
    for i, (y, x) in enumerate(zip(ys, xs)):
        _axpy_(y, x, alphas[i] if alphas is not None else alpha)
