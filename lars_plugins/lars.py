"""``LARS``: Layer-wise Adaptive Rate Scaling as a ``torch.optim.Optimizer``."""

from __future__ import annotations

from typing import Any, Optional, Union

from torch import Tensor
from torch.optim.optimizer import ParamsT

from .base import LayerwiseOptimizer
from .options import EXCLUSION_OPTIONS, Option, choice, flag, learning_rate, real
from .state_precision import STATE_PRECISIONS
from .distributed import WholeTensors
from .layouts import FlatPieces
from .lars_rule import lars, trust_ratio

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
        state_precision: how the momentum buffer is stored: ``"float32"`` (the parameter's dtype,
            as torch's SGD), ``"bfloat16"`` (stochastic rounding) or ``"int8"`` (8-bit blockwise
            codes); see :mod:`lars_plugins.state_precision`. The ratio and the update are computed
            in float32 from the true weights and gradients either way.
    """

    NAME = "LARS"
    NARROW_STATE = {"momentum_buffer": False}
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
        "state_precision": Option(choice(*STATE_PRECISIONS), "float32"),
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
        state_precision: str = "float32",
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

    def _step_group(self, group: dict[str, Any], tensors: Union[WholeTensors, FlatPieces]) -> None:
        """One step of the group's tensors: whole ones, local shards of DTensors (whose
        whole-parameter norms come from ``tensors.norms``: one all_reduce per bucket and mesh
        dimension), or the pieces of a flat layout (whole-layer norms in one collective)."""
        buffers, write_back = self._decoded_state(group, tensors, "momentum_buffer")
        new_buffer = [b is None for b in buffers]
        ratios = tensors.ratio_slots(self)
        taken: Optional[list] = [None] * len(tensors.params) if self.collects_norms and tensors.whole else None
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
            fused=False if self._narrow(group) else group["fused"],
        )
        write_back()
        if taken is not None:
            self._hand_norms(tensors.owners, [pair[0] if pair is not None else None for pair in taken],
                             [pair[1] if pair is not None else None for pair in taken])
        if group["momentum"] != 0:  # an existing buffer was updated in place (a DTensor's shard, a piece)
            tensors.store(self.state, "momentum_buffer", buffers, new_buffer)

    def _layer_ratios(self, group: dict[str, Any], weight_norms: Tensor, other_norms: Tensor) -> Tensor:
        return trust_ratio(weight_norms, other_norms, trust_coefficient=group["trust_coefficient"],
                           weight_decay=group["weight_decay"], eps=group["eps"], lr=group["lr"],
                           trust_clip=group["trust_clip"])
