"""What every layer-wise optimizer here shares: group keys and their checks, exclusion, the layouts
of sharded engines, and the trust ratios they keep.

:class:`LayerwiseOptimizer` is the base of :class:`~lars_plugins.LARS`, :class:`~lars_plugins.LAMB`
and the :class:`~lars_plugins.Layerwise` wrapper. A subclass declares its options
(:class:`~lars_plugins.options.Option`) and steps one group at a time; the base resolves whether a group holds whole
parameters (plain tensors, DTensors) or pieces of flattened ones (FSDP1, DeepSpeed ZeRO), decides
exclusion from whole-parameter shapes, and keeps the per-layer ratios of flat groups for
:class:`~lars_plugins.TrustRatioMonitor`.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT

from .distributed import WholeTensors, like_param, like_param_rows, shards_beyond_first_dimension, to_local
from .options import (FOREIGN_KEYS, Check, ForeignKey, Option, foreign_message, is_foreign_number, meant_key,
                      translate_foreign)
from .cpu_directions import Scratch
from .tensor_lists import ratio_dtype
from .layouts import FlatLayout, FlatPieces, LayoutResolver, NarrowPlan, layer_shape
from .state_precision import SCALE_SUFFIX, UNCODED_SUFFIX, StateCodec, form_of, int8_blocks, int8_coded, stored_form

__all__ = ["LayerwiseOptimizer", "ForeignKey", "FOREIGN_KEYS", "translate_foreign", "count_group_step"]


def evaluate(closure: Optional[Callable[[], float]]) -> Optional[float]:
    """Run a ``step()`` closure with gradients enabled (``step()`` runs under ``no_grad``); its loss."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def without_trust_ratios(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` without the ``trust_ratio`` entries of its per-parameter state."""
    state = {key: {k: v for k, v in entry.items() if k != "trust_ratio"} if isinstance(entry, dict) else entry
             for key, entry in state_dict["state"].items()}
    return {**state_dict, "state": state}


def saved_entries(state_dict: dict[str, Any], param_groups: list[dict[str, Any]]) -> Iterator[tuple[Tensor, dict]]:
    """Each saved per-parameter state entry with the parameter it will belong to, matched as torch
    matches them: group by group, in order."""
    for saved_group, group in zip(state_dict["param_groups"], param_groups):
        for key, p in zip(saved_group["params"], group["params"]):
            entry = state_dict["state"].get(key)
            if isinstance(entry, dict):
                yield p, entry


def saved_trust_ratios(state_dict: dict[str, Any], param_groups: list[dict[str, Any]]) -> dict[Tensor, Tensor]:
    """The ratios a state dict holds, by the parameter they will belong to, taken before torch casts
    them to the parameters' dtype."""
    return {p: entry["trust_ratio"] for p, entry in saved_entries(state_dict, param_groups)
            if isinstance(entry.get("trust_ratio"), Tensor)}


def restore_trust_ratios(state: dict[Tensor, dict[str, Any]], saved: dict[Tensor, Tensor]) -> None:
    """Put the saved ratios back in their own precision (torch has cast a float16 model's to float16:
    199725.6 to inf): a ratio is a statistic in at least float32, not a weight."""
    for p, ratio in saved.items():
        if p in state:
            state[p]["trust_ratio"] = ratio.to(device=p.device, dtype=ratio_dtype(p.dtype))


def saved_narrow_state(state_dict: dict[str, Any], param_groups: list[dict[str, Any]],
                       keys: Iterable[str]) -> dict[Tensor, dict[str, Tensor]]:
    """The narrow state a state dict holds (bfloat16 tensors, 8-bit codes and their scales), by the
    parameter it will belong to, taken before torch casts every floating state to the parameter's
    dtype and 8-bit codes to numbers."""
    names = {name for key in keys for name in (key, key + SCALE_SUFFIX)}
    found: dict[Tensor, dict[str, Tensor]] = {}
    for p, entry in saved_entries(state_dict, param_groups):
        kept = {name: value for name, value in entry.items() if name in names and isinstance(value, Tensor)
                and (value.dtype in (torch.uint8, torch.bfloat16) or name.endswith(SCALE_SUFFIX))}
        if kept:
            found[p] = kept
    return found


def restore_narrow_state(state: dict[Tensor, dict[str, Any]], saved: dict[Tensor, dict[str, Tensor]]) -> None:
    """Put the saved narrow state back as it was stored (on the parameter's device)."""
    for p, entries in saved.items():
        if p in state:
            state[p].update({name: value.to(device=p.device) for name, value in entries.items()})


def count_group_step(group: dict[str, Any], layout: Optional[FlatLayout]) -> None:
    """Under DeepSpeed ZeRO-1/2, a ``step`` per param group: DeepSpeed's elastic checkpoints save it
    and, on loading, refuse a checkpoint without it (they were written for optimizers that keep one
    per group). Nothing here reads it; LAMB's counts are per parameter."""
    if layout is not None and layout.engine == "DeepSpeed ZeRO-1/2":
        group["step"] = group.get("step", 0) + 1


class LayerwiseOptimizer(Optimizer):
    """Base of the optimizers that give each layer (whole original parameter) its own rate.

    Subclasses declare :attr:`OPTIONS` (group key -> :class:`Option`), from which :attr:`KEYS` (the
    checks) and :attr:`LOADED_DEFAULTS` (for checkpoints without a key) follow, build their defaults
    with :meth:`declared_defaults`, and implement one tensor-level :meth:`_step_group` over the
    group as :meth:`resolve` gives it (whole tensors, DTensors as their local shards, or the pieces of
    an FSDP1/ZeRO :class:`FlatLayout`, each with its whole-layer norms) and :meth:`_layer_ratios`. Exclusion:
    a group's ``exclude`` decides where it is not ``None``; else ``exclude_bias_and_norm``
    excludes tensors whose whole shape has ``ndim <= 1``.
    """

    NAME: ClassVar[str] = "layer-wise"
    # Where a step hands (‖w‖, ‖g‖ or None) of its adapted parameters, as it took them, on the steps
    # a monitor records (hand_norms_to); None otherwise.
    _norm_sink: Optional[dict[Tensor, tuple[Any, Any]]] = None
    HANDS_NORMS: ClassVar[bool] = False  # whether a step of whole tensors hands its norms (_hand_norms)
    OPTIONS: ClassVar[dict[str, Option]] = {}
    # Derived from OPTIONS (__init_subclass__): each key's check, and the value a checkpoint that lacks
    # the key is read with (the default, which behaves as versions before the key did).
    KEYS: ClassVar[dict[str, Check]] = {}
    LOADED_DEFAULTS: ClassVar[dict[str, Any]] = {}
    # The per-parameter state a group's ``state_precision`` narrows: key -> whether 8-bit codes hold its
    # square root (Adam's second moment).
    NARROW_STATE: ClassVar[dict[str, bool]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.KEYS = {key: option.check for key, option in cls.OPTIONS.items()}
        cls.LOADED_DEFAULTS = {key: option.default for key, option in cls.OPTIONS.items()}

    @classmethod
    def declared_defaults(cls, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """The defaults dict of a constructor whose keywords are ``arguments`` (its ``locals()``):
        every declared option, from ``arguments`` where it is a keyword, else its default."""
        return {key: arguments[key] if option.keyword else option.default for key, option in cls.OPTIONS.items()}

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        self._validate(defaults, explicit=defaults, where="")
        self._to_python_numbers(defaults)
        # The tensors the optimizer was built with, in an order every rank shares: the layers of
        # flat layouts (DeepSpeed swaps its partitions into the groups after construction).
        self._layouts = LayoutResolver([], owner=self.NAME)
        self._flat_ratios: dict[int, Tensor] = {}
        self._codec = StateCodec()
        super().__init__(params, defaults)

    # --- groups ----------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; every key may be overridden per group and is validated here, before the
        group is added: a refused group leaves the optimizer as it was."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        explicit = dict(param_group)
        where = f"param group {len(self.param_groups)}: "
        self._validate({**self.defaults, **explicit}, explicit=explicit, where=where)
        self._to_python_numbers(param_group)
        super().add_param_group(param_group)
        self._check_fused(self.param_groups[-1], where)
        self._check_state_precision(self.param_groups[-1], where)
        self._layouts = LayoutResolver([*self._layouts.candidates, *self.param_groups[-1]["params"]],
                                       owner=self.NAME)

    def _validate(self, group: dict[str, Any], *, explicit: dict[str, Any], where: str) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first bad key of ``group``."""
        for name in explicit:
            foreign = FOREIGN_KEYS.get(name) if isinstance(name, str) else None
            if foreign is not None and foreign.ours in self.KEYS:
                raise TypeError(foreign_message(where, name, foreign, f"lars_plugins.{type(self).__name__}"))
        for key in explicit:
            if isinstance(key, str) and key not in self.KEYS:
                meant = meant_key(key, self.KEYS)
                if meant:
                    raise TypeError(f"{where}unknown {self.NAME} key {key!r}; did you mean "
                                    f"{' or '.join(repr(k) for k in meant)}? {self.NAME} would ignore it (torch keeps "
                                    "any key in a group): give the full name, or another name to a key of your own")
        for key, check in self.KEYS.items():
            if key in group:
                check(where, key, group[key])
        self._check_group(group, explicit=explicit, where=where)

    def _check_fused(self, group: dict[str, Any], where: str) -> None:
        """``fused=True`` is refused at construction where the fused step cannot run (the device,
        dtype or Triton), rather than at the first step."""
        if "fused" not in self.KEYS or group.get("fused") is not True:
            return
        from .fused import unsupported

        reason = unsupported([[p] for p in group["params"]])
        if reason is not None:
            raise ValueError(f"{where}fused=True, but {type(self).__name__}'s fused step cannot run here: {reason}. "
                             "Pass fused=None (the default) to take the fastest path available, or move the model "
                             "to a CUDA device before building the optimizer")

    def _check_state_precision(self, group: dict[str, Any], where: str) -> None:
        """``state_precision='bfloat16'`` is refused for 16-bit parameters, whose state is 16-bit already."""
        if group.get("state_precision") != "bfloat16":
            return
        for p in group["params"]:
            if p.dtype in (torch.bfloat16, torch.float16):
                raise ValueError(f"{where}state_precision='bfloat16' with a {p.dtype} parameter: its state is "
                                 "stored in the parameter's dtype already (state_precision='float32', the default, "
                                 "keeps it so); use 'int8' for smaller state, or float32 parameters")

    def _check_group(self, group: dict[str, Any], *, explicit: dict[str, Any], where: str) -> None:
        """Checks across keys (after each key passed its own)."""
        precision = group.get("state_precision", "float32")
        if precision != "float32" and group.get("fused") is True:
            raise ValueError(f"{where}fused=True with state_precision={precision!r}: the fused CUDA step keeps "
                             "float32 state; pass fused=None (the default), which takes the unfused step that "
                             "decodes and encodes narrow state, or state_precision='float32'")
        if "fused" in self.KEYS and group.get("fused") and group.get("foreach"):
            raise ValueError(f"{where}fused=True and foreach=True: choose one (fused=True takes the fused "
                             "CUDA step, foreach=True the multi-tensor one)")
        if explicit.get("exclude") is True and explicit.get("weight_decay", 0) != 0:
            raise ValueError(
                f"{where}exclude=True with weight_decay={explicit['weight_decay']}: excluded parameters get "
                "no weight decay, so this weight_decay would be ignored; set it to 0 or adapt the group")

    def _to_python_numbers(self, group: dict[str, Any]) -> None:
        """NumPy and other ``numbers.Real`` scalars of numeric keys become Python floats (as torch's
        optimizers accept them; :func:`~lars_plugins.options.is_foreign_number`)."""
        for key, check in self.KEYS.items():
            value = group.get(key)
            if getattr(check, "is_number", False) and is_foreign_number(value):
                group[key] = float(value)

    # --- state -----------------------------------------------------------------------------------

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # load_state_dict() comes through here too, and must keep the tensors the optimizer was built
        # with (DeepSpeed has swapped its partitions into the groups by then). Only an unpickled copy
        # (torch pickles defaults, state and groups alone) rebuilds them from its groups.
        if not hasattr(self, "_layouts"):
            self._layouts = LayoutResolver([p for group in self.param_groups for p in group["params"]],
                                           owner=self.NAME)
            self._flat_ratios = {}
        if not hasattr(self, "_codec"):
            self._codec = StateCodec()
        for group in self.param_groups:
            for key, value in self.LOADED_DEFAULTS.items():
                group.setdefault(key, value)

    def _translate_loaded(self, saved: dict[str, Any], where: str) -> dict[str, Any]:
        """A saved group in this optimizer's keys: other libraries' names (timm's ``trust_coeff``,
        ``always_adapt``) translated from :data:`FOREIGN_KEYS`, pairs back from JSON/YAML lists."""
        saved = translate_foreign(saved, self.KEYS, where=where, owner=f"lars_plugins.{type(self).__name__}")
        for key, check in self.KEYS.items():
            if getattr(check, "is_pair", False) and isinstance(saved.get(key), list):
                saved[key] = tuple(saved[key])
        return saved

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict without the trust ratios of the last step: they are statistics that
        every step computes afresh, not state a resumed run needs, and FSDP1 and ZeRO keep them per
        layer outside the per-tensor state, so leaving them out lets a checkpoint move between
        layouts (FSDP1, FSDP2, one process). Narrow state (``state_precision``) is saved as stored,
        with the stochastic-rounding generators' states under ``"state_precision_rng"``, except 8-bit
        state of flat tensors (FSDP1, ZeRO), saved as its float32 values."""
        saved = without_trust_ratios(super().state_dict())
        self._flat_codes_as_values(saved)
        generators = self._codec.generator_states()
        if generators:
            saved["state_precision_rng"] = generators
        return saved

    def _flat_codes_as_values(self, saved: dict[str, Any]) -> None:
        """8-bit state of flat tensors (FSDP1, ZeRO) saved as the float32 values it holds: the engines
        gather, slice and re-partition saved state element by element, which codes with per-block
        scales would not survive. Loading codes it again, to the same codes."""
        for saved_group, group in zip(saved["param_groups"], self.param_groups):
            coded = [(index, p, saved["state"][key]) for index, (key, p) in
                     enumerate(zip(saved_group["params"], group["params"]))
                     if any(name.endswith(SCALE_SUFFIX) for name in saved["state"].get(key, {}))]
            layout = self.layout(group) if coded else None
            if layout is None:
                continue
            for index, p, entry in coded:  # each a copy of the optimizer's entry (without_trust_ratios)
                for name, squared in self.NARROW_STATE.items():
                    if form_of(entry, name, p.dtype) == "int8":
                        entry[name] = self._decode_flat(entry[name], entry.pop(name + SCALE_SUFFIX),
                                                        entry.pop(name + UNCODED_SUFFIX), p.dtype, squared, layout,
                                                        index)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict. Hyperparameters come from the checkpoint, as in torch, and pass the
        constructor's checks; keys it lacks are kept from this optimizer's groups. ``state_precision``
        is this optimizer's: state saved in another precision is converted to it (to nearest). Trust ratios in
        the checkpoint (written by versions that saved them) keep their float32 precision under
        half-precision parameters."""
        groups = []
        for index, (saved, current) in enumerate(zip(state_dict["param_groups"], self.param_groups)):
            where = f"loaded param group {index}: "
            saved = self._translate_loaded(dict(saved), where)
            for key, value in current.items():
                if key != "params":
                    saved.setdefault(key, value)
            if "state_precision" in current:  # how this optimizer stores state, not a hyperparameter of the run:
                saved["state_precision"] = current["state_precision"]  # the checkpoint is converted to it
            # A checkpoint must not bring in what the constructor refuses (lr=-1, momentum=nan).
            self._validate(saved, explicit=saved, where=where)
            self._to_python_numbers(saved)
            groups.append(saved)
        # A length mismatch is left to torch, which explains it.
        groups += state_dict["param_groups"][len(groups):]
        saved = saved_trust_ratios(state_dict, self.param_groups)
        narrow = saved_narrow_state(state_dict, self.param_groups, self.NARROW_STATE)
        super().load_state_dict({**state_dict, "param_groups": groups})
        restore_trust_ratios(self.state, saved)
        restore_narrow_state(self.state, narrow)
        # State saved in another precision (a float32 checkpoint into a narrow optimizer, or back) is
        # converted, rounding to nearest; torch has cast 16-bit floating state to the parameters' dtype.
        for group in self.param_groups:
            self._conform_state(group, group["params"], stochastic=False)
        self._codec.load_generator_states(state_dict.get("state_precision_rng", {}))

    # --- layers ----------------------------------------------------------------------------------

    @staticmethod
    def is_excluded(group: dict[str, Any], param: Union[Tensor, torch.Size]) -> bool:
        """Whether ``param`` in ``group`` is excluded from the layer-wise rate (it then takes the
        optimizer's plain step, without weight decay): the group's ``exclude`` where it is not
        ``None``, else ``exclude_bias_and_norm`` and ``ndim <= 1``. ``param`` may be a parameter (its
        whole shape counts: ZeRO-3's ``ds_shape``) or a layer's shape."""
        if group["exclude"] is not None:
            return group["exclude"]
        shape = param if isinstance(param, torch.Size) else layer_shape(param)
        return group["exclude_bias_and_norm"] and len(shape) <= 1

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

    # --- what a monitor asks (lars_plugins.monitor.MonitoredOptimizer) ------------------------------

    def takes_norms(self, group: dict[str, Any]) -> bool:
        """Whether a step of ``group`` hands a monitor the norms of its adapted parameters
        (:meth:`hand_norms_to`): groups of whole tensors, where the step computes them itself."""
        return self.HANDS_NORMS and self._layouts(group["params"]) is None

    def hand_norms_to(self, sink: Optional[dict[Tensor, tuple[Any, Any]]]) -> None:
        """From the next step on, put ``(‖w‖, ‖g‖ or None)`` of each adapted parameter a step takes
        (in groups where :meth:`takes_norms`) into ``sink``, as the step took them; ``None`` stops.
        What :class:`~lars_plugins.TrustRatioMonitor` does on the steps it records."""
        self._norm_sink = sink

    @property
    def handed_norms(self) -> Optional[dict[Tensor, tuple[Any, Any]]]:
        """Where this step hands its norms (:meth:`hand_norms_to`), or ``None``: two monitors of one
        optimizer share it."""
        return self._norm_sink

    @property
    def collects_norms(self) -> bool:
        """Whether this step's norms are wanted (a monitor records it)."""
        return self._norm_sink is not None

    def _hand_norms(self, params: Iterable[Tensor], weight_norms: Iterable[Any],
                    grad_norms: Optional[Iterable[Any]] = None) -> None:
        """What a step calls with the norms it took (``None`` entries are skipped; a ``grad_norms``
        of ``None``: the monitor takes ``‖g‖`` itself, as for LAMB, whose ratio divides by ‖u‖)."""
        if self._norm_sink is None:
            return
        pairs = zip(weight_norms, grad_norms) if grad_norms is not None else ((w, None) for w in weight_norms)
        self._norm_sink.update((p, (w, g)) for p, (w, g) in zip(params, pairs) if w is not None)

    def _trust_ratio_slot(self, p: Tensor) -> Tensor:
        """``state[p]["trust_ratio"]``, made on first use: a 0-d tensor on ``p``'s device."""
        state = self.state[p]
        if "trust_ratio" not in state:
            state["trust_ratio"] = torch.zeros((), dtype=ratio_dtype(p.dtype), device=p.device)
        return state["trust_ratio"]

    def _host_scratch(self) -> Scratch:
        """The CPU path's scratch buffers (:class:`~lars_plugins.cpu_directions.Scratch`), kept from
        step to step; not state: neither saved nor pickled, made again where missing."""
        scratch = self.__dict__.get("_scratch")
        if scratch is None:
            scratch = self._scratch = Scratch()
        return scratch

    def _keep_flat_ratios(self, layout: FlatLayout, ratios: Tensor, adapted: list[bool]) -> None:
        device = ratios.device
        self._flat_ratios[id(layout)] = torch.where(layout.constant(adapted, device), ratios, torch.nan)

    # --- narrow state (state_precision) -----------------------------------------------------------

    _has_narrow_state = False  # whether any state is stored narrow (then every step decodes it)

    def _narrow(self, group: dict[str, Any]) -> bool:
        """Whether ``group``'s step goes through :meth:`_decoded_state` (narrow state wanted or stored)."""
        return bool(self.NARROW_STATE) and (group.get("state_precision", "float32") != "float32"
                                            or self._has_narrow_state)

    def _decoded_state(self, group: dict[str, Any], tensors: Union[WholeTensors, FlatPieces],
                       key: str) -> tuple[list[Optional[Tensor]], Callable[[], None]]:
        """``tensors.state(self.state, key)`` as the rules take it, in the parameters' dtype: narrow
        state decoded into working copies, and a function that encodes them back (stochastic
        rounding) after the rule has updated them. State in the parameters' dtype is itself."""
        stored = tensors.state(self.state, key)
        if not self._narrow(group):
            return stored, lambda: None
        squared = self.NARROW_STATE[key]
        flat = tensors if isinstance(tensors, FlatPieces) else None
        places = self._narrow_plan(flat.layout)[0] if flat else []
        working: list[Optional[Tensor]] = []
        narrow: list[tuple[int, Tensor, Optional[Tensor]]] = []
        for i, value in enumerate(stored):
            dtype, entry = tensors.params[i].dtype, self.state[tensors.owners[i]]
            form = form_of(entry, key, dtype)
            if value is None or form in (None, "float32"):
                working.append(value)
                continue
            shape = value.shape
            absmax = to_local(entry[key + SCALE_SUFFIX]) if form == "int8" else None
            if absmax is not None and flat is not None:  # a flat piece (FSDP1, ZeRO)
                coded, start, end = places[flat.kept[i]]
                if not coded:  # kept aside in float32: the rule updates it there
                    working.append(entry[key + UNCODED_SUFFIX][start:end])
                    continue
                value = value.view(1, -1)  # one row of its own blocks
                absmax = absmax[start:end].view(1, -1)
            working.append(self._codec.decode(value, absmax, dtype, squared).view(shape))
            narrow.append((i, value, absmax))

        def write_back() -> None:
            for i, value, absmax in narrow:
                self._codec.encode(working[i].view(value.shape), value, absmax, squared)  # type: ignore[union-attr]

        return working, write_back

    def _conform_state(self, group: dict[str, Any], owners: Iterable[Tensor], *, stochastic: bool) -> None:
        """Store each parameter's :attr:`NARROW_STATE` in the form its group's ``state_precision``
        asks for, converting what a step just made (in the parameters' dtype) or a checkpoint held."""
        if not self.NARROW_STATE:
            return
        place = {id(t): i for i, t in enumerate(group["params"])}
        layouts: list[Optional[FlatLayout]] = []

        def flat_of(p: Tensor) -> Optional[tuple[FlatLayout, int]]:
            # Resolved only where 8-bit state is involved: a group that never asks for it steps (and
            # loads) without a layout lookup, which refuses tensors no engine describes.
            if not layouts:
                layouts.append(self.layout(group))
            return None if layouts[0] is None else (layouts[0], place[id(p)])

        for p in {id(t): t for t in owners}.values():
            entry = self.state.get(p)
            if not entry:
                continue
            coded = group.get("state_precision") == "int8" or any(
                form_of(entry, key, p.dtype) == "int8" for key in self.NARROW_STATE)
            flat = flat_of(p) if coded else None
            target = self._target_form(group, p, flat)
            for key, squared in self.NARROW_STATE.items():
                current = form_of(entry, key, p.dtype)
                if current is None or current == target:
                    continue
                value = to_local(entry[key])
                absmax = to_local(entry.pop(key + SCALE_SUFFIX)) if current == "int8" else None
                if current == "float32":
                    working = value
                elif absmax is not None and flat is not None:
                    working = self._decode_flat(value, absmax, entry.pop(key + UNCODED_SUFFIX), p.dtype, squared,
                                                *flat)
                else:
                    working = self._codec.decode(value, absmax, p.dtype, squared)
                if target == "float32":
                    entry[key] = like_param(working.to(p.dtype), p)
                    continue
                if target == "int8" and flat is not None:
                    entry[key], entry[key + SCALE_SUFFIX], entry[key + UNCODED_SUFFIX] = self._encode_flat(
                        working, squared, *flat)
                    self._has_narrow_state = True
                    continue
                narrow = torch.empty(working.shape, device=working.device,
                                     dtype=torch.bfloat16 if target == "bfloat16" else torch.uint8)
                scales = torch.empty(int8_blocks(working.shape), dtype=torch.float32, device=working.device) \
                    if target == "int8" else None
                self._codec.encode(working, narrow, scales, squared, stochastic=stochastic)
                entry[key] = like_param(narrow, p)
                if scales is not None:  # rows of p's rows: sharded as p is (FSDP2), checkpointed alike
                    entry[key + SCALE_SUFFIX] = like_param_rows(scales, p, int8_blocks(p.shape))
                self._has_narrow_state = True

    @staticmethod
    def _coded_layers(layout: FlatLayout) -> tuple[bool, ...]:
        """Whether each layer of a flat layout takes 8-bit codes under ``"int8"`` (its whole shape decides)."""
        return tuple(int8_coded(layer.shape) for layer in layout.layers)

    def _narrow_plan(self, layout: FlatLayout) -> NarrowPlan:
        """:meth:`FlatLayout.narrow_plan` for the layers that take 8-bit codes."""
        return layout.narrow_plan(self._coded_layers(layout))

    def _target_form(self, group: dict[str, Any], p: Tensor, flat: Optional[tuple[FlatLayout, int]]) -> str:
        """The form ``p``'s state takes under its group's ``state_precision``. Under ``"int8"`` a flat
        tensor (FSDP1, ZeRO) takes 8-bit codes if it holds a piece of a layer that does; the pieces of
        the layers that keep float32 (1-D, small) are then kept aside in float32 (``UNCODED_SUFFIX``)."""
        precision = group.get("state_precision", "float32")
        if flat is None or precision != "int8":
            return stored_form(precision, p)
        layout, index = flat
        return "int8" if self._narrow_plan(layout)[1].get(index, 0) else "float32"

    def _flat_spans(self, layout: FlatLayout, index: int) -> Iterator[tuple[slice, bool, int, int]]:
        """Each piece of flat tensor ``index``: its span in the tensor, whether it is coded, and where
        its blocks (coded) or its float32 values (not) start and end."""
        places = self._narrow_plan(layout)[0]
        for j, piece in enumerate(layout.pieces):
            if piece.tensor == index and piece.numel:
                yield (slice(piece.start, piece.start + piece.numel), *places[j])

    def _decode_flat(self, codes: Tensor, absmax: Tensor, uncoded: Tensor, dtype: torch.dtype, squared: bool,
                     layout: FlatLayout, index: int) -> Tensor:
        """The values of flat tensor ``index``'s 8-bit state (0 between pieces)."""
        out = torch.zeros(codes.shape, dtype=dtype, device=codes.device)
        values, flat_codes = out.view(-1), codes.view(-1)
        for span, coded, start, end in self._flat_spans(layout, index):
            if coded:
                scales = absmax[start:end].view(1, -1)
                values[span] = self._codec.decode(flat_codes[span].view(1, -1), scales, dtype, squared).view(-1)
            else:
                values[span] = uncoded[start:end]
        return out

    def _encode_flat(self, values: Tensor, squared: bool, layout: FlatLayout,
                     index: int) -> tuple[Tensor, Tensor, Tensor]:
        """Flat tensor ``index``'s state ``values`` as 8-bit codes shaped like it, one absmax per block
        of each coded piece (:func:`~lars_plugins.state_precision.piece_blocks`), and the float32
        values of the pieces of layers that keep float32."""
        _, blocks, uncoded_sizes = self._narrow_plan(layout)
        codes = torch.zeros(values.shape, dtype=torch.uint8, device=values.device)
        absmax = torch.zeros(blocks.get(index, 0), dtype=torch.float32, device=values.device)
        uncoded = torch.zeros(uncoded_sizes.get(index, 0), dtype=values.dtype, device=values.device)
        flat_values, flat_codes = values.reshape(-1), codes.view(-1)
        for span, coded, start, end in self._flat_spans(layout, index):
            if coded:
                self._codec.encode(flat_values[span].view(1, -1), flat_codes[span].view(1, -1),
                                   absmax[start:end].view(1, -1), squared)
            else:
                uncoded[start:end] = flat_values[span]
        return codes, absmax, uncoded

    # A step decodes narrow state for this many elements at a time (16 MB of float32 per state).
    NARROW_PART_NUMEL: ClassVar[int] = 1 << 22

    def _narrow_parts(self, group: dict[str, Any], tensors: Union[WholeTensors, FlatPieces],
                      where: str) -> list[Union[WholeTensors, FlatPieces]]:
        """The group as the step takes it: whole, or, where narrow state of unsharded whole tensors
        is decoded, in parts of about :attr:`NARROW_PART_NUMEL` elements (a tensor is never split),
        so that the float32 working copies never hold more than a part's state. Sharded tensors
        (DTensor shards, flat pieces) are stepped whole: their norms take one collective per group."""
        if not self._narrow(group) or not isinstance(tensors, WholeTensors) or tensors.sharded:
            return [tensors]
        parts: list[Union[WholeTensors, FlatPieces]] = []
        start, size = 0, 0
        for i, p in enumerate(tensors.owners):
            if size and size + p.numel() > self.NARROW_PART_NUMEL:
                parts.append(WholeTensors(tensors.owners[start:i], tensors.excluded[start:i], where=where,
                                          owner=self.NAME))
                start, size = i, 0
            size += p.numel()
        parts.append(WholeTensors(tensors.owners[start:], tensors.excluded[start:], where=where, owner=self.NAME))
        return parts

    def _check_layouts_take_precision(self) -> None:
        """8-bit state is refused before any group steps where its blocks and their scales would not
        shard alike: for DTensors sharded beyond their first dimension (tensor parallelism)."""
        for index, group in enumerate(self.param_groups):
            if group.get("state_precision") != "int8" or self._layouts(group["params"]) is not None:
                continue  # flat layouts code each piece of a layer in blocks of its own
            for p in group["params"]:
                if stored_form("int8", p) == "int8" and shards_beyond_first_dimension(p):
                    raise ValueError(
                        f"param group {index}: state_precision='int8' for a parameter sharded along a dimension "
                        f"other than its first ({p.placements}): 8-bit blocks lie within rows and their scales shard "
                        "with the rows, which this layout (tensor parallelism) splits. Use state_precision='bfloat16', "
                        "which shards as it is")

    # --- step ------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """Perform one step; ``closure`` (re-evaluating the loss) is called first and its loss returned."""
        loss = evaluate(closure)
        self._check_layouts_take_precision()
        for index, group in enumerate(self.param_groups):
            where = f"param group {index}: "
            tensors = self.resolve(group, where)
            if tensors.params:
                for part in self._narrow_parts(group, tensors, where):
                    self._step_group(group, part)
                    if self._narrow(group):
                        self._conform_state(group, part.owners, stochastic=True)
            tensors.finish()
            if isinstance(tensors, FlatPieces):
                if tensors.layer_norms is not None:  # each whole layer's ratio, for the monitor
                    ratios = self._layer_ratios(group, *tensors.layer_norms)
                    self._keep_flat_ratios(tensors.layout, ratios, tensors.adapted_layers)
                count_group_step(group, tensors.layout)
        return loss

    def resolve(self, group: dict[str, Any], where: str = "") -> Union[WholeTensors, FlatPieces]:
        """The group as a step takes it, resolved once here for every optimizer: its whole tensors
        (:meth:`whole_tensors`), or the pieces of layers a flat layout (FSDP1, DeepSpeed ZeRO) gives
        this rank, with whole-layer norms from one collective (:class:`FlatPieces`)."""
        layout = self._layouts(group["params"], where)
        if layout is None:
            return self.whole_tensors(group, where)
        return FlatPieces(layout, group["params"], [self.is_excluded(group, layer.shape) for layer in layout.layers],
                          where=where, owner=self.NAME)

    def whole_tensors(self, group: dict[str, Any], where: str = "") -> WholeTensors:
        """The group's parameters that have gradients as a step of whole tensors takes them (local
        shards of DTensors, with the collective that gives whole-parameter norms), each with its
        exclusion: resolved here once, for every optimizer."""
        owners = [p for p in group["params"] if p.grad is not None]
        return WholeTensors(owners, [self.is_excluded(group, p) for p in owners], where=where, owner=self.NAME)

    def _step_group(self, group: dict[str, Any], tensors: Union[WholeTensors, FlatPieces]) -> None:
        """One step of the group's tensors, as :meth:`resolve` gives them: the local tensors to
        update, their exclusion, ``tensors.norms`` for whole-layer norms (``None``: local norms are
        whole), state through ``tensors.state``/``tensors.store``, ratios into ``tensors.ratio_slots``."""
        raise NotImplementedError

    def _layer_ratios(self, group: dict[str, Any], weight_norms: Tensor, other_norms: Tensor) -> Tensor:
        """Each layer's ratio from its whole norms (``‖w‖`` and what :meth:`_step_group` handed
        ``tensors.norms``): kept per layer under flat layouts, where the state holds no ratios."""
        raise NotImplementedError
