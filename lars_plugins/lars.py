"""``LARS``: Layer-wise Adaptive Rate Scaling as a ``torch.optim.Optimizer``."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from .base import EXCLUSION_OPTIONS, LayerwiseOptimizer, Option, flag, learning_rate, real
from .distributed import WholeTensors
from .lars_rule import lars, trust_ratio
from .tensor_lists import pick, ratio_dtype
from .layouts import FlatLayout

__all__ = ["LARS"]

class LARS(LayerwiseOptimizer):
    r"""LARS (You, Gitman & Ginsburg 2017, arXiv:1708.03888) with torch.optim.SGD's momentum.

    For every parameter ``w`` with gradient ``g``:

    * adapted: ``d = ratio·(g + wd·w)`` with ``ratio = η·‖w‖ / (‖g‖ + wd·‖w‖ + ε)`` (paper Eq. 6);
      with ``trust_clip`` (LARC clip mode) ``ratio = min(ratio / lr, 1)``;
    * excluded: ``d = g`` (no adaptation and no weight decay);

    then exactly torch.optim.SGD: ``buf = momentum·buf + (1 - dampening)·d`` (the first buffer is
    ``d``), Nesterov ``d = d + momentum·buf`` else ``d = buf``, and ``w -= lr·d``.

    Adaptation never depends on ``weight_decay``: ``weight_decay=0`` is still LARS. A group's
    ``exclude`` key (``True``/``False``) decides exclusion; where it is ``None`` (the default)
    and ``exclude_bias_and_norm`` is on, tensors with ``ndim <= 1`` (biases, norm weights) are
    excluded. Use :func:`lars_plugins.param_groups` where ``ndim`` cannot tell (flattened params).

    Where ``‖w‖ = 0`` (or the denominator is 0) the ratio is ``η``: a zero-initialised tensor takes a
    small plain SGD step ``lr·η·g`` instead of the raw global LR, and is not frozen.

    The ratio used at the last step is kept as a 0-d tensor (float32, or float64 for float64 params)
    on the parameter's device in
    ``state[p]["trust_ratio"]`` (adapted parameters only). On accelerators ``step()`` never reads a
    tensor on the host (on the CPU, where that costs nothing, it reads its norms to run faster).
    ``lr`` may be a tensor (place it on the parameters' device for a sync-free step).

    Sharded training: under DDP every rank holds whole parameters; under FSDP2/tensor parallelism
    (DTensor), FSDP1 (flat parameters or ``use_orig_params``) and DeepSpeed ZeRO-1/2/3 (flat
    partitions swapped in by DeepSpeed), the norms are those of whole original parameters, summed
    over the ranks with one ``all_reduce`` per group (per mesh dimension for DTensors); exclusion
    uses the original shapes. There the ratios of the last step are in :meth:`layer_trust_ratios`.
    See docs/distributed.md.

    Args:
        params: parameters, ``(name, parameter)`` pairs, or parameter-group dicts.
        lr: global learning rate γ (LARS rates are large: the paper uses 2-29 with η=0.001).
        momentum: momentum factor.
        dampening: dampening for momentum.
        weight_decay: weight decay β (L2, inside the adapted direction as in Eq. 6).
        nesterov: Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        trust_coefficient: η, the trust coefficient (paper: 0.001).
        eps: ε added to the ratio's denominator.
        trust_clip: LARC clip mode, ``ratio = min(ratio / lr, 1)``.
        exclude_bias_and_norm: exclude ``ndim <= 1`` tensors in groups without ``exclude``.
        maximize: maximise the objective instead of minimising it.
        foreach: ``True`` multi-tensor, ``False`` single-tensor, ``None`` chooses by device.
        fused: ``None`` (default) takes the fused CUDA step (two Triton kernels per bucket:
            :mod:`lars_plugins.fused`) where it applies and ``foreach`` is not given; ``True``
            insists on it (refused where it cannot run); ``False`` never takes it.
    """

    NAME = "LARS"
    OPTIONS = {
        "lr": Option(learning_rate(), 0.1),
        "momentum": Option(real(), 0.9),
        "dampening": Option(real(0.0, 1.0), 0.0),
        "weight_decay": Option(real(), 0.0),
        "nesterov": Option(flag(), False),
        "trust_coefficient": Option(real(low_open=True), 0.001),
        "eps": Option(real(), 1e-8),
        "trust_clip": Option(flag(), False),
        **EXCLUSION_OPTIONS,
        "maximize": Option(flag(), False),
        "foreach": Option(flag(optional=True), None),
        "fused": Option(flag(optional=True), None),
    }
    HANDS_NORMS = True  # ‖w‖ and ‖g‖: the ratio's own

    def __init__(
        self,
        params: ParamsT,
        lr: Union[float, Tensor] = 0.1,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        trust_clip: bool = False,
        exclude_bias_and_norm: bool = True,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
    ) -> None:
        defaults = self.declared_defaults(locals())
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any], *, explicit: dict[str, Any], where: str) -> None:
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                f"{where}nesterov=True needs momentum > 0 and dampening == 0, "
                f"got momentum={group['momentum']} and dampening={group['dampening']}"
            )
        super()._check_group(group, explicit=explicit, where=where)

    def _step_group(self, group: dict[str, Any], tensors: WholeTensors) -> None:
        """One step of the group's whole tensors (local shards of DTensors, whose whole-parameter
        norms come from ``tensors.norms``: one all_reduce per bucket and mesh dimension)."""
        buffers = tensors.state(self.state, "momentum_buffer")
        new_buffer = [b is None for b in buffers]
        ratios = [None if excluded else self._trust_ratio_slot(p) for p, excluded in zip(tensors.owners,
                                                                                         tensors.excluded)]
        taken: Optional[list] = [None] * len(tensors.params) if self.collects_norms else None
        lars(
            tensors.params,
            tensors.grads,
            buffers,
            ratios,
            excluded=tensors.excluded,
            lr=group["lr"],
            momentum=group["momentum"],
            dampening=group["dampening"],
            weight_decay=group["weight_decay"],
            nesterov=group["nesterov"],
            trust_coefficient=group["trust_coefficient"],
            eps=group["eps"],
            trust_clip=group["trust_clip"],
            maximize=group["maximize"],
            foreach=group["foreach"],
            norms=tensors.norms,
            norms_out=taken,
            fused=group["fused"],
        )
        if taken is not None:
            self._hand_norms(tensors.owners, [pair[0] if pair is not None else None for pair in taken],
                             [pair[1] if pair is not None else None for pair in taken])
        if group["momentum"] != 0:  # an existing buffer was updated in place (a DTensor's shard too)
            tensors.store(self.state, "momentum_buffer", buffers, new_buffer)

    def _step_flat(self, group: dict[str, Any], layout: FlatLayout) -> None:
        """One step of a group whose tensors hold pieces of layers (FSDP1, DeepSpeed ZeRO).

        Whole-layer norms come first, for every layer of the layout, in one collective that every
        rank runs whatever pieces it holds; the update then runs on the pieces, as views.
        """
        tensors = group["params"]
        grads = [t.grad for t in tensors]
        values, grad_views = layout.views(tensors), layout.views(grads)
        adapted = [not self.is_excluded(group, layer.shape) for layer in layout.layers]
        dtype, device = ratio_dtype(tensors[0].dtype), tensors[0].device
        if any(adapted):  # decided by the layout alone: the same on every rank
            w_norms, g_norms, _ = layout.norms(values, grad_views, dtype=dtype, device=device)
            ratios = trust_ratio(w_norms, g_norms, trust_coefficient=group["trust_coefficient"],
                                 weight_decay=group["weight_decay"], eps=group["eps"], lr=group["lr"],
                                 trust_clip=group["trust_clip"])
            self._keep_flat_ratios(layout, ratios, adapted)
        kept = [j for j, p in enumerate(layout.pieces) if p.numel and grad_views[j] is not None]
        if not kept:
            return
        pieces = [layout.pieces[j] for j in kept]
        buffers = [self.state[t].get("momentum_buffer") for t in tensors]
        buffer_views = layout.views(buffers)
        piece_buffers = [buffer_views[j] for j in kept]
        adapt = [adapted[p.layer] for p in pieces]
        norms = None
        if any(adapt):
            index = layout.constant([p.layer for p in pieces], device)
            piece_w, piece_g = w_norms[index], g_norms[index]

            def norms(idx: Sequence[int], *_: Any) -> tuple[Tensor, Tensor]:
                where = layout.constant(list(idx), device)
                return piece_w.index_select(0, where), piece_g.index_select(0, where)
        scratch = list(torch.empty(len(pieces), dtype=dtype, device=device).unbind())
        lars(pick(values, kept), pick(grad_views, kept), piece_buffers,
             [r if a else None for r, a in zip(scratch, adapt)], excluded=[not a for a in adapt],
             lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
             weight_decay=group["weight_decay"], nesterov=group["nesterov"],
             trust_coefficient=group["trust_coefficient"], eps=group["eps"], trust_clip=group["trust_clip"],
             maximize=group["maximize"], foreach=group["foreach"], norms=norms)
        if group["momentum"] != 0:
            for t_index, tensor in enumerate(tensors):
                if buffers[t_index] is None and any(p.tensor == t_index for p in pieces):
                    # First step: the pieces' new buffers (d itself) go into one buffer shaped like
                    # the tensor, which the engines checkpoint and re-partition as their own.
                    flat = torch.zeros_like(tensor, memory_format=torch.contiguous_format)
                    flat_views = layout.views([flat if k == t_index else None for k in range(len(tensors))])
                    for j, buf in zip(kept, piece_buffers):
                        view = flat_views[j]
                        if view is not None and buf is not None:
                            view.copy_(buf)
                    self.state[tensor]["momentum_buffer"] = flat
