"""The wrapper's CPU route over bases whose direction it can compute itself: torch's SGD, Adam and AdamW.

``Layerwise`` measures the base's update ``Δw = lr·d`` and rescales it. For most bases that needs
the base's whole step, then a copy of the old weights and three more passes. For torch's SGD, Adam
and AdamW, ``d`` does not depend on ``lr``: their fused CPU kernel, run at ``lr = 1`` on a copy ``s``
of ``w``, updates the momentum buffer or the moments once and leaves ``s − w = −d``, weight decay
(coupled or decoupled), Nesterov and ``maximize`` included. So one
tensor at a time, while it is in cache: ``‖w‖``, the copy, the kernel, ``‖d‖``, the ratio, and
``w ← w + r·lr·(s − w)``. Over AdamW, whose decay does not enter the kernel's gradient, the copy
is not needed: :mod:`lars_plugins.cpu_directions` takes ``d`` from the kernel on a scratch buffer,
the route :mod:`lars_plugins.lamb_rule` takes for LAMB, whose ``u`` is AdamW's ``d``; where Numba's
loops serve (:mod:`lars_plugins.cpu_kernels`), AdamW's tensors go through them in one call for the
group instead, as LAMB's do. The copies go into the same scratch buffer, which the wrapper keeps.
The base keeps its state as it would: SGD's ``momentum_buffer`` (the first step's ``d``, as torch
starts it), Adam's ``step``, ``exp_avg`` and ``exp_avg_sq`` (``max_exp_avg_sq`` with ``amsgrad``), so
checkpoints are the same whichever route stepped.

The route is taken only where it is exact and nothing can notice it. That means: the base is
exactly ``torch.optim.SGD``, ``Adam`` or ``AdamW``, with no step hooks of its own or global ones (they would
run around the base's step, which no longer sees these tensors). The tensors are whole, dense CPU
tensors of a dtype the kernel takes. The group's options have a fused CPU kernel: numbers for the
betas, no ``capturable``, no ``differentiable``. Everything else takes the generic route.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import cpu_directions, cpu_kernels
from .adapters import torch_optimizer
from .tensor_lists import cpu_fused_adamw, cpu_fused_sgd, host_norm, same_dense_layout

__all__ = ["takes_known_direction", "known_direction_step"]

_KERNELS = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adamw"}


def takes_known_direction(base: Optimizer, group: dict[str, Any], params: list[Tensor],
                          grads: list[Tensor]) -> bool:
    """Whether the adapted tensors ``params`` (with ``grads``) of ``group`` take the known-direction route."""
    if type(base) not in _KERNELS or torch_optimizer.has_step_hooks(base) or not params:
        return False
    sgd = _KERNELS[type(base)] == "sgd"
    numbers = [group.get(k) for k in (("momentum", "dampening") if sgd else ("eps",))]
    numbers += [] if sgd else list(group.get("betas", (None, None)))
    if group.get("capturable") or group.get("differentiable") or isinstance(group.get("weight_decay"), Tensor) \
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in numbers):
        return False
    kernel_takes = cpu_fused_sgd if sgd else cpu_fused_adamw
    state_keys = ("momentum_buffer",) if sgd else ("exp_avg", "exp_avg_sq")
    for w, g in zip(params, grads):
        if w.device.type != "cpu" or g.is_sparse or not kernel_takes(w.dtype) or g.dtype != w.dtype \
                or not same_dense_layout(w, g, None):
            return False
        state = base.state.get(w)
        if state and any(state.get(k) is not None and (not isinstance(state[k], Tensor)
                                                       or state[k].stride() != w.stride()) for k in state_keys):
            return False
    return True


def _state(base: Optimizer, group: dict[str, Any], w: Tensor) -> dict[str, Any]:
    """The base's state of ``w``, created as torch's Adam creates it on a first step."""
    state = base.state[w]
    if len(state) == 0:
        # A CPU count: where capturable and fused are off torch keeps it on the CPU, and with fused the
        # parameter is on the CPU here anyway.
        state["step"] = torch.tensor(0.0, dtype=torch.float32) if not group.get("fused") \
            else torch.zeros((), dtype=torch.float32, device=w.device)
        state["exp_avg"] = torch.zeros_like(w, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(w, memory_format=torch.preserve_format)
        if group.get("amsgrad"):
            state["max_exp_avg_sq"] = torch.zeros_like(w, memory_format=torch.preserve_format)
    return state


def known_direction_step(base: Optimizer, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                         ratio_of: Any, after: Optional[Any] = None,
                         scratch: Optional[cpu_directions.Scratch] = None) -> None:
    """Step the adapted ``params`` of ``group`` through the base's fused CPU kernel at ``lr = 1``:
    ``ratio_of(‖w‖, ‖d‖)`` gives each tensor's ratio ``r``, then ``w ← w − r·lr·d``.
    ``after(w, ‖w‖, r)`` is told each tensor's norm and ratio (the ratio slot, the monitor).
    ``scratch`` receives the kernels' results (the wrapper keeps one across steps; ``None``: one
    buffer of the largest tensor for this call). Where ``ratio_of`` is a rule Numba's loops also
    compute (a :class:`~lars_plugins.cpu_kernels.TrustRatio` or ``LambRatio``), AdamW's tensors may
    go through them (:mod:`lars_plugins.cpu_kernels`); any other function keeps them off."""
    kind = _KERNELS[type(base)]
    compiled_ratio = ratio_of if isinstance(ratio_of, (cpu_kernels.LambRatio, cpu_kernels.TrustRatio)) else None
    lr = group["lr"].item() if isinstance(group["lr"], Tensor) else group["lr"]
    scratch = scratch if scratch is not None else cpu_directions.Scratch(reuse_distance=0)
    # AdamW's tensors: through Numba's loops where they serve (cpu_kernels), else torch's kernel on the
    # scratch. Each tensor's state is looked up (or made) once here, for all three uses below.
    adamw = kind == "adamw"
    states = [_state(base, group, w) if adamw else {} for w in params]
    compiled = [adamw and compiled_ratio is not None and cpu_kernels.available(w.dtype)
                and cpu_kernels.takes(w, g, state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq"))
                for w, g, state in zip(params, grads, states)]
    direct = [adamw and not numba and cpu_directions.supported(w.dtype) for w, numba in zip(params, compiled)]
    counts = [state["step"] for state, fast, numba in zip(states, direct, compiled) if fast or numba]
    if counts:
        cpu_kernels.advance_counts(counts)  # one call, not one per tensor, as torch's fused step counts
    if any(compiled):
        assert compiled_ratio is not None
        _compiled_adamw_step(group, [(w, g, state) for w, g, state, numba in zip(params, grads, states, compiled)
                                     if numba], lr, compiled_ratio, after, scratch)
    scratch.reserve([w for w, numba in zip(params, compiled) if not numba])
    for w, g, state, fast, numba in zip(params, grads, states, direct, compiled):
        if numba:
            continue
        if fast:
            beta1, beta2 = group["betas"]
            d = cpu_directions.adamw_direction(w, g, state["exp_avg"], state["exp_avg_sq"],
                                               state["max_exp_avg_sq"] if group.get("amsgrad") else None,
                                               state["step"], scratch, beta1=beta1, beta2=beta2, eps=group["eps"],
                                               weight_decay=group["weight_decay"],
                                               maximize=bool(group.get("maximize")))
            ratio = ratio_of(d.w_norm, d.d_norm)
            if after is not None:
                after(w, d.w_norm, ratio)
            d.apply(ratio * lr)
            continue
        # SGD and Adam decay the gradient with the "parameter" the kernel updates, so it must be w:
        # on a copy s of w, the kernel at lr = 1 leaves s − w = −d.
        w_norm = host_norm(w)
        s = scratch.like(w)
        s.copy_(w)
        if kind == "sgd":
            _sgd_direction(base, group, w, g, s)
        else:
            _adam_direction(base, group, w, g, s, decoupled=kind == "adamw")
        s.sub_(w)  # −d
        ratio = ratio_of(w_norm, host_norm(s))
        if after is not None:
            after(w, w_norm, ratio)
        w.add_(s, alpha=ratio * lr)


def _compiled_adamw_step(group: dict[str, Any], tensors: list[tuple[Tensor, Tensor, dict[str, Any]]], lr: float,
                         ratio: cpu_kernels.Ratio, after: Optional[Any], scratch: cpu_directions.Scratch) -> None:
    """AdamW's adapted tensors (each with its gradient and state) through Numba's loops, one call
    per dtype (counts already advanced); then ``after`` is told each tensor's ``‖w‖`` (before its
    update) and ratio."""
    beta1, beta2 = group["betas"]
    amsgrad = bool(group.get("amsgrad"))
    for dtype in dict.fromkeys(w.dtype for w, _, _ in tensors):
        ws = [w for w, _, _ in tensors if w.dtype == dtype]
        states = [state for w, _, state in tensors if w.dtype == dtype]
        batch = cpu_kernels.AdamWBatch(
            ws, [g for w, g, _ in tensors if w.dtype == dtype], [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [s["max_exp_avg_sq"] for s in states] if amsgrad else None,
            [s["step"].item() for s in states], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], maximize=bool(group.get("maximize")))
        stepped = batch.step(lr, ratio, scratch)
        if after is not None:
            for w, (w_norm, _, r) in zip(ws, stepped):
                after(w, w_norm, r)


def _adam_direction(base: Optimizer, group: dict[str, Any], w: Tensor, g: Tensor, s: Tensor, *,
                    decoupled: bool) -> None:
    """Adam's or AdamW's step at ``lr = 1`` on ``s`` (a copy of ``w``), with ``w``'s state."""
    state = _state(base, group, w)
    state["step"].add_(1)
    amsgrad = bool(group.get("amsgrad"))
    beta1, beta2 = group["betas"]
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
    kernel([s], [g], [state["exp_avg"]], [state["exp_avg_sq"]], [state["max_exp_avg_sq"]] if amsgrad else [],
           [state["step"]], lr=1.0, beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
           amsgrad=amsgrad, maximize=bool(group.get("maximize")))


def _sgd_direction(base: Optimizer, group: dict[str, Any], w: Tensor, g: Tensor, s: Tensor) -> None:
    """SGD's step at ``lr = 1`` on ``s`` (a copy of ``w``), with ``w``'s momentum buffer: on its first
    step the buffer becomes the decayed gradient itself, as torch starts it."""
    momentum = group["momentum"]
    state = base.state[w]
    buf = state.get("momentum_buffer") if momentum != 0 else None
    first = momentum != 0 and buf is None
    if first:
        buf = torch.empty_like(w)
    torch._fused_sgd_([s], [g], [buf] if buf is not None else [], weight_decay=group["weight_decay"],
                      momentum=momentum, lr=1.0, dampening=group["dampening"], nesterov=bool(group["nesterov"]),
                      maximize=bool(group.get("maximize")), is_first_step=first)
    if first:
        state["momentum_buffer"] = buf
