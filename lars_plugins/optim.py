"""``LARS``: Layer-wise Adaptive Rate Scaling as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import difflib
import math
import numbers
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from .distributed import ShardedNorms, is_dtensor, like_param, to_local
from .functional import lars, ratio_dtype, trust_ratio
from .layouts import FlatLayout, LayoutResolver, layer_shape

__all__ = ["LARS", "VARIANTS"]

# The names frameworks select LARS by (timm's family, kept by the timm and HF integrations alike),
# with the LARS keywords each one implies.
VARIANTS: dict[str, dict[str, Any]] = {
    "lars": {},
    "larc": {"trust_clip": True},
    "nlars": {"nesterov": True},
    "nlarc": {"nesterov": True, "trust_clip": True},
}

ParamsT = Union[Iterable[Tensor], Iterable[dict[str, Any]], Iterable[tuple[str, Tensor]]]

# Names other LARS implementations use for our group keys: a group that carries one of them would
# otherwise be silently ignored, so it is refused with the right name.
_FOREIGN_KEYS = {
    "trust_coeff": "trust_coefficient",
    "eta": "trust_coefficient",
    "always_adapt": "lars_exclude",
    "exclude_from_adaptation": "lars_exclude",
    "lars_adaptation_filter": "lars_exclude",
    "clip": "trust_clip",
}


class LARS(Optimizer):
    r"""LARS (You, Gitman & Ginsburg 2017, arXiv:1708.03888) with torch.optim.SGD's momentum.

    For every parameter ``w`` with gradient ``g``:

    * adapted: ``d = ratio·(g + wd·w)`` with ``ratio = η·‖w‖ / (‖g‖ + wd·‖w‖ + ε)`` (paper Eq. 6);
      with ``trust_clip`` (LARC clip mode) ``ratio = min(ratio / lr, 1)``;
    * excluded: ``d = g`` (no adaptation and no weight decay);

    then exactly torch.optim.SGD: ``buf = momentum·buf + (1 - dampening)·d`` (the first buffer is
    ``d``), Nesterov ``d = d + momentum·buf`` else ``d = buf``, and ``w -= lr·d``.

    Adaptation never depends on ``weight_decay``: ``weight_decay=0`` is still LARS. A group's
    ``lars_exclude`` key (``True``/``False``) decides exclusion; where it is ``None`` (the default)
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
        exclude_bias_and_norm: exclude ``ndim <= 1`` tensors in groups without ``lars_exclude``.
        maximize: maximise the objective instead of minimising it.
        foreach: ``True`` multi-tensor, ``False`` single-tensor, ``None`` chooses by device.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: Union[float, Tensor] = 0.1,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        trust_clip: bool = False,
        exclude_bias_and_norm: bool = True,
        maximize: bool = False,
        foreach: Optional[bool] = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            trust_coefficient=trust_coefficient,
            eps=eps,
            trust_clip=trust_clip,
            lars_exclude=None,
            exclude_bias_and_norm=exclude_bias_and_norm,
            maximize=maximize,
            foreach=foreach,
        )
        _validate_group(defaults, explicit=defaults, where="")
        _to_python_numbers(defaults)
        # The tensors the optimizer was built with, in an order every rank shares: the layers of
        # flat layouts (DeepSpeed swaps its partitions into the groups after construction).
        self._layouts = LayoutResolver([])
        self._flat_ratios: dict[int, Tensor] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; every LARS key may be overridden per group and is validated here, before the
        group is added: a refused group leaves the optimizer as it was."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        explicit = dict(param_group)
        where = f"param group {len(self.param_groups)}: "
        _validate_group({**self.defaults, **explicit}, explicit=explicit, where=where)
        _to_python_numbers(param_group)
        super().add_param_group(param_group)
        self._layouts = LayoutResolver([*self._layouts.candidates, *self.param_groups[-1]["params"]])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # load_state_dict() comes through here too, and must keep the tensors the optimizer was built
        # with (DeepSpeed has swapped its partitions into the groups by then). Only an unpickled copy
        # (torch pickles defaults, state and groups alone) rebuilds them from its groups.
        if not hasattr(self, "_layouts"):
            self._layouts = LayoutResolver([p for group in self.param_groups for p in group["params"]])
            self._flat_ratios: dict[int, Tensor] = {}
        for group in self.param_groups:
            for key, value in (("lars_exclude", None), ("exclude_bias_and_norm", True), ("maximize", False),
                               ("foreach", None), ("trust_clip", False), ("nesterov", False)):
                group.setdefault(key, value)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict, ours or one saved by timm's ``Lars`` (same ``momentum_buffer`` state).

        Hyperparameters come from the checkpoint, as in torch; a timm checkpoint's ``trust_coeff`` is
        read as ``trust_coefficient``, and its ``always_adapt`` is dropped: which tensors are adapted
        stays as this optimizer's groups say (timm adapted only groups with weight decay).
        LARS keys the checkpoint lacks are kept from this optimizer's groups. Trust ratios keep their
        float32 precision under half-precision parameters.
        """
        groups = []
        for saved, current in zip(state_dict["param_groups"], self.param_groups):
            saved = dict(saved)
            if "trust_coeff" in saved:
                saved.setdefault("trust_coefficient", saved.pop("trust_coeff"))
            saved.pop("always_adapt", None)
            for key, value in current.items():
                if key != "params":
                    saved.setdefault(key, value)
            groups.append(saved)
        # The constructor's checks, on what is loaded: a checkpoint must not bring in what the
        # constructor refuses (trust_coefficient=0, lr=-1, lars_exclude="yes", momentum=nan).
        for index, group in enumerate(groups):
            _validate_group(group, explicit=group, where=f"loaded param group {index}: ", loaded=True)
            _to_python_numbers(group)
        # A length mismatch is left to torch, which explains it.
        groups += state_dict["param_groups"][len(groups):]
        super().load_state_dict({**state_dict, "param_groups": groups})
        # torch casts every state tensor to its parameter's dtype; a ratio is a statistic, not a weight.
        for p, state in self.state.items():
            if "trust_ratio" in state:
                state["trust_ratio"] = state["trust_ratio"].to(ratio_dtype(p.dtype))

    @staticmethod
    def is_adapted(group: dict[str, Any], param: Union[Tensor, torch.Size]) -> bool:
        """Whether ``param`` in ``group`` gets the layer-wise rate (else: plain SGD, no weight decay).

        ``param`` may be a parameter (its whole shape counts: ZeRO-3's ``ds_shape``) or a layer's shape.
        """
        if group["lars_exclude"] is not None:
            return not group["lars_exclude"]
        shape = param if isinstance(param, torch.Size) else layer_shape(param)
        return not (group["exclude_bias_and_norm"] and len(shape) <= 1)

    def layer_trust_ratios(self, group: dict[str, Any]) -> Optional[tuple[FlatLayout, Tensor]]:
        """For a group stepped through a flat layout (FSDP1, DeepSpeed ZeRO): the layout and the
        ratio of each of its layers at the last step (NaN for excluded layers); else ``None``."""
        layout = self.layout(group)
        if layout is None or id(layout) not in self._flat_ratios:
            return None
        return layout, self._flat_ratios[id(layout)]

    def layout(self, group: dict[str, Any]) -> Optional[FlatLayout]:
        """The flat layout (FSDP1, DeepSpeed ZeRO) of ``group``'s current tensors, or ``None``."""
        return self._layouts(group["params"])

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """Perform one step; ``closure`` (re-evaluating the loss) is called first and its loss returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for index, group in enumerate(self.param_groups):
            layout = self._layouts(group["params"], f"param group {index}: ")
            if layout is not None:
                self._flat_step(group, layout)
                continue
            params: list[Tensor] = []
            grads: list[Tensor] = []
            buffers: list[Optional[Tensor]] = []
            ratios: list[Optional[Tensor]] = []
            adapt: list[bool] = []
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                state = self.state[p]
                adapted = self.is_adapted(group, p)
                if adapted and "trust_ratio" not in state:
                    state["trust_ratio"] = torch.zeros((), dtype=ratio_dtype(p.dtype), device=p.device)
                params.append(p)
                grads.append(grad)
                buffers.append(state.get("momentum_buffer"))
                ratios.append(state["trust_ratio"] if adapted else None)
                adapt.append(adapted)
            if not params:
                continue
            # Sharded parameters (FSDP2, tensor parallel): the update runs on the local shards, the
            # norms of whole parameters come from one all_reduce per bucket and mesh dimension.
            owners, norms = params, None
            if any(is_dtensor(p) for p in params):
                norms = ShardedNorms(params, where=f"param group {index}: ")
                params, grads = [to_local(p) for p in params], [to_local(g) for g in grads]
                buffers = [None if b is None else to_local(b) for b in buffers]
            new_buffer = [b is None for b in buffers]
            lars(
                params,
                grads,
                buffers,
                ratios,
                adapt,
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
                norms=norms,
            )
            if group["momentum"] != 0:
                for p, buf, new in zip(owners, buffers, new_buffer):
                    if new:  # an existing buffer was updated in place (a DTensor's local shard too)
                        self.state[p]["momentum_buffer"] = like_param(buf, p)
        return loss

    def _flat_step(self, group: dict[str, Any], layout: FlatLayout) -> None:
        """One step of a group whose tensors hold pieces of layers (FSDP1, DeepSpeed ZeRO).

        Whole-layer norms come first, for every layer of the layout, in one collective that every
        rank runs whatever pieces it holds; the update then runs on the pieces, as views.
        """
        tensors = group["params"]
        grads = [t.grad for t in tensors]
        values, grad_views = layout.views(tensors), layout.views(grads)
        adapted = [self.is_adapted(group, layer.shape) for layer in layout.layers]
        dtype, device = ratio_dtype(tensors[0].dtype), tensors[0].device
        if any(adapted):  # decided by the layout alone: the same on every rank
            w_norms, g_norms, _ = layout.norms(values, grad_views, dtype=dtype, device=device)
            ratios = trust_ratio(w_norms, g_norms, trust_coefficient=group["trust_coefficient"],
                                 weight_decay=group["weight_decay"], eps=group["eps"], lr=group["lr"],
                                 trust_clip=group["trust_clip"])
            self._flat_ratios[id(layout)] = torch.where(layout.constant(adapted, device), ratios, torch.nan)
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
        lars([values[j] for j in kept], [grad_views[j] for j in kept], piece_buffers,
             [r if a else None for r, a in zip(scratch, adapt)], adapt,
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
                        if flat_views[j] is not None:
                            flat_views[j].copy_(buf)
                    self.state[tensor]["momentum_buffer"] = flat


# Keys torch and the integrations put on groups besides ours; a key close to one of ours is a typo.
_LARS_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "trust_coefficient", "eps", "trust_clip",
              "lars_exclude", "exclude_bias_and_norm", "maximize", "foreach")
_NUMBERS = ("lr", "momentum", "dampening", "weight_decay", "eps", "trust_coefficient")


def _to_python_numbers(group: dict[str, Any]) -> None:
    """NumPy and other ``numbers.Real`` scalars become Python floats (as torch's SGD accepts them)."""
    for key in _NUMBERS:
        value = group.get(key)
        if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
            group[key] = float(value)


def _validate_group(group: dict[str, Any], *, explicit: dict[str, Any], where: str, loaded: bool = False) -> None:
    """Raise ``ValueError``/``TypeError`` naming the first bad hyperparameter of ``group``."""
    for foreign, ours in _FOREIGN_KEYS.items():
        if foreign in explicit and not loaded:
            raise TypeError(f"{where}unknown LARS key {foreign!r}; lars_plugins.LARS calls it {ours!r}")
    for key in explicit:
        if isinstance(key, str) and key not in _LARS_KEYS:
            close = difflib.get_close_matches(key, _LARS_KEYS, n=1, cutoff=0.85)
            if close:
                raise TypeError(f"{where}unknown LARS key {key!r}; did you mean {close[0]!r}?")

    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.ndim != 0:
            raise ValueError(f"{where}lr must be a number or a 0-d tensor, got shape {tuple(lr.shape)}; "
                             "pass lr.reshape(()) for a one-element tensor")
        _number(where, "lr", float(lr), low=0.0)  # reading it here, at construction, costs no step a sync
    else:
        _number(where, "lr", lr, low=0.0)
    _number(where, "momentum", group["momentum"], low=0.0)
    _number(where, "dampening", group["dampening"], low=0.0, high=1.0)
    _number(where, "weight_decay", group["weight_decay"], low=0.0)
    _number(where, "eps", group["eps"], low=0.0)
    _number(where, "trust_coefficient", group["trust_coefficient"], low=0.0, low_open=True)
    for key in ("nesterov", "trust_clip", "exclude_bias_and_norm", "maximize"):
        if not isinstance(group[key], bool):
            raise TypeError(f"{where}{key} must be a bool, got {group[key]!r}")
    for key in ("lars_exclude", "foreach"):
        if group[key] is not None and not isinstance(group[key], bool):
            raise TypeError(f"{where}{key} must be True, False or None, got {group[key]!r}")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(
            f"{where}nesterov=True needs momentum > 0 and dampening == 0, "
            f"got momentum={group['momentum']} and dampening={group['dampening']}"
        )
    if explicit.get("lars_exclude") is True and explicit.get("weight_decay", 0) != 0:
        raise ValueError(
            f"{where}lars_exclude=True with weight_decay={explicit['weight_decay']}: excluded parameters get "
            "no weight decay (d = g), so this weight_decay would be ignored; set it to 0 or adapt the group"
        )


def _number(where: str, name: str, value: Any, *, low: float, high: float = math.inf, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    too_low = value <= low if low_open else value < low
    if too_low or value > high or not math.isfinite(value):
        low_text = f"> {low}" if low_open else f">= {low}"
        high_text = " and finite" if high == math.inf else f" and <= {high}"
        raise ValueError(f"{where}{name} must be {low_text}{high_text}, got {value}")
