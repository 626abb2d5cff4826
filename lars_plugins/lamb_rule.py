"""LAMB's update rule (You et al. 2019, Algorithm 2) as functions over lists of tensors.

:func:`lamb` dispatches per device/dtype bucket to the CPU path (each tensor's moments, ``u``, norms
and update back to back, through torch's fused AdamW kernel where it can) or the single- and
multi-tensor paths of accelerators (no host read); the fused CUDA step is
:func:`lars_plugins.fused.fused_lamb`, which the optimizer class chooses.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import cpu_directions, cpu_kernels
from .tensor_lists import (NormsFn, Scalar, buckets, foreach_or_loop_axpy_, host_norm, host_scalars, pick, ratio_dtype,
                           same_dense_layout)

__all__ = ["lamb", "lamb_trust_ratio", "lamb_directions"]


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
    scratch: Optional[cpu_directions.Scratch] = None,
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
    ``scratch`` is where the CPU path's fused route writes ``u`` (:class:`~lars_plugins.cpu_directions.Scratch`,
    which an optimizer keeps from step to step); ``None`` allocates a buffer of the largest tensor for the call.
    """
    for g in grads:
        if g.is_sparse:
            raise RuntimeError("LAMB does not support sparse gradients; use dense gradients")
    steps = [step] * len(params) if isinstance(step, (int, float, Tensor)) else list(step)
    for (device, _), indices in buckets(params).items():
        use_foreach = foreach if foreach is not None else device.type != "cpu"
        for adapted in (True, False):
            idx = [i for i in indices if excluded[i] != adapted]
            if not idx:
                continue
            bucket = [params[i] for i in idx]
            if not use_foreach and norms is None and host_scalars(device):
                taken = _host_lamb([(bucket[k], grads[i], exp_avgs[i], exp_avg_sqs[i],
                                     trust_ratios[i] if adapted else None, steps[i]) for k, i in enumerate(idx)],
                                   lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                   weight_decay=weight_decay if adapted else 0.0, bias_correction=bias_correction,
                                   weight_norm_bounds=weight_norm_bounds, trust_clip=trust_clip, maximize=maximize,
                                   scratch=scratch)
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
                foreach_or_loop_axpy_(bucket, u, None, -lr, use_foreach)
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
            foreach_or_loop_axpy_(bucket, u, (ratios * -lr).unbind(), -lr, use_foreach)


def _host_lamb(tensors: list[tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor], Scalar]], *, lr: Scalar,
               beta1: float, beta2: float, eps: float, weight_decay: float, bias_correction: bool,
               weight_norm_bounds: Optional[tuple[float, float]], trust_clip: bool, maximize: bool,
               scratch: Optional[cpu_directions.Scratch] = None) -> list[Optional[float]]:
    """The CPU path: each tensor's moments, ``u``, norms, ratio (a Python float) and update back to
    back, while its memory is still in cache, with ``u`` for one tensor at a time (not a copy of
    every parameter). ``(w, g, m, v, ratio slot or None, step)`` per tensor, of one dtype; returns
    ``‖w‖`` of each adapted tensor (``None`` for the others).

    Where Numba's loops serve (:mod:`lars_plugins.cpu_kernels`), the adapted tensors go through them in
    one call for all of them, ``u`` in the scratch buffer. Where torch's
    fused kernels serve (:mod:`lars_plugins.cpu_directions`): the excluded tensors take the fused AdamW
    kernel in one call, without decay; each other adapted tensor's ``u`` comes from it on a scratch
    buffer, without a copy of ``w``. Elsewhere, the same arithmetic in eager ops."""
    lr = lr.item() if isinstance(lr, Tensor) else lr
    rule = cpu_kernels.LambRatio(weight_norm_bounds, trust_clip)
    scratch = scratch if scratch is not None else cpu_directions.Scratch(reuse_distance=0)
    compiled = _compiled_lamb(tensors, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                              bias_correction=bias_correction, rule=rule, maximize=maximize, scratch=scratch)
    fused = [i not in compiled and bias_correction and cpu_directions.supported(w.dtype)
             and same_dense_layout(w, g, m, v)
             for i, (w, g, m, v, _, _) in enumerate(tensors)]
    plain = [t for t, f in zip(tensors, fused) if f and t[4] is None]
    if plain:
        ws, gs, ms, vs = (list(x) for x in zip(*[t[:4] for t in plain]))
        _excluded_step(ws, gs, ms, vs, [_count(t[5]) for t in plain], lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                       maximize=maximize)
    scratch.reserve([t[0] for t, f in zip(tensors, fused) if f and t[4] is not None])
    weight_norms: list[Optional[float]] = []
    for i, ((w, g, m, v, slot, step), fast) in enumerate(zip(tensors, fused)):
        if i in compiled:
            weight_norms.append(compiled[i])
            continue
        if fast:
            if slot is None:
                weight_norms.append(None)
                continue
            u = cpu_directions.adamw_direction(w, g, m, v, None, _count(step), scratch, beta1=beta1, beta2=beta2,
                                               eps=eps, weight_decay=weight_decay, maximize=maximize)
            ratio = rule(u.w_norm, u.d_norm)
            slot.fill_(ratio)
            u.apply(lr * ratio)
            weight_norms.append(u.w_norm)
            continue
        step = step.item() if isinstance(step, Tensor) else step  # a CPU count: no device to wait for
        correction1, correction2 = (_one_minus_power(beta1, step), _one_minus_power(beta2, step)) \
            if bias_correction else (1.0, 1.0)
        root2 = math.sqrt(correction2)
        if maximize:
            g = torch.neg(g)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        d = v.sqrt().div_(root2).add_(eps)
        torch.div(m, d, out=d).div_(correction1)
        if weight_decay != 0:
            d.add_(w, alpha=weight_decay)
        ratio, w_norm = 1.0, None
        if slot is not None:
            w_norm = host_norm(w)
            ratio = rule(w_norm, host_norm(d))
            slot.fill_(ratio)
        weight_norms.append(w_norm)
        w.add_(d, alpha=-lr * ratio)
    return weight_norms


def _compiled_lamb(tensors: list[tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor], Scalar]], *, lr: float,
                   beta1: float, beta2: float, eps: float, weight_decay: float, bias_correction: bool,
                   rule: cpu_kernels.LambRatio, maximize: bool, scratch: cpu_directions.Scratch) -> dict[int, float]:
    """The adapted tensors Numba's loops can take (:mod:`lars_plugins.cpu_kernels`), stepped in one
    call for all of them. Returns ``‖w‖`` of each tensor it stepped, by position; ``{}`` where the
    loops do not serve."""
    if not tensors or not cpu_kernels.available(tensors[0][0].dtype):
        return {}
    chosen = [i for i, (w, g, m, v, slot, _) in enumerate(tensors)
              if slot is not None and m is not None and v is not None and cpu_kernels.takes(w, g, m, v)]
    if not chosen:
        return {}
    ws, gs, ms, vs, slots, steps = zip(*[tensors[i] for i in chosen])
    stepped = _adapted_batch_step(ws, gs, ms, vs, slots, steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                  weight_decay=weight_decay, bias_correction=bias_correction, rule=rule,
                                  maximize=maximize, scratch=scratch)
    return {i: w_norm for i, (w_norm, _, _) in zip(chosen, stepped)}


def _excluded_step(ws: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor], counts: list[Tensor], *,
                   lr: float, beta1: float, beta2: float, eps: float, maximize: bool) -> None:
    """LAMB's step of excluded CPU tensors (counts already advanced): AdamW's without decay, in one
    call of torch's fused kernel (bias correction on; dense tensors of one dtype and layout)."""
    torch._fused_adamw_(ws, gs, ms, vs, [], counts, lr=lr, beta1=beta1, beta2=beta2, weight_decay=0.0, eps=eps,
                        amsgrad=False, maximize=maximize)


def _adapted_batch_step(ws: Sequence[Tensor], gs: Sequence[Tensor], ms: Sequence[Tensor], vs: Sequence[Tensor],
                        slots: Sequence[Tensor], steps: Sequence[Scalar], *, lr: float, beta1: float, beta2: float,
                        eps: float, weight_decay: float, bias_correction: bool, rule: cpu_kernels.LambRatio,
                        maximize: bool, scratch: cpu_directions.Scratch) -> list[tuple[float, float, float]]:
    """LAMB's step of adapted CPU tensors that :func:`cpu_kernels.takes` accepts (counts already
    advanced), in one call of Numba's loops, each ratio written into its slot there; ``(‖w‖, ‖u‖, r)``
    of each."""
    return cpu_kernels.AdamWBatch(
        ws, gs, ms, vs, None, [s.item() if isinstance(s, Tensor) else float(s) for s in steps], beta1=beta1,
        beta2=beta2, eps=eps, weight_decay=weight_decay, maximize=maximize, bias_correction=bias_correction,
        ratio_slots=slots).step(lr, rule, scratch)


def _count(step: Scalar) -> Tensor:
    """A step count as the fused kernel takes it: a 0-d float32 CPU tensor."""
    return step if isinstance(step, Tensor) else torch.tensor(float(step))


def _host_lamb_ratio(w_norm: float, u_norm: float, weight_norm_bounds: Optional[tuple[float, float]],
                     trust_clip: bool) -> float:
    """:func:`lamb_trust_ratio` for one layer's norms as Python floats (the CPU path): the same rule.
    (Numba compiles this very function for its CPU loops, :mod:`lars_plugins._numba_loops`: hence
    positional parameters, which Numba binds, and nothing beyond ``math``.)"""
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
