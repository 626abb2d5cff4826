"""The wrapper's CPU route over bases whose direction it can compute itself: torch's Adam and AdamW.

``Layerwise`` measures the base's update ``Δw = lr·d`` and rescales it. For most bases that needs
the base's whole step, then a copy of the old weights and three more passes. For torch's Adam and
AdamW, ``d`` does not depend on ``lr``: their fused CPU kernel, run at ``lr = 1`` on a copy ``s`` of
``w``, updates the moments once and leaves ``s − w = −d``, the decoupled decay included. So one
tensor at a time, while it is in cache: ``‖w‖``, the copy, the kernel, ``‖d‖``, the ratio, and
``w ← w + r·lr·(s − w)``. That is the route :mod:`lars_plugins.lamb_rule` takes for LAMB, whose
``u`` is AdamW's ``d``. The base keeps its state as it would: ``step``, ``exp_avg`` and
``exp_avg_sq`` (``max_exp_avg_sq`` with ``amsgrad``) are created as torch creates them, so
checkpoints are the same whichever route stepped.

The route is taken only where it is exact and nothing can notice it. That means: the base is
exactly ``torch.optim.Adam`` or ``AdamW``, with no step hooks of its own or global ones (they would
run around the base's step, which no longer sees these tensors). The tensors are whole, dense CPU
tensors of a dtype the kernel takes. The group's options have a fused CPU kernel: numbers for the
betas, no ``capturable``, no ``differentiable``. Everything else takes the generic route.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from .adapters import torch_optimizer
from .tensor_lists import cpu_fused_adamw, host_norm, same_dense_layout

__all__ = ["takes_known_direction", "known_direction_step"]

_KERNELS = {torch.optim.Adam: "adam", torch.optim.AdamW: "adamw"}


def takes_known_direction(base: Optimizer, group: dict[str, Any], params: list[Tensor],
                          grads: list[Tensor]) -> bool:
    """Whether the adapted tensors ``params`` (with ``grads``) of ``group`` take the known-direction route."""
    if type(base) not in _KERNELS or torch_optimizer.has_step_hooks(base) or not params:
        return False
    betas = group.get("betas", (None, None))
    if group.get("capturable") or group.get("differentiable") or \
            not all(isinstance(b, float) for b in betas) or isinstance(group.get("eps"), Tensor) \
            or isinstance(group.get("weight_decay"), Tensor):
        return False
    for w, g in zip(params, grads):
        if w.device.type != "cpu" or g.is_sparse or not cpu_fused_adamw(w.dtype) or g.dtype != w.dtype \
                or not same_dense_layout(w, g, None):
            return False
        state = base.state.get(w)
        if state and any(not isinstance(state.get(k), Tensor) or state[k].stride() != w.stride()
                         for k in ("exp_avg", "exp_avg_sq")):
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
                         ratio_of: Any, after: Optional[Any] = None) -> None:
    """Step the adapted ``params`` of ``group`` through the base's fused CPU kernel at ``lr = 1`` on a
    copy: ``ratio_of(‖w‖, ‖d‖)`` gives each tensor's ratio ``r``, then ``w ← w + r·lr·(s − w)``.
    ``after(w, ‖w‖, r)`` is told each tensor's norm and ratio (the ratio slot, the monitor)."""
    kernel = torch._fused_adamw_ if _KERNELS[type(base)] == "adamw" else torch._fused_adam_
    lr = group["lr"].item() if isinstance(group["lr"], Tensor) else group["lr"]
    beta1, beta2 = group["betas"]
    amsgrad = bool(group.get("amsgrad"))
    for w, g in zip(params, grads):
        state = _state(base, group, w)
        state["step"].add_(1)
        w_norm = host_norm(w)
        s = torch.empty_like(w)
        s.copy_(w)
        kernel([s], [g], [state["exp_avg"]], [state["exp_avg_sq"]], [state["max_exp_avg_sq"]] if amsgrad else [],
               [state["step"]], lr=1.0, beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
               eps=group["eps"], amsgrad=amsgrad, maximize=bool(group.get("maximize")))
        s.sub_(w)  # −d
        ratio = ratio_of(w_norm, host_norm(s))
        if after is not None:
            after(w, w_norm, ratio)
        w.add_(s, alpha=ratio * lr)
        # Freed before the next tensor's copy is taken: the allocator hands the same memory back
        # (still mapped and in cache) instead of mapping fresh pages for every tensor.
        del s
