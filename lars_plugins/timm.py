"""timm integration: ``opt="lars"`` in ``timm.optim.create_optimizer_v2``, ``train.py --opt lars`` and YAML.

``import lars_plugins.timm`` registers :class:`lars_plugins.LARS` in timm's optimizer registry under
timm's own names -- ``lars``, ``larc`` (trust clip), ``nlars`` (Nesterov), ``nlarc`` -- replacing
timm's ``Lars`` for them, and under names that never collide with timm's built-ins -- ``lplars``,
``lplarc``, ``lpnlars``, ``lpnlarc`` -- for side-by-side use. :class:`lars_plugins.LAMB` is
registered as ``lplamb`` and ``lplambc`` (trust clip) only: timm's own ``lamb``, ``lambc``,
``lambw`` and ``lambcw`` stay timm's. ``register()`` does the same explicitly
(``override_builtin=False`` registers only the ``lp`` names); ``unregister()`` restores timm's.
Plain ``import lars_plugins`` registers nothing: it must not import timm.

timm's keyword names are accepted (:data:`lars_plugins.base.FOREIGN_KEYS`): ``trust_coeff``
(= ``trust_coefficient``) and ``always_adapt`` (``True``: no tensor excluded, biases and norms
included). See docs/timm.md for how timm's parameter groups (weight-decay filter, layer decay,
fallback groups) map onto LARS.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

from torch.optim import Optimizer

from .base import translate_foreign
from .lamb import LAMB
from .optim import LARS, VARIANTS

__all__ = ["register", "unregister", "TimmLARS", "TimmLAMB", "create_lars", "create_lamb", "apply_lr_scale",
           "TIMM_NAMES", "PLUGIN_NAMES", "LAMB_NAMES"]

# name -> LARS keyword defaults. Names must not contain "_": timm keeps only the part after the last one.
TIMM_NAMES: dict[str, dict[str, Any]] = VARIANTS
PLUGIN_NAMES: dict[str, dict[str, Any]] = {"lp" + name: defaults for name, defaults in TIMM_NAMES.items()}
LAMB_NAMES: dict[str, dict[str, Any]] = {"lplamb": {}, "lplambc": {"trust_clip": True}}

MIN_TIMM = "1.0.12"  # the first timm with an optimizer registry (OptimInfo)
_replaced: dict[str, Any] = {}  # timm's own entries that register() replaced, for unregister()


class TimmLARS(LARS):
    """:class:`LARS` as timm's factory builds it (what the registry holds, under every LARS name).

    * timm's names are read through :data:`lars_plugins.base.FOREIGN_KEYS`: ``trust_coeff`` is
      ``trust_coefficient``; ``always_adapt=True`` adapts every tensor (``exclude_bias_and_norm=False``);
      ``False`` keeps LARS's rule: tensors with ``ndim <= 1`` -- the biases and norm weights timm's
      filter puts in its no-decay group -- are excluded. Unlike timm's ``Lars``, exclusion never depends
      on a group's weight decay, so ``weight_decay=0`` is still LARS;
    * groups timm marks ``use_fallback=True`` are excluded (plain SGD with momentum).

    A class, so that timm's ``get_optimizer_class(name, bind_defaults=False)`` hands back an
    optimizer class, as timm's own tests require of every registered name; a name's variant
    (``larc``: ``trust_clip=True``) is bound the way timm binds it, through the entry's ``defaults``.
    Calling it returns a plain :class:`LARS`: what is built, logged, pickled and checkpointed is
    ``lars_plugins.LARS``, loadable without timm.
    """

    def __new__(cls, params: Iterable[Any], **kwargs: Any) -> LARS:  # type: ignore[misc]
        return LARS(_fallback_groups(params), **translate_foreign(kwargs, LARS.KEYS, owner="lars_plugins.LARS"))


class TimmLAMB(LAMB):
    """:class:`LAMB` as timm's factory builds it (``lr``, ``weight_decay``, ``betas``, ``eps``…).
    ``always_adapt`` is read as for :class:`TimmLARS`; ``max_grad_norm`` (timm's ``Lamb`` clips the
    global gradient norm inside the optimizer) is refused unless ``None``: clip with
    ``train.py --clip-grad`` instead, which clips before every optimizer alike. Calling it returns a
    plain :class:`LAMB`."""

    def __new__(cls, params: Iterable[Any], *, max_grad_norm: Optional[float] = None,  # type: ignore[misc]
                **kwargs: Any) -> LAMB:
        if max_grad_norm is not None:
            raise ValueError(f"max_grad_norm={max_grad_norm}: lars_plugins.LAMB does not clip gradients inside the "
                             "optimizer; clip before step() (timm train.py: --clip-grad)")
        return LAMB(_fallback_groups(params), **translate_foreign(kwargs, LAMB.KEYS, owner="lars_plugins.LAMB"))


def create_lars(params: Iterable[Any], **kwargs: Any) -> LARS:
    """:class:`TimmLARS` (the arguments timm's factory passes)."""
    return TimmLARS(params, **kwargs)


def create_lamb(params: Iterable[Any], *, max_grad_norm: Optional[float] = None, **kwargs: Any) -> LAMB:
    """:class:`TimmLAMB` (the arguments timm's factory passes)."""
    return TimmLAMB(params, max_grad_norm=max_grad_norm, **kwargs)


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
    from timm.optim._optim_factory import default_registry  # the registry create_optimizer_v2 uses

    return default_registry


def _info(name: str, defaults: dict[str, Any]) -> Any:
    variant = ", ".join(f"{k}={v}" for k, v in defaults.items()) or "plain"
    if name in LAMB_NAMES:
        return _timm_optim().OptimInfo(
            name=name, opt_class=TimmLAMB, has_eps=True, has_betas=True, defaults=dict(defaults) or None,
            description=f"lars_plugins.LAMB ({variant}): layer-wise trust ratios over Adam (Algorithm 2), "
                        "biases and norms not adapted")
    return _timm_optim().OptimInfo(
        name=name,
        opt_class=TimmLARS,
        description=f"lars_plugins.LARS ({variant}): layer-wise adaptive rate scaling, adaptation "
                    "independent of weight decay, biases and norms not adapted",
        has_eps=True,
        has_momentum=True,
        defaults=dict(defaults) or None,
    )


# What an entry of ours holds (the factory functions: what earlier versions registered).
_OURS = (TimmLARS, TimmLAMB, create_lars, create_lamb)


def register(override_builtin: bool = True) -> list[str]:
    """Register LARS in timm's registry; return the names registered. Idempotent and quiet.

    ``override_builtin=True`` also takes timm's names (``lars``, ``larc``, ``nlars``, ``nlarc``);
    the ``lp``-prefixed names are always registered.
    """
    _timm_optim()
    registry = _registry()
    names = {**PLUGIN_NAMES, **LAMB_NAMES, **(TIMM_NAMES if override_builtin else {})}
    for name, defaults in names.items():
        current = registry._optimizers.get(name)
        if current is not None and current.opt_class in _OURS:
            continue  # already ours: nothing to do, nothing to log
        if current is not None:
            _replaced.setdefault(name, current)
        # timm logs a warning when a name is overwritten; replacing its Lars is the point here.
        with _quiet(logging.getLogger(registry.__module__)):
            registry.register(_info(name, defaults))
    return list(names)


def unregister() -> None:
    """Remove our names from timm's registry and give timm's own ``lars`` family back."""
    registry = _registry()
    for name in [*TIMM_NAMES, *PLUGIN_NAMES, *LAMB_NAMES]:
        current = registry._optimizers.get(name)
        if current is not None and current.opt_class in _OURS:
            del registry._optimizers[name]
    for name, info in _replaced.items():
        registry._optimizers[name] = info
    _replaced.clear()


class _quiet:
    """Raise a logger's level to ERROR for the duration of a ``with`` block."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger, self.level = logger, logger.level

    def __enter__(self) -> None:
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self.logger.setLevel(self.level)


register()
