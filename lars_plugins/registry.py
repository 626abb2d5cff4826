"""One registry of the optimizers lars_plugins offers by name.

Each :class:`OptimizerEntry` says how to build its optimizer from parameter groups and the common
arguments (``lr``, ``weight_decay``…), what options its name implies, which names timm knows it
by, and how the frameworks' own arguments map onto it (its :attr:`~OptimizerEntry.family`). timm,
the HF Trainer and Lightning read this table; none of them branches on an optimizer class or keeps
a list of names of its own. Your optimizer joins with :func:`register_optimizer` and is then
selectable by name in all three (docs/optimizers.md, "Adding an optimizer").
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Union

from torch.optim import Optimizer

__all__ = ["OptimizerEntry", "register_optimizer", "unregister_optimizer", "optimizer_entry", "optimizer_names",
           "entries", "on_register", "Family"]

# "sgd": the frameworks' momentum is the optimizer's (timm's has_momentum); "adam": their betas and
# Adam epsilon are (timm's has_betas; the HF Trainer's adam_beta1, adam_beta2, adam_epsilon).
Family = Literal["sgd", "adam"]


@dataclass(frozen=True)
class OptimizerEntry:
    """One optimizer by name.

    Args:
        name: the name in the HF Trainer's ``optim``, ``configure_lars(optimizer=...)`` and here
            (lower case; ``_`` allowed).
        optimizer: what builds it, called as ``optimizer(params, lr=..., **options)`` with
            ``params`` an iterable of parameters or of parameter-group dicts: an optimizer class
            (whose typed ``__init__`` then also serves LightningCLI and timm), a function, or a
            ``"module:attribute"`` string imported on first use (for an optimizer that needs an
            optional package).
        description: one line, shown by timm and in error messages.
        options: the keyword options the name implies (``larc``: ``trust_clip=True``).
        timm_names: names registered in timm's registry, never colliding with timm's own (no
            ``_``: timm reads what follows the last one as the optimizer).
        timm_replaces: names of timm's own optimizers that this one takes over when
            ``lars_plugins.timm.register(override_builtin=True)`` (the default): only where timm's
            is wrong (its ``lars`` turns into SGD at ``weight_decay=0``).
        family: ``"sgd"`` or ``"adam"``: which of the frameworks' arguments it takes.
        refused: keywords a framework may pass that this optimizer refuses, with the advice given
            (timm's ``max_grad_norm`` for LAMB, which does not clip inside ``step()``).
    """

    name: str
    optimizer: Union[Callable[..., Optimizer], str]
    description: str
    options: Mapping[str, Any] = field(default_factory=dict)
    timm_names: tuple[str, ...] = ()
    timm_replaces: tuple[str, ...] = ()
    family: Family = "sgd"
    refused: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or self.name != self.name.lower():
            raise ValueError(f"name must be a non-empty lower-case string, got {self.name!r}")
        if self.family not in ("sgd", "adam"):
            raise ValueError(f"family must be 'sgd' or 'adam', got {self.family!r}")
        for timm_name in (*self.timm_names, *self.timm_replaces):
            if "_" in timm_name or timm_name != timm_name.lower():
                raise ValueError(f"timm name {timm_name!r}: timm needs lower-case names without '_' (it reads "
                                 "what follows the last '_' as the optimizer)")
        if not (callable(self.optimizer) or (isinstance(self.optimizer, str) and ":" in self.optimizer)):
            raise TypeError(f"optimizer must be a class, a function or a 'module:attribute' string, got "
                            f"{self.optimizer!r}")

    def factory(self) -> Callable[..., Optimizer]:
        """The class or function that builds the optimizer (a string is imported here)."""
        if callable(self.optimizer):
            return self.optimizer
        module, _, attribute = self.optimizer.partition(":")
        return getattr(importlib.import_module(module), attribute)

    def keywords(self) -> list[str]:
        """The keyword arguments the optimizer takes (besides ``params``), from its signature."""
        factory = self.factory()
        target = factory.__init__ if inspect.isclass(factory) else factory
        return [name for name, p in inspect.signature(target).parameters.items()
                if name not in ("self", "params") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    def build(self, params: Any, **kwargs: Any) -> Optimizer:
        """The optimizer over ``params``, with the name's options under ``kwargs``."""
        for key, advice in self.refused.items():
            if kwargs.get(key) is not None:
                raise ValueError(f"{key}={kwargs[key]!r}: {advice}")
        kwargs = {k: v for k, v in kwargs.items() if k not in self.refused}
        return self.factory()(params, **{**self.options, **kwargs})


_ENTRIES: dict[str, OptimizerEntry] = {}
_LISTENERS: list[Callable[[OptimizerEntry], None]] = []


def register_optimizer(entry: OptimizerEntry, *, replace: bool = False) -> OptimizerEntry:
    """Add ``entry`` to the registry (and to the integrations that mirror it, timm's registry once
    ``lars_plugins.timm`` is imported). A name taken already is refused unless ``replace``."""
    if not isinstance(entry, OptimizerEntry):
        raise TypeError(f"entry must be an OptimizerEntry, got {type(entry).__name__}")
    if entry.name in _ENTRIES and not replace and _ENTRIES[entry.name] != entry:
        raise ValueError(f"an optimizer is registered as {entry.name!r} already; pass replace=True to replace it")
    _ENTRIES[entry.name] = entry
    for listener in _LISTENERS:
        listener(entry)
    return entry


def unregister_optimizer(name: str) -> None:
    """Remove ``name`` from the registry (integrations keep what they copied; timm: ``unregister()``)."""
    optimizer_entry(name)  # a clear error for an unknown name
    del _ENTRIES[name.lower()]


def optimizer_entry(name: str) -> OptimizerEntry:
    """The entry of ``name``; a ``ValueError`` listing the names (and the closest one) otherwise."""
    key = str(name).lower()
    if key not in _ENTRIES:
        close = difflib.get_close_matches(key, _ENTRIES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"optimizer {name!r} is not one of lars_plugins' names ({', '.join(_ENTRIES)}){hint}. "
                         "Add your own with lars_plugins.register_optimizer")
    return _ENTRIES[key]


def optimizer_names() -> list[str]:
    """The registered names, in the order they were registered."""
    return list(_ENTRIES)


def entries() -> list[OptimizerEntry]:
    """The registered entries, in the order they were registered."""
    return list(_ENTRIES.values())


def on_register(listener: Callable[[OptimizerEntry], None]) -> None:
    """Call ``listener(entry)`` for every entry registered from now on (an integration's mirror)."""
    _LISTENERS.append(listener)


_LAMB_CLIPS = ("lars_plugins.LAMB does not clip gradients inside the optimizer; clip before step() (timm "
               "train.py: --clip-grad; the HF Trainer: max_grad_norm)")

for _entry in [
    OptimizerEntry("lars", "lars_plugins.lars:LARS", "LARS: layer-wise adaptive rate scaling, adaptation independent "
                   "of weight decay, biases and norms not adapted", timm_names=("lplars",), timm_replaces=("lars",)),
    OptimizerEntry("larc", "lars_plugins.lars:LARS", "LARS with the trust ratio clipped at the global LR (LARC)",
                   {"trust_clip": True}, timm_names=("lplarc",), timm_replaces=("larc",)),
    OptimizerEntry("nlars", "lars_plugins.lars:LARS", "LARS with Nesterov momentum", {"nesterov": True},
                   timm_names=("lpnlars",), timm_replaces=("nlars",)),
    OptimizerEntry("nlarc", "lars_plugins.lars:LARS", "LARS with Nesterov momentum, clipped (LARC)",
                   {"nesterov": True, "trust_clip": True}, timm_names=("lpnlarc",), timm_replaces=("nlarc",)),
    OptimizerEntry("lamb", "lars_plugins.lamb:LAMB", "LAMB: layer-wise trust ratios over Adam (Algorithm 2), biases "
                   "and norms not adapted", timm_names=("lplamb",), family="adam",
                   refused={"max_grad_norm": _LAMB_CLIPS}),
    OptimizerEntry("lamb_clip", "lars_plugins.lamb:LAMB", "LAMB with the trust ratio capped at 1",
                   {"trust_clip": True}, timm_names=("lplambc",), family="adam",
                   refused={"max_grad_norm": _LAMB_CLIPS}),
    OptimizerEntry("layerwise_adamw", "lars_plugins.wrapper:LayerwiseAdamW", "LARS's trust ratio over AdamW's update "
                   "(Layerwise(AdamW))", timm_names=("lplwadamw",), family="adam"),
    OptimizerEntry("lars_ranger", "lars_plugins.ranger:LarsRanger", "LARS + Ranger: Lookahead over the trust ratio "
                   "on RAdam's update, with Gradient Centralization (needs timm's Lookahead)",
                   timm_names=("lplarsranger",), family="adam"),
]:
    register_optimizer(_entry)
