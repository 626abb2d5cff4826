"""``LAMB``: layer-wise trust ratios over Adam (You et al. 2019, arXiv:1904.00962, Algorithm 2)."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from . import cpu_directions, cpu_kernels
from .base import LayerwiseOptimizer
from .options import EXCLUSION_OPTIONS, Option, choice, flag, learning_rate, pair, real
from .state_precision import STATE_PRECISIONS
from .distributed import WholeTensors
from .layouts import FlatPieces
from .lamb_rule import _adapted_batch_step, _excluded_step, lamb, lamb_trust_ratio
from .tensor_lists import buckets, host_scalars, use_fused_step
from .fused import fused_lamb

__all__ = ["LAMB"]


def _adopt_group_steps(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with a group-level ``step`` (timm's ``Lamb`` keeps one count per group) moved
    into the state of each of the group's parameters. Moments without any count are refused: the
    first step would otherwise restart bias correction on them (or drop them)."""
    groups, state = [], dict(state_dict["state"])
    for index, saved in enumerate(state_dict["param_groups"]):
        saved = dict(saved)
        step = saved.pop("step", None)
        for key in saved["params"]:
            entry = state.get(key)
            if not isinstance(entry, dict) or "exp_avg" not in entry or "step" in entry:
                continue
            if step is None:
                raise ValueError(f"loaded param group {index}: a parameter's state has Adam moments but no step count "
                                 "(neither per parameter nor per group); LAMB's bias correction needs it. Load a "
                                 "checkpoint of lars_plugins.LAMB, timm's Lamb or another Adam-family optimizer")
            count = step.detach().clone() if isinstance(step, Tensor) else torch.tensor(step)
            state[key] = {**entry, "step": count.to(device="cpu", dtype=torch.float32).reshape(())}
        groups.append(saved)
    return {**state_dict, "state": state, "param_groups": groups}


def _real(t: Tensor) -> Tensor:
    """A complex tensor as its real view (``[..., 2]``: real and imaginary parts), else itself."""
    return torch.view_as_real(t) if t.is_complex() else t


_CPU = torch.device("cpu")  # (made once: the CPU path compares every count's device with it)


class LAMB(LayerwiseOptimizer):
    r"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning", Algorithm 2).

    For every parameter ``w`` with gradient ``g`` at step ``t`` (per parameter, from 1):

    * ``m = β1·m + (1-β1)·g``, ``v = β2·v + (1-β2)·g²``, bias-corrected ``m̂ = m/(1-β1^t)``,
      ``v̂ = v/(1-β2^t)`` (``bias_correction=False``: ``m̂ = m``, ``v̂ = v``, as the paper writes it);
    * adapted: ``u = m̂/(√v̂ + ε) + wd·w`` and ``w -= lr · φ(‖w‖)/‖u‖ · u``, with ``φ`` the
      identity or, with ``weight_norm_bounds=(low, high)``, ``min(max(‖w‖, low), high)``;
      ``trust_clip`` caps the ratio at 1 (timm's ``lambc``);
    * excluded (biases and norms by default, as in LARS): ``w -= lr · m̂/(√v̂ + ε)``, no decay.

    Where ``‖w‖ = 0`` or ``‖u‖ = 0`` the ratio is 1 (the plain AdamW step, about ``lr`` per
    element: small, and a zero-initialised tensor is not frozen); a NaN or inf norm gives NaN.
    The last ratio is in ``state[p]["trust_ratio"]``; exclusion, sharded training (DDP, FSDP2,
    FSDP1, DeepSpeed ZeRO) and checkpoints work as for :class:`~lars_plugins.LARS`, through the
    same machinery. ``step()`` reads no accelerator tensor on the host (the step counts are CPU
    tensors, as in torch's Adam). ``lr`` may be a 0-d tensor.

    Args:
        params: parameters, ``(name, parameter)`` pairs, or parameter-group dicts.
        lr: learning rate (the paper: about 1e-3 to 1e-2 for BERT at batch 32k-64k).
        betas: ``(β1, β2)``, each in [0, 1).
        eps: ε added to ``√v̂``.
        weight_decay: decoupled weight decay ``wd`` inside ``u`` (adapted parameters only).
        bias_correction: Adam's bias correction of ``m`` and ``v``.
        weight_norm_bounds: ``(low, high)`` for ``φ``; ``None`` is the identity.
        trust_clip: cap the ratio at 1.
        exclude_bias_and_norm: exclude ``ndim <= 1`` tensors in groups without ``exclude``.
        maximize: maximise the objective instead of minimising it.
        foreach: ``True`` multi-tensor, ``False`` single-tensor, ``None`` chooses by device.
        fused: ``None`` (default) takes the fused CUDA step (two Triton kernels per bucket,
            :mod:`lars_plugins.fused`; the step counts then live on the device, as in torch's fused
            Adam, so a step can be captured in a CUDA graph) where it applies and ``foreach`` is not
            given; ``True`` insists on it (refused where it cannot run); ``False`` never takes it.
        state_precision: how ``m`` and ``v`` are stored: ``"float32"`` (the parameter's dtype, as
            torch's Adam), ``"bfloat16"`` (stochastic rounding) or ``"int8"`` (8-bit blockwise codes,
            ``v`` as ``√v``); see :mod:`lars_plugins.state_precision`. Norms, the ratio and the
            update are computed in float32 from the decoded moments and the true weights.
    """

    NAME = "LAMB"
    NARROW_STATE = {"exp_avg": False, "exp_avg_sq": True}
    OPTIONS = {
        "lr": Option(learning_rate(), 1e-3),
        "betas": Option(pair(real(0.0, 1.0, high_open=True)), (0.9, 0.999)),
        "eps": Option(real(), 1e-6),
        "weight_decay": Option(real(), 0.01),
        "bias_correction": Option(flag(), True),
        "weight_norm_bounds": Option(pair(real(), optional=True, ordered=True), None),
        "trust_clip": Option(flag(), False),
        **EXCLUSION_OPTIONS,
        "maximize": Option(flag(), False),
        "foreach": Option(flag(optional=True), None),
        "fused": Option(flag(optional=True), None),
        "state_precision": Option(choice(*STATE_PRECISIONS), "float32"),
    }
    HANDS_NORMS = True  # ‖w‖ only: the ratio divides by ‖u‖, so a monitor takes ‖g‖ itself

    def __init__(
        self,
        params: ParamsT,
        lr: Union[float, Tensor] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        *,
        bias_correction: bool = True,
        weight_norm_bounds: Optional[tuple[float, float]] = None,
        trust_clip: bool = False,
        exclude_bias_and_norm: bool = True,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        state_precision: str = "float32",
    ) -> None:
        defaults = self.declared_defaults(locals())
        super().__init__(params, defaults)

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return dict(beta1=beta1, beta2=beta2, eps=group["eps"], bias_correction=group["bias_correction"],
                    maximize=group["maximize"])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; one of timm's ``Lamb`` (a ``step`` per group, moments per parameter) has
        its group's count given to each parameter, so that bias correction goes on from where it was."""
        super().load_state_dict(_adopt_group_steps(state_dict))

    def _state(self, p: Tensor, *, step_on_device: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """``(step, exp_avg, exp_avg_sq)`` of ``p``, made at its first step. The count is a float32
        0-d tensor on the CPU, as torch's Adam keeps it (read without a sync), or on ``p``'s device
        for the fused step, which reads and advances it there; it moves where the path needs it."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if step_on_device else "cpu")
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        step = state["step"]
        wanted = p.device if step_on_device else _CPU
        if step.device != wanted:  # a change of path (or a checkpoint from the other one)
            state["step"] = step.to(device=wanted, dtype=torch.float32)
        return state["step"], state["exp_avg"], state["exp_avg_sq"]

    def _step_fused(self, group: dict[str, Any], params: list[Tensor], sharded: bool) -> bool:
        """The fused CUDA step of the whole group, where every bucket takes it (see ``fused``)."""
        if not params or group["fused"] is False or self._narrow(group) or (group["fused"] is None and (
                group["foreach"] is not None or params[0].device.type != "cuda")):
            return False
        states = [self.state[p] for p in params]
        by_bucket = buckets(params)
        if not all(use_fused_step("LAMB", group["fused"], group["foreach"], sharded,
                                  [tuple(_real(t) if t is not None else None for t in (
                                      params[i], params[i].grad, states[i].get("exp_avg"), states[i].get("exp_avg_sq")))
                                   for i in idx]) for idx in by_bucket.values()):
            return False
        hyper = self._hyper(group)
        for idx in by_bucket.values():
            bucket = [params[i] for i in idx]
            tensors = [self._state(p, step_on_device=True) for p in bucket]
            excluded = [self.is_excluded(group, p) for p in bucket]
            taken: Optional[list] = [None] * len(bucket) if self.collects_norms else None
            fused_lamb([_real(p) for p in bucket], [_real(p.grad) for p in bucket],  # type: ignore[arg-type]
                       [_real(m) for _, m, _ in tensors], [_real(v) for _, _, v in tensors], [s for s, _, _ in tensors],
                       [None if ex else self._trust_ratio_slot(p) for p, ex in zip(bucket, excluded)],
                       excluded=excluded, lr=group["lr"], beta1=hyper["beta1"], beta2=hyper["beta2"], eps=hyper["eps"],
                       weight_decay=group["weight_decay"], bias_correction=hyper["bias_correction"],
                       weight_norm_bounds=group["weight_norm_bounds"], trust_clip=group["trust_clip"],
                       maximize=hyper["maximize"], weight_norms_out=taken)
            if taken is not None:
                self._hand_norms(bucket, taken)
        return True

    def _step_group(self, group: dict[str, Any], tensors: Union[WholeTensors, FlatPieces]) -> None:
        """One step of the group's tensors: whole ones, local shards of DTensors, or the pieces of a
        flat layout, the whole-layer norms of ``w`` and ``u`` coming from ``tensors.norms``."""
        if not tensors.whole and any(t.is_complex() for t in tensors.owners):
            raise ValueError("a flat layout (FSDP1, DeepSpeed ZeRO) holds complex parameters in flat tensors; LAMB "
                             "steps complex parameters as their real views, which it can only do for whole parameters")
        if self._step_fused(group, tensors.owners, tensors.sharded):  # never for sharded tensors (fused=True: refused)
            return
        if isinstance(tensors, WholeTensors) and self._step_on_host(group, tensors):
            return
        # One count per tensor (a flat tensor's pieces share it), advanced once: a parameter, or an
        # FSDP1 unit, that had no gradient on some step has taken fewer steps and keeps its own count.
        unique = {id(t): t for t in tensors.owners}
        counts = {key: self._state(t)[0] for key, t in unique.items()}
        if counts and tensors.params[0].is_cpu:  # (on a GPU, Numba is not worth compiling for the counts)
            cpu_kernels.advance_counts(list(counts.values()))  # one call, not one per tensor
        elif counts:
            torch._foreach_add_(list(counts.values()), 1.0)  # one call, not one per tensor (CPU counts)
        exp_avgs, write_avgs = self._decoded_state(group, tensors, "exp_avg")
        exp_avg_sqs, write_avg_sqs = self._decoded_state(group, tensors, "exp_avg_sq")
        taken: Optional[list] = [None] * len(tensors.params) if self.collects_norms and tensors.whole else None
        # A complex parameter is stepped as its real view (as torch's Adam does): the second moment
        # then accumulates the squares of the real and imaginary parts, not g·g.
        params, grads = tensors.params, tensors.grads
        if any(p.is_complex() for p in params):  # (their gradients and moments are complex alike)
            params, grads = [_real(t) for t in params], [_real(t) for t in grads]
            exp_avgs, exp_avg_sqs = ([None if t is None else _real(t) for t in ts] for ts in (exp_avgs, exp_avg_sqs))
        lamb(params, grads, exp_avgs, exp_avg_sqs,  # type: ignore[arg-type]
             tensors.ratio_slots(self), excluded=tensors.excluded, step=[counts[id(t)] for t in tensors.owners],
             lr=group["lr"], weight_decay=group["weight_decay"], weight_norm_bounds=group["weight_norm_bounds"],
             trust_clip=group["trust_clip"], foreach=group["foreach"], norms=tensors.norms, weight_norms_out=taken,
             scratch=self._host_scratch(), **self._hyper(group))
        write_avgs()
        write_avg_sqs()
        if taken is not None:
            self._hand_norms(tensors.owners, taken)

    def _step_on_host(self, group: dict[str, Any], tensors: WholeTensors) -> bool:
        """The common CPU step in one pass over the group's tensors: whole dense float32 or float64
        CPU tensors of one dtype, state in their dtype and layout, the adapted ones through Numba's
        loops in one call (:class:`~lars_plugins.cpu_kernels.AdamWBatch`), the excluded ones
        through torch's fused AdamW kernel in one call, the counts advanced in one call. It is the
        generic route's arithmetic (:func:`~lars_plugins.lamb_rule.lamb` takes the same two kernels
        for these tensors) with a fraction of its Python work per tensor: that work, not the
        kernels, was most of what separated LAMB's CPU step from fused AdamW's
        (docs/performance.md). Returns ``False``, having updated nothing, where any tensor or
        option does not fit (the generic route then steps the group)."""
        params = tensors.params
        if (not params or group["foreach"] or not group["bias_correction"] or tensors.sharded
                or self._narrow(group) or not host_scalars(_CPU)):
            return False
        dtype = params[0].dtype
        if not (cpu_kernels.available(dtype) and cpu_directions.supported(dtype)):
            return False
        adapted: list[tuple[Tensor, ...]] = []  # (owner, w, g, m, v, ratio slot, count)
        excluded: list[tuple[Tensor, ...]] = []  # (w, g, m, v, count)
        for p, w, g, out in zip(tensors.owners, params, tensors.grads, tensors.excluded):
            state = self.state[p]
            count = state.get("step")
            if count is None or not count.is_cpu:  # new state, or a count the fused step kept on a GPU
                count = self._state(p)[0]
            m, v = state.get("exp_avg"), state.get("exp_avg_sq")
            if (m is None or v is None or w.dtype != dtype or g.layout != torch.strided
                    or not cpu_kernels.takes(w, g, m, v)):
                return False
            if out:
                excluded.append((w, g, m, v, count))
            else:
                slot = state.get("trust_ratio")
                adapted.append((p, w, g, m, v, slot if slot is not None else self._trust_ratio_slot(p), count))
        cpu_kernels.advance_counts([row[-1] for row in adapted] + [row[-1] for row in excluded])
        lr = group["lr"].item() if isinstance(group["lr"], Tensor) else group["lr"]
        (beta1, beta2), eps, maximize = group["betas"], group["eps"], group["maximize"]
        if excluded:
            ws, gs, ms, vs, counts = (list(column) for column in zip(*excluded))
            _excluded_step(ws, gs, ms, vs, counts, lr=lr, beta1=beta1, beta2=beta2, eps=eps, maximize=maximize)
        if adapted:
            owners, ws, gs, ms, vs, slots, counts = (list(column) for column in zip(*adapted))
            stepped = _adapted_batch_step(
                ws, gs, ms, vs, slots, counts, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                weight_decay=group["weight_decay"], bias_correction=True, maximize=maximize,
                rule=cpu_kernels.LambRatio(group["weight_norm_bounds"], group["trust_clip"]),
                scratch=self._host_scratch())
            if self.collects_norms:
                self._hand_norms(owners, [w_norm for w_norm, _, _ in stepped])
        return True

    def _layer_ratios(self, group: dict[str, Any], weight_norms: Tensor, other_norms: Tensor) -> Tensor:
        return lamb_trust_ratio(weight_norms, other_norms, weight_norm_bounds=group["weight_norm_bounds"],
                                trust_clip=group["trust_clip"])
