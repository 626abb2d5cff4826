"""``Layerwise``: LARS's trust ratio over the update of any torch optimizer (RAdam, AdamW, SGD…).

The base optimizer computes its step; the wrapper then rescales each layer's update ``Δw`` so that

    ``Δw ← r·Δw``,  ``r = η·‖w‖ / (‖Δw‖/lr + ε)``  (``‖w‖`` before the step)

that is :func:`lars_plugins.trust_ratio` applied to the base's direction ``d = Δw/lr`` in place of
the gradient (and weight decay 0: the base's own decay is already inside ``d``), with the same
zero-norm and non-finite rules. So ``‖Δw‖ ≈ lr·η·‖w‖``: every layer moves by the same fraction
``lr·η`` of its norm per step whatever the base's scale. Over SGD without momentum and decay this
is LARS exactly; over AdamW with ``η = 1, ε = 0`` it is LAMB exactly.
"""

from __future__ import annotations

import numbers
import functools
import math
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from .base import (LayerwiseOptimizer, count_group_step, evaluate, restore_trust_ratios, saved_trust_ratios,
                   without_trust_ratios)
from .options import EXCLUSION_OPTIONS, FOREIGN_KEYS, Option, flag, is_foreign_number, meant_key, real
from .distributed import WholeTensors, is_dtensor
from . import cpu_kernels
from .known_directions import known_direction_step, takes_known_direction
from .layouts import FlatPieces
from .lars_rule import trust_ratio
from .tensor_lists import buckets, host_norm, host_scalars, pick, ratio_dtype
from .layouts import layer_shape

__all__ = ["Layerwise", "LayerwiseAdamW", "centralize_gradients_"]


def centralize_gradients_(grads: list[Tensor]) -> None:
    """Gradient Centralization (Yong et al. 2020, arXiv:2004.01461), in place: every gradient with
    more than one dimension loses its mean over all dimensions but the first (one mean per output
    unit). Vectors (biases, norm weights) are left alone, as in the paper."""
    for g in grads:
        if g.ndim > 1:
            g.sub_(g.mean(dim=tuple(range(1, g.ndim)), keepdim=True))


class Layerwise(LayerwiseOptimizer):
    r"""Layer-wise trust ratios over any torch optimizer: ``Layerwise(torch.optim.RAdam(...))``.

    Each step: (optionally) centralise the gradients, run ``base.step()``, then rescale the update
    of every adapted layer, ``Δw ← r·Δw`` with ``r = η·‖w‖/(‖Δw‖/lr + ε)`` (``lr`` the group's,
    ``‖w‖`` before the step), so that ``‖Δw‖ ≈ lr·η·‖w‖``. ``trust_clip`` caps ``r`` at ``lr``
    (the step never grows beyond the base's). Excluded layers (biases and norms by default, or
    ``exclude``) keep the base's update. See docs/optimizers.md for the rule and its reasons.

    It is an optimizer in its own right: its ``param_groups`` and ``state`` are the base's (a
    scheduler on it schedules the base; new group keys go to the base's groups), its checkpoints
    are the base's (``state_dict()`` is ``base.state_dict()``, and ratios are in ``state[p]``),
    and ``Lookahead`` may go around it (``Lookahead(Layerwise(RAdam))``, the "LARS + Ranger"
    recipe) or inside it. A closure is evaluated once, before the base's step.

    Memory: during ``step()`` one copy of the adapted parameters that have gradients (in their
    dtype), freed when the step ends; nothing between steps; no copy when no layer is adapted.
    Over torch's ``SGD``, ``Adam`` and ``AdamW`` on the CPU the wrapper computes their direction itself, one
    tensor at a time through their fused kernel (:mod:`lars_plugins.known_directions`): then the
    copy is one tensor's, and the base's step serves the excluded tensors only.
    Sharded training works as for :class:`~lars_plugins.LARS` (DDP, FSDP2, FSDP1, DeepSpeed ZeRO).

    Args:
        base: the optimizer whose updates are rescaled (not a LARS or LAMB: they scale already).
        trust_coefficient: η; ``lr·η`` is the fraction of its norm a layer moves per step.
        trust_eps: ε in the ratio's denominator (in units of the base's direction ``Δw/lr``).
        trust_clip: cap ``r`` at ``lr``: the wrapper only ever shrinks the base's update.
        exclude_bias_and_norm: exclude ``ndim <= 1`` tensors in groups without ``exclude``.
        centralize_gradients: Gradient Centralization of ``p.grad`` (in place) before the base's step.
    """

    NAME = "Layerwise"
    OPTIONS = {
        "trust_coefficient": Option(real(low_open=True), 0.001),
        "trust_eps": Option(real(), 1e-8),
        "trust_clip": Option(flag(), False),
        **EXCLUSION_OPTIONS,
        "centralize_gradients": Option(flag(), False),
    }
    HANDS_NORMS = True  # ‖w‖ of adapted layers (the ratio's own); a monitor takes ‖g‖ itself

    def __init__(
        self,
        base: Optimizer,
        *,
        trust_coefficient: float = 0.001,
        trust_eps: float = 1e-8,
        trust_clip: bool = False,
        exclude_bias_and_norm: bool = True,
        centralize_gradients: bool = False,
    ) -> None:
        if not isinstance(base, Optimizer):
            raise TypeError(f"base must be a torch.optim.Optimizer, got {type(base).__name__}")
        if isinstance(base, LayerwiseOptimizer):
            raise ValueError(f"base is a {type(base).__name__}, which applies layer-wise ratios itself; wrapping it "
                             "would apply them twice. Wrap its plain counterpart (SGD, AdamW) instead")
        if isinstance(base, torch.optim.LBFGS):
            raise ValueError("base is LBFGS, whose step() calls its closure many times (a line search) and "
                             "moves the weights between calls; the wrapper rescales one update per step and cannot "
                             "stand between them. Wrap a first-order optimizer (SGD, AdamW, RAdam...)")
        defaults = self.declared_defaults(locals())
        groups = base.param_groups
        for index, group in enumerate(groups):
            self._validate({**defaults, **group}, explicit=group, where=f"param group {index}: ")
            _check_base_keys(group, base, f"param group {index}: ")
            _check_base_lr(group, f"param group {index}: ", type(base).__name__)
            _python_numbers(group)
        _python_numbers(base.defaults)
        self.base = base
        # torch's constructor adds every group of the base (the same dicts: our keys land in them),
        # then the wrapper takes the base's list and state themselves, so the two never diverge.
        super().__init__(groups, defaults)
        self.param_groups = base.param_groups
        self.state = base.state
        # The base's defaults beside ours: schedulers read optimizer.defaults (OneCycleLR and
        # CyclicLR look there for "momentum" or "betas" before they cycle them in the groups).
        self.wrapper_defaults = dict(defaults)
        self.defaults = {**base.defaults, **defaults}

    def _validate(self, group: dict[str, Any], *, explicit: dict[str, Any], where: str) -> None:
        # The base's keys (lr, betas, eps…) are the base's to check; only ours (and what looks like
        # them: misspellings, other libraries' names) are checked here.
        ours = {k: v for k, v in explicit.items() if isinstance(k, str) and (
            k.startswith(("trust", "exclude", "centraliz")) or k in FOREIGN_KEYS)}
        super()._validate(group, explicit=ours, where=where)

    def _check_group(self, group: dict[str, Any], *, explicit: dict[str, Any], where: str) -> None:
        pass  # the base's weight decay applies to excluded layers too: nothing to reconcile

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base (which checks its own keys) with the wrapper's keys."""
        if "base" not in self.__dict__ or len(self.param_groups) < len(self.base.param_groups):
            super().add_param_group(param_group)  # the constructor, re-adding the base's groups
            return
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        self._validate({**self.wrapper_defaults, **param_group}, explicit=param_group,
                       where=f"param group {len(self.param_groups)}: ")
        _check_base_keys(param_group, self.base, f"param group {len(self.param_groups)}: ")
        _check_base_lr(param_group if "lr" in param_group else {**self.base.defaults, **param_group},
                       f"param group {len(self.param_groups)}: ", type(self.base).__name__)
        self.base.add_param_group(param_group)
        added = self.base.param_groups[-1]
        _python_numbers(added)
        for key, value in self.wrapper_defaults.items():
            added.setdefault(key, value)
        self._layouts = type(self._layouts)([*self._layouts.candidates, *added["params"]], owner=self.NAME)

    def state_dict(self) -> dict[str, Any]:
        """The base's state dict (the wrapper's keys ride in its groups): it loads into the bare base
        too. The trust ratios of the last step are left out, as by every layer-wise optimizer here."""
        return without_trust_ratios(self.base.state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of the wrapper or of the bare base (then the wrapper's keys stay as they are)."""
        current = [{k: group[k] for k in self.wrapper_defaults} for group in self.param_groups]
        groups = []
        for index, saved in enumerate(state_dict["param_groups"]):
            where = f"loaded param group {index}: "
            saved = {**(current[index] if index < len(current) else {}), **self._translate_loaded(dict(saved), where)}
            self._validate(saved, explicit=saved, where=where)
            groups.append(saved)
        saved = saved_trust_ratios(state_dict, self.param_groups)
        self.base.load_state_dict({**state_dict, "param_groups": groups})
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        restore_trust_ratios(self.state, saved)

    def __getstate__(self) -> dict[str, Any]:
        # torch pickles defaults, state and groups alone; a wrapper is nothing without its base.
        return {**super().__getstate__(), "base": self.base, "wrapper_defaults": self.wrapper_defaults}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.param_groups, self.state = self.base.param_groups, self.base.state

    def __repr__(self) -> str:
        return f"Layerwise({self.base!r})"

    # --- step ------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """Centralise (optionally), step the base, rescale each adapted layer's update."""
        loss = evaluate(closure)
        base_groups = self.base.param_groups
        # DeepSpeed ZeRO-1/2 step one group at a time by swapping the optimizer's group list: the
        # base must see the same list.
        self.base.param_groups = self.param_groups
        # Gradients of the tensors stepped by the known-direction route, hidden from the base's step.
        self._stepped_here: list[tuple[Tensor, Optional[Tensor]]] = []
        try:
            plans = [self._before(group, index) for index, group in enumerate(self.param_groups)]
            self.base.step()
            for group, plan in zip(self.param_groups, plans):
                if plan is not None:
                    plan(group)
                count_group_step(group, self._layouts(group["params"]))
        finally:  # the rescaling plans read no gradient: restoring them here serves success and failure
            for p, grad in self._stepped_here:
                p.grad = grad
            self._stepped_here = []
            self.base.param_groups = base_groups
        return loss

    def _before(self, group: dict[str, Any], index: int) -> Optional[Callable[[dict[str, Any]], None]]:
        """Take what the rescaling needs before the base's step; return the rescaling. The group's
        tensors as the base resolves them: whole ones, local shards of DTensors, or the pieces of a
        flat layout (FSDP1, DeepSpeed ZeRO), whose whole-layer norms take one collective that every
        rank runs, whatever pieces it holds."""
        where = f"param group {index}: "
        tensors = self.resolve(group, where)
        if group["centralize_gradients"]:
            if isinstance(tensors, FlatPieces):
                raise ValueError(f"{where}centralize_gradients needs whole gradients, but {tensors.layout.engine} "
                                 "hands the optimizer flattened pieces of layers. Centralise in a hook before the "
                                 "engine flattens (or use FSDP2, whose row-sharded gradients centralise locally)")
            _centralize(tensors, where)
        adapted = [i for i, excluded in enumerate(tensors.excluded) if not excluded]
        if not adapted and not tensors.needs_collective:
            return None
        params = pick(tensors.owners, adapted)
        local = pick(tensors.params, adapted)
        if isinstance(tensors, WholeTensors) and tensors.norms is None and adapted \
                and all(host_scalars(t.device) and not is_dtensor(t) for t in params):
            grads = pick(tensors.grads, adapted)
            if takes_known_direction(self.base, group, params, grads):
                known_direction_step(self.base, group, params, grads, _host_ratio(group), self._took_ratio,
                                     self._host_scratch())
                for p in params:  # the base steps the group's other tensors only
                    self._stepped_here.append((p, p.grad))
                    p.grad = None
                return None
        old = [t.clone() for t in local]  # the one copy (of the adapted tensors or pieces)
        if isinstance(tensors, WholeTensors):
            dtype, device = ratio_dtype(local[0].dtype), local[0].device
            if tensors.norms is None and all(host_scalars(t.device) for t in local):
                return functools.partial(self._rescale_on_host, params, old)
        else:
            dtype, device = tensors.dtype, tensors.device
        w_squares = _squares(local, dtype, device)

        def rescale(group: dict[str, Any]) -> None:
            if old:
                torch._foreach_sub_(old, local)  # old ← w_old - w_new = -Δw
            w_norms, delta_norms = tensors.reduce(adapted, [w_squares, _squares(old, dtype, device)])
            ratios = self._ratios(group, w_norms, delta_norms)
            if isinstance(tensors, FlatPieces):  # each whole layer's ratio, for the monitor
                assert tensors.layer_norms is not None
                self._keep_flat_ratios(tensors.layout, self._ratios(group, *tensors.layer_norms),
                                       tensors.adapted_layers)
            else:
                for p, ratio in zip(params, ratios.unbind()):
                    self._trust_ratio_slot(p).copy_(ratio)
                if self.collects_norms:  # a monitor records this step: ‖w‖ before the update is taken
                    self._hand_norms(params, w_norms.unbind())
            if local:
                _add_scaled_(local, old, 1.0 - ratios)  # w ← w_new + (1 - r)·(w_old - w_new) = w_old + r·Δw

        return rescale

    def _rescale_on_host(self, params: list[Tensor], old: list[Tensor], group: dict[str, Any]) -> None:
        """The CPU path of the rescaling: each tensor's norms, ratio (a Python float) and update back
        to back, while its memory is in cache (on the CPU a host read costs nothing)."""
        lr = group["lr"].item() if isinstance(group["lr"], Tensor) else group["lr"]
        rule = _host_ratio(group)
        for p, o in zip(params, old):
            w_norm = host_norm(o)
            o.sub_(p)  # w_old - w_new = -Δw
            delta_norm = host_norm(o)
            ratio = rule(w_norm, delta_norm / lr if lr != 0 else delta_norm)
            self._took_ratio(p, w_norm, ratio)
            p.add_(o, alpha=1.0 - ratio)  # w_old + r·Δw

    def _took_ratio(self, p: Tensor, w_norm: float, ratio: float) -> None:
        """Keep the ratio a CPU route took for ``p``, and hand ``‖w‖`` to a monitor recording this step."""
        self._trust_ratio_slot(p).fill_(ratio)
        if self.collects_norms:  # ‖w‖ before the update is taken
            self._hand_norms([p], [w_norm])

    def _ratios(self, group: dict[str, Any], w_norms: Tensor, delta_norms: Tensor) -> Tensor:
        """:func:`trust_ratio` of ``‖w‖`` and the base's direction ``‖Δw‖/lr`` (a layer the base did
        not move has direction 0 whatever ``lr``, even 0).

        At ``lr = 0`` the ratio is 0: every adapted layer stays where it was, even where the base
        moves without regard to ``lr`` (Rprop's own step sizes, ASGD's averaging). That is the limit
        of ``r·Δw`` as ``lr`` goes to 0 for a fixed ``Δw``, and what a schedule ending at 0 asks for;
        NaN stays reserved for NaN or inf norms."""
        lr = group["lr"]
        if isinstance(lr, (int, float)) and lr == 0:
            return torch.where(torch.isfinite(w_norms) & torch.isfinite(delta_norms), 0.0, torch.nan)
        d_norms = torch.where(delta_norms == 0, 0.0, delta_norms / lr)
        ratios = trust_ratio(w_norms, d_norms, trust_coefficient=group["trust_coefficient"], weight_decay=0.0,
                             eps=group["trust_eps"], lr=lr, trust_clip=group["trust_clip"])
        if isinstance(lr, Tensor):  # a scheduled tensor lr at 0: decided on the device, no host read
            stays = torch.where(torch.isfinite(w_norms) & torch.isfinite(delta_norms), 0.0, torch.nan)
            ratios = torch.where(lr == 0, stays, ratios)
        return ratios


def _host_ratio(group: dict[str, Any]) -> Callable[[float, float], float]:
    """:meth:`Layerwise._ratios` for one layer's ``‖w‖`` and direction norm ``‖Δw‖/lr`` as Python
    floats (the CPU routes): LARS's trust ratio without decay, as a :class:`cpu_kernels.TrustRatio`
    (which Numba's loops compute too), or at ``lr = 0`` the ratio 0 of :meth:`Layerwise._ratios`."""
    lr = group["lr"].item() if isinstance(group["lr"], Tensor) else group["lr"]
    if lr == 0:
        return _not_moving
    return cpu_kernels.TrustRatio(group["trust_coefficient"], 0.0, group["trust_eps"], lr, group["trust_clip"])


def _not_moving(w_norm: float, d_norm: float) -> float:
    """The ratio at ``lr = 0`` (see :meth:`Layerwise._ratios`): 0, NaN only from NaN or inf norms."""
    return 0.0 if math.isfinite(w_norm) and math.isfinite(d_norm) else math.nan


def _centralize(tensors: WholeTensors, where: str) -> None:
    """Gradient Centralization of the gradients of multi-dimensional parameters, on their local
    tensors: a DTensor's rows must be whole on a rank (``Shard(0)`` or ``Replicate``)."""
    grads = []
    for p, grad in zip(tensors.owners, tensors.grads):
        if len(layer_shape(p)) <= 1:
            continue
        if is_dtensor(p) and any(not (pl.is_replicate() or (pl.is_shard() and pl.dim == 0))
                                 for pl in p.placements):  # type: ignore[attr-defined]
            raise ValueError(f"{where}centralize_gradients needs each gradient's rows whole on a rank; a "
                             f"parameter has placements {p.placements}")  # type: ignore[attr-defined]
        grads.append(grad)
    centralize_gradients_(grads)


def _check_base_keys(group: dict[str, Any], base: Optimizer, where: str) -> None:
    """A group key that is a short form, prefix or misspelling of one of the base's keys (``wd``,
    ``beta1``, ``momentu``) is refused: the base, as every torch optimizer, would keep it and
    ignore it."""
    known = [k for k in base.defaults if isinstance(k, str)]
    for key in group:
        if not isinstance(key, str) or key in known or key.startswith(("trust", "exclude", "centraliz")):
            continue
        meant = meant_key(key, known)
        if meant:
            name = type(base).__name__
            raise TypeError(f"{where}unknown {name} key {key!r}; did you mean {' or '.join(repr(k) for k in meant)}? "
                            f"{name} would ignore it (torch keeps any key in a group): give the full name, or another "
                            "name to a key of your own")


def _python_numbers(group: dict[str, Any]) -> None:
    """The base's NumPy scalars (``lr=np.float64(0.1)``) as Python numbers, as the wrapper's own keys
    are: a checkpoint holding a NumPy scalar does not load under ``torch.load(weights_only=True)``."""
    for key, value in group.items():
        if is_foreign_number(value):
            group[key] = int(value) if isinstance(value, numbers.Integral) else float(value)


def _check_base_lr(group: dict[str, Any], where: str, base: str) -> None:
    """The ratio divides the base's update by its lr: a group without a numeric lr is refused
    before any step (transformers' Adafactor leaves lr=None and computes its own step size)."""
    lr = group.get("lr")
    if isinstance(lr, Tensor) or (isinstance(lr, (int, float)) and not isinstance(lr, bool)):
        return
    hint = (" (transformers' Adafactor: pass lr=1e-3, relative_step=False, scale_parameter=False, "
            "warmup_init=False)" if base == "Adafactor" else "")
    raise ValueError(f"{where}the base {base} has lr={lr!r}; Layerwise needs a number (or 0-d tensor) lr, since "
                     f"the trust ratio measures the base's update in units of lr{hint}")


def _squares(tensors: list[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    if not tensors:  # a rank holding no adapted piece of a flat layout still takes part in its collective
        return torch.zeros(0, dtype=dtype, device=device)
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype)).square()


def _add_scaled_(ys: list[Tensor], xs: list[Tensor], scales: Tensor) -> None:
    """``y += s·x`` per pair with ``s`` from the vector ``scales`` (0-d views, no host read, no index
    tensor), one foreach call per device/dtype bucket."""
    factors = scales.unbind()
    for idx in buckets(ys).values():
        torch._foreach_addcmul_([ys[i] for i in idx], [xs[i] for i in idx], [factors[i] for i in idx])


class LayerwiseAdamW(Layerwise):
    """``Layerwise(torch.optim.AdamW(params, ...))`` as one class: the registry's ``layerwise_adamw``,
    and a class path for LightningCLI (``--optimizer lars_plugins.LayerwiseAdamW``).

    ``trust_coefficient`` defaults to 1: each adapted layer then moves by ``lr`` of its norm per step,
    LAMB's scale (with ``trust_eps=0`` it is LAMB, as docs/optimizers.md shows); AdamW's own options
    keep AdamW's defaults.
    """

    OPTIONS = {**Layerwise.OPTIONS, "trust_coefficient": Option(real(low_open=True), 1.0)}

    def __init__(
        self,
        params: ParamsT,
        lr: Union[float, Tensor] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        amsgrad: bool = False,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        trust_coefficient: float = 1.0,
        trust_eps: float = 1e-8,
        trust_clip: bool = False,
        exclude_bias_and_norm: bool = True,
        centralize_gradients: bool = False,
    ) -> None:
        super().__init__(torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                           amsgrad=amsgrad, maximize=maximize, foreach=foreach),
                         trust_coefficient=trust_coefficient, trust_eps=trust_eps, trust_clip=trust_clip,
                         exclude_bias_and_norm=exclude_bias_and_norm, centralize_gradients=centralize_gradients)
