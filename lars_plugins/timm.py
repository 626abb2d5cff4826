"""timm integration: every optimizer of the registry by name in ``timm.optim.create_optimizer_v2``,
``train.py --opt`` and YAML.

``import lars_plugins.timm`` registers each entry of :mod:`lars_plugins.registry` in timm's optimizer
registry under its ``timm_names`` -- ``lplars``, ``lplarc``, ``lpnlars``, ``lpnlarc``, ``lplamb``,
``lplambc``, ``lplwadamw``, ``lplarsranger``, names that never collide with timm's built-ins -- and,
with ``override_builtin=True`` (the default), under the names of timm's own optimizers an entry
replaces (``lars``, ``larc``, ``nlars``, ``nlarc``: timm's ``Lars`` is wrong at ``weight_decay=0``).
timm's ``lamb``, ``lambc``, ``lambw`` and ``lambcw`` stay timm's. Entries registered later (your
own, :func:`lars_plugins.register_optimizer`) join timm's registry as they come. ``unregister()``
restores timm's. Plain ``import lars_plugins`` registers nothing: it must not import timm.

timm's keyword names are accepted (:data:`lars_plugins.base.FOREIGN_KEYS`): ``trust_coeff``
(= ``trust_coefficient``) and ``always_adapt`` (``True``: no tensor excluded, biases and norms
included). See docs/timm.md for how timm's parameter groups (weight-decay filter, layer decay,
fallback groups) map onto LARS.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterable, Optional

from torch.optim import Optimizer

from .adapters import timm as timm_adapter
from .base import translate_foreign
from .lamb import LAMB
from .lars import LARS
from .registry import OptimizerEntry, entries, on_register, optimizer_entry

__all__ = ["register", "unregister", "timm_class", "TimmLARS", "TimmLAMB", "create_lars", "create_lamb",
           "apply_lr_scale", "timm_names"]

MIN_TIMM = "1.0.12"  # the first timm with an optimizer registry (OptimInfo)
_replaced: dict[str, Any] = {}  # timm's own entries that register() replaced, for unregister()
_classes: dict[Any, type] = {}  # one class per optimizer factory (and refusals)
_override_builtin = True
_active = False  # registered (and not unregistered since): entries registered later follow


def timm_class(entry: OptimizerEntry) -> type:
    """The class timm's registry holds for ``entry``: an ``Optimizer`` subclass (timm's
    ``get_optimizer_class(name, bind_defaults=False)`` must return one, as timm's own tests require)
    whose call builds the entry's optimizer from timm's arguments: the parameter groups (timm's
    ``use_fallback`` groups excluded), timm's keyword names read as ours. A name's options are not in
    the class: timm binds them from the registry entry's ``defaults``, as it binds its own variants.
    Calling it returns the entry's own optimizer (a plain ``LARS``, ``LAMB``…), so what is built,
    logged, pickled and checkpointed loads without timm."""
    key = (entry.optimizer, tuple(sorted(entry.refused.items())))
    if key not in _classes:
        raw = dataclasses.replace(entry, options={})
        accepted = raw.keywords()
        factory = raw.factory()
        label = getattr(factory, "__name__", entry.name)

        def __new__(cls: type, params: Iterable[Any], **kwargs: Any) -> Optimizer:
            return raw.build(_fallback_groups(params), **translate_foreign(kwargs, accepted,
                                                                           owner=f"lars_plugins.{label}"))

        _classes[key] = type(f"Timm{label}", (Optimizer,), {
            "__new__": __new__, "__module__": __name__,
            "__doc__": f"{label} as timm's factory builds it (:func:`lars_plugins.timm.timm_class`)."})
    return _classes[key]


TimmLARS = timm_class(optimizer_entry("lars"))
TimmLAMB = timm_class(optimizer_entry("lamb"))


def create_lars(params: Iterable[Any], **kwargs: Any) -> LARS:
    """:class:`LARS` from the arguments timm's factory passes (:data:`TimmLARS`)."""
    return TimmLARS(params, **kwargs)


def create_lamb(params: Iterable[Any], *, max_grad_norm: Optional[float] = None, **kwargs: Any) -> LAMB:
    """:class:`LAMB` from the arguments timm's factory passes (:data:`TimmLAMB`); ``max_grad_norm``
    (timm's ``Lamb`` clips inside ``step()``) is refused unless ``None``."""
    return TimmLAMB(params, max_grad_norm=max_grad_norm, **kwargs)


def timm_names(override_builtin: bool = True) -> dict[str, OptimizerEntry]:
    """timm name -> registry entry: every entry's ``timm_names`` and, with ``override_builtin``, the
    names of timm's own optimizers it replaces."""
    names: dict[str, OptimizerEntry] = {}
    for entry in entries():
        for name in (*entry.timm_names, *(entry.timm_replaces if override_builtin else ())):
            names[name] = entry
    return names


def _fallback_groups(params: Iterable[Any]) -> list[Any]:
    """timm's ``use_fallback`` groups (hybrid optimizers' second optimizer) become excluded groups."""
    params = list(params)
    for i, group in enumerate(params):
        if isinstance(group, dict) and group.get("use_fallback"):
            if group.get("weight_decay", 0) != 0:
                raise ValueError(
                    f"param group {i}: timm marked it use_fallback with weight_decay={group['weight_decay']}; the "
                    "fallback of lars_plugins' optimizers (their excluded step) has no weight decay, so that decay "
                    "would be lost. Pass "
                    "fallback_no_weight_decay=True or leave fallback_list empty"
                )
            params[i] = {**group, "exclude": True}
    return params


def apply_lr_scale(optimizer: Optimizer) -> Optimizer:
    """Fold timm's per-group ``lr_scale`` (layer decay) into each group's ``lr``, for torch schedulers.

    timm's own schedulers multiply ``lr_scale`` in at every update; torch's schedulers ignore it, so
    without this every layer would get the same LR. Call it once, before creating a torch scheduler.
    The key is renamed ``applied_lr_scale`` so that a timm scheduler created later does not scale twice.
    """
    for group in optimizer.param_groups:
        if "lr_scale" in group:
            scale = group.pop("lr_scale")
            group["lr"] = group["lr"] * scale
            group["applied_lr_scale"] = scale
    return optimizer


def _timm_optim() -> Any:
    try:
        import timm
        import timm.optim
    except ImportError as err:
        raise ImportError('lars_plugins.timm needs timm: pip install "lars_plugins[timm]"') from err
    if not hasattr(timm.optim, "OptimInfo"):
        raise ImportError(
            f"timm {timm.__version__} has no optimizer registry; lars_plugins.timm needs timm>={MIN_TIMM} "
            f'(pip install "timm>={MIN_TIMM}"). Meanwhile use lars_plugins.LARS directly.'
        )
    return timm.optim


def _registry() -> Any:
    return timm_adapter.default_registry()  # the registry create_optimizer_v2 uses


def _info(name: str, entry: OptimizerEntry) -> Any:
    """timm's ``OptimInfo`` for ``entry`` under ``name``: its class, its options as timm's
    ``defaults``, and which of timm's arguments it takes (momentum, or betas: its family)."""
    return _timm_optim().OptimInfo(
        name=name, opt_class=timm_class(entry), description=f"lars_plugins {entry.name}: {entry.description}",
        has_eps=True, has_momentum=entry.family == "sgd", has_betas=entry.family == "adam",
        defaults=dict(entry.options) or None)


def _ours(info: Any) -> bool:
    return info.opt_class in _classes.values()


def register(override_builtin: bool = True) -> list[str]:
    """Register the registry's optimizers in timm's registry; return the names registered.
    Idempotent and quiet. ``override_builtin=True`` also takes the names of timm's own optimizers
    an entry replaces (``lars``, ``larc``, ``nlars``, ``nlarc``)."""
    global _override_builtin, _active
    _timm_optim()
    _override_builtin, _active = override_builtin, True
    registry = _registry()
    names = timm_names(override_builtin)
    for name, entry in names.items():
        info = _info(name, entry)
        current = timm_adapter.registered(registry, name)
        if current is not None and _ours(current) and current == info:
            continue  # already ours: nothing to do, nothing to log
        if current is not None and not _ours(current):
            _replaced.setdefault(name, current)
        # timm logs a warning when a name is overwritten; replacing its Lars is the point here.
        with _quiet(logging.getLogger(registry.__module__)):
            registry.register(info)
    return list(names)


def unregister() -> None:
    """Remove our names from timm's registry and give timm's own ``lars`` family back."""
    global _active
    _active = False
    registry = _registry()
    for name in timm_adapter.registered_names(registry):
        if _ours(timm_adapter.registered(registry, name)):
            timm_adapter.remove(registry, name)
    for name, info in _replaced.items():
        timm_adapter.put(registry, name, info)
    _replaced.clear()


def _registered_later(entry: OptimizerEntry) -> None:
    """An entry registered after this module was imported joins timm's registry too."""
    if _active:
        register(_override_builtin)


class _quiet:
    """Raise a logger's level to ERROR for the duration of a ``with`` block."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger, self.level = logger, logger.level

    def __enter__(self) -> None:
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self.logger.setLevel(self.level)


register()
on_register(_registered_later)
