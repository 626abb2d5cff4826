"""Hugging Face Trainer integration: ``optim="lars"``, ``"lamb"`` or any name of the registry, and
per-layer trust ratios in the logs.

transformers validates ``TrainingArguments.optim`` against a closed enum and has no public optimizer
registry, so the integration is two mixins (and ready-made classes built from them):

* :class:`LarsArgsMixin` / :class:`LarsTrainingArguments`: ``optim`` accepts the names of
  :mod:`lars_plugins.registry` (``lars``, ``larc``, ``nlars``, ``nlarc``, ``lamb``, ``lamb_clip``,
  ``layerwise_adamw``, ``lars_ranger``, and yours) besides transformers' names (also
  ``--optim lamb`` through ``HfArgumentParser``), with ``optim_args`` such as
  ``trust_coefficient=0.02,momentum=0.9`` converted to the optimizer's types, plus
  ``lars_layer_decay`` and ``lars_monitor``;
* :class:`LarsTrainerMixin` / :class:`LarsTrainer`: builds the optimizer with bias/norm exclusion,
  the weight decay of ``args.weight_decay`` (and for the Adam family ``adam_beta1``, ``adam_beta2``,
  ``adam_epsilon``, as transformers does for every Adam-family optimizer), and merges trust-ratio
  metrics into the Trainer's own ``log()`` on logging steps, so they reach ``state.log_history``
  and every reporting integration.

The mixins compose with other Trainer subclasses: ``class MyTrainer(LarsTrainerMixin, SFTTrainer)``
with ``class MyConfig(LarsArgsMixin, SFTConfig)`` (both decorated ``@dataclass`` for the config).
"""

from __future__ import annotations

import inspect
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union, get_args, get_origin

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from .adapters import transformers as transformers_adapter
from .base import FOREIGN_KEYS, translate_foreign
from .groups import param_groups
from .monitor import TrustRatioMonitor
from .registry import OptimizerEntry, optimizer_entry, optimizer_names

__all__ = [
    "LarsArgsMixin",
    "LarsTrainingArguments",
    "LarsTrainerMixin",
    "LarsTrainer",
    "lars_optimizer_kwargs",
    "parse_optim_args",
    "MONITOR_MODES",
]

MONITOR_MODES = ("off", "summary", "per_layer", "all")
_HF_DEFAULT_OPTIM: Any = TrainingArguments.__dataclass_fields__["optim"].default


def _optim_name(optim: Any) -> str:
    return str(getattr(optim, "value", optim)).lower()


def is_ours(optim: Any) -> bool:
    """Whether ``optim`` (a ``TrainingArguments.optim`` value) names one of our optimizers."""
    return _optim_name(optim) in optimizer_names()


@dataclass
class LarsArgsMixin:
    """``TrainingArguments`` fields for the registry's optimizers. Put it first:
    ``class A(LarsArgsMixin, TrainingArguments)``."""

    optim: str = field(
        default=_HF_DEFAULT_OPTIM,
        metadata={"help": f"The optimizer: one of lars_plugins' names ({', '.join(optimizer_names())}; "
                          "lars_plugins.register_optimizer adds yours) or any of transformers' OptimizerNames."},
    )
    lars_layer_decay: Optional[float] = field(
        default=None,
        metadata={"help": "lars_plugins' optimizers only: layer-wise LR decay in (0, 1] for fine-tuning "
                          "(embeddings and lower blocks "
                          "get smaller LRs); None: off."},
    )
    lars_monitor: str = field(
        default="summary",
        metadata={"help": "Trust ratios in the logs on logging steps: off, summary (min/median/max), per_layer "
                          "or all.", "choices": list(MONITOR_MODES)},
    )

    def __post_init__(self) -> None:
        name = _optim_name(self.optim)
        ours = name in optimizer_names()
        if not ours:
            known = transformers_adapter.optimizer_names()
            if name not in known:
                raise ValueError(f"optim={self.optim!r} is not an optimizer name. lars_plugins adds "
                                 f"{', '.join(optimizer_names())}; transformers knows {', '.join(known)}")
        if self.lars_monitor not in MONITOR_MODES:
            raise ValueError(f"lars_monitor must be one of {', '.join(MONITOR_MODES)}, got {self.lars_monitor!r}")
        if self.lars_layer_decay is not None and not 0 < self.lars_layer_decay <= 1:
            raise ValueError(f"lars_layer_decay must be in (0, 1] or None, got {self.lars_layer_decay!r}")
        if self.lars_layer_decay is not None and not ours:
            raise ValueError(f"lars_layer_decay={self.lars_layer_decay} with optim={name!r}: layer decay is applied by "
                             f"lars_plugins' optimizers only ({', '.join(optimizer_names())}), so it would be ignored; "
                             "choose one of them or drop lars_layer_decay")
        if ours:
            # transformers checks optim against its enum: let it check a stand-in, then put the name back.
            self.optim = "sgd"
        super().__post_init__()  # type: ignore[misc]
        if ours:
            self.optim = name
            parse_optim_args(getattr(self, "optim_args", None), name)  # bad optim_args fail here, not at train()


@dataclass
class LarsTrainingArguments(LarsArgsMixin, TrainingArguments):
    """``TrainingArguments`` whose ``optim`` also accepts ``lars``, ``larc``, ``nlars``, ``nlarc``, ``lamb``
    and ``lamb_clip``."""


def _convert(key: str, text: str, annotation: Any) -> Any:
    """``text`` as the type of the optimizer's ``key`` argument (float, bool, str, a pair
    ``low:high``, each possibly Optional)."""
    is_union = get_origin(annotation) is Union
    options = [a for a in get_args(annotation) if a is not type(None)] if is_union else [annotation]
    optional = get_origin(annotation) is Union and type(None) in get_args(annotation)
    low = text.strip().lower()
    if optional and low in ("none", "null"):
        return None
    if any(get_origin(option) is tuple for option in options):
        # optim_args separates keys with commas, so a pair is written low:high
        parts = text.split(":")
        if len(parts) != 2:
            raise ValueError(f"optim_args: {key} must be two numbers written low:high, got {text!r}")
        return tuple(_convert(key, part, float) for part in parts)
    if str in options:  # a choice (state_precision): the optimizer checks it and names the values
        return text.strip()
    if bool in options:
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"optim_args: {key} must be true or false{' or none' if optional else ''}, got {text!r}")
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"optim_args: {key} must be a number, got {text!r}") from None


def _set_by_trainer(entry: OptimizerEntry) -> dict[str, str]:
    """The optimizer's keywords the Trainer sets from its own arguments, and which argument sets each
    (refused in optim_args, so that they are not given twice): the Adam family's betas and eps too."""
    from_args = {"lr": "learning_rate", "weight_decay": "weight_decay", "params": ""}
    if entry.family == "adam":
        from_args.update(betas="adam_beta1 and --adam_beta2", eps="adam_epsilon")
    return from_args


def parse_optim_args(optim_args: Optional[str], optim: str = "lars") -> dict[str, Any]:
    """``"k=v,k=v"`` (``TrainingArguments.optim_args``) as keyword arguments of the right types for
    the optimizer ``optim`` names (a pair as ``low:high``).

    timm's names (``trust_coeff``, ``always_adapt``) are read as ours (:data:`lars_plugins.base.FOREIGN_KEYS`).
    Unknown keys and keys the Trainer sets from its own arguments (``lr``: ``learning_rate``;
    ``weight_decay``; for the Adam family ``betas`` and ``eps``: ``adam_beta1/2``, ``adam_epsilon``) are
    refused with the list of what is valid.
    """
    if not optim_args:
        return {}
    entry = optimizer_entry(optim)
    from_args = _set_by_trainer(entry)
    factory = entry.factory()
    # resolved: the modules postpone their annotations
    hints = typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
    allowed = [k for k in entry.keywords() if k in hints and k not in from_args]
    out: dict[str, Any] = {}
    for item in optim_args.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"optim_args: expected key=value, got {item!r}")
        if key in from_args:
            raise ValueError(f"optim_args: set {key} with --{from_args[key]}, not in optim_args")
        foreign = FOREIGN_KEYS.get(key)
        ours = foreign.ours if foreign is not None and foreign.ours in allowed else key
        if ours not in allowed:
            raise ValueError(f"optim_args: unknown key {key!r} for {optim}; valid keys: {', '.join(allowed)}")
        out[key] = _convert(key, value, hints[ours])
    # timm's names (trust_coeff, always_adapt) as in the timm factory, from the same table.
    return translate_foreign(out, allowed, where="optim_args: ",
                             owner=f"lars_plugins.{getattr(factory, '__name__', entry.name)}")


def lars_optimizer_kwargs(args: TrainingArguments, model: torch.nn.Module) -> dict[str, Any]:
    """Keyword arguments (``params`` included) for the optimizer ``args.optim`` names (one of the
    registry's: :func:`optimizer_class`) from a Trainer's arguments.

    Groups come from :func:`lars_plugins.param_groups`: biases and norm weights not adapted and not
    decayed (HF's own decay/no-decay split, by module type and name), the rest decayed by
    ``args.weight_decay``; with ``lars_layer_decay``, per-depth ``lr`` set on the groups, which HF's
    schedulers keep (they scale each group's initial LR).
    """
    name = _optim_name(args.optim)
    layer_decay = getattr(args, "lars_layer_decay", None)
    groups = param_groups(model, weight_decay=args.weight_decay, layer_decay=layer_decay,
                          lr=args.learning_rate if layer_decay is not None else None)
    entry = optimizer_entry(name)
    kwargs = {"params": groups, "lr": args.learning_rate, **entry.options, **parse_optim_args(args.optim_args, name)}
    if entry.family == "adam":
        kwargs.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    return kwargs


def optimizer_class(args: TrainingArguments) -> Any:
    """The class (or factory) of the optimizer ``args.optim`` names (one of the registry's)."""
    return optimizer_entry(_optim_name(args.optim)).factory()


class LarsTrainerMixin:
    """Trainer mixin: the registry's optimizer that ``optim`` names, trust ratios in the logs.

    Put it first: ``class MyTrainer(LarsTrainerMixin, Trainer)``. Other ``optim`` values go to the
    Trainer unchanged.
    """

    # Provided by the Trainer this is mixed into (declared for type checkers only).
    args: Any
    model: Any
    state: Any
    optimizer: Any
    optimizer_cls_and_kwargs: Any
    add_callback: Callable[[Any], None]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lars_trust_monitor: Optional[TrustRatioMonitor] = None
        self._lars_pending: Optional[tuple[int, dict[str, float]]] = None
        self.add_callback(_ArmOnLoggingSteps(self))

    def create_optimizer(self, model: Optional[torch.nn.Module] = None) -> torch.optim.Optimizer:
        args = self.args
        if self.optimizer is None and is_ours(args.optim) and self.optimizer_cls_and_kwargs is None:
            opt_model = self.model if model is None else model
            kwargs = lars_optimizer_kwargs(args, opt_model)
            self.optimizer = optimizer_entry(_optim_name(args.optim)).build(kwargs.pop("params"), **kwargs)
        optimizer = super().create_optimizer(model)  # type: ignore[misc]
        mode = getattr(args, "lars_monitor", "summary")
        if mode != "off" and self.lars_trust_monitor is None:
            opt_model = self.model if model is None else model
            self.lars_trust_monitor = TrustRatioMonitor(
                opt_model, optimizer, per_layer=mode in ("per_layer", "all"), summaries=mode in ("summary", "all"),
                keep_history=False, on_record=self._lars_recorded,
            )
        return optimizer

    def _lars_recorded(self, step: int, record: dict[str, float]) -> None:
        self._lars_pending = (step, record)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's ``log``, with the trust ratios recorded at this step merged in (training logs only)."""
        pending, step = self._lars_pending, self.state.global_step
        if pending is not None and pending[0] == step and "loss" in logs:
            logs = {**logs, **pending[1]}
            self._lars_pending = None
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


class _ArmOnLoggingSteps(TrainerCallback):
    """Arms the monitor before the optimizer step whose global step the Trainer will log.

    Under DeepSpeed the optimizer steps inside the backward of the step's last micro-batch (the
    Trainer's own ``optimizer.step()`` is a no-op there), so the monitor is armed when the step
    begins; otherwise just before the optimizer step, after the gradients are final.
    """

    def __init__(self, trainer: LarsTrainerMixin) -> None:
        self.trainer = trainer

    def on_step_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if getattr(self.trainer, "is_deepspeed_enabled", False):
            self._arm(args, state)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if not getattr(self.trainer, "is_deepspeed_enabled", False):
            self._arm(args, state)

    def _arm(self, args: TrainingArguments, state: Any) -> None:
        monitor = self.trainer.lars_trust_monitor
        if monitor is None:
            return
        upcoming = state.global_step + 1
        strategy = _optim_name(args.logging_strategy)
        logging_steps = args.logging_steps
        if logging_steps < 1:  # a fraction of max_steps, resolved as TrainerState.compute_steps does: rounded up
            logging_steps = max(1, math.ceil(state.max_steps * logging_steps))
        if strategy == "steps" and (upcoming % logging_steps == 0 or (args.logging_first_step and upcoming == 1)):
            monitor.record_next_step(step=upcoming)
        else:
            monitor.cancel_recording()  # an armed step the scaler skipped (fp16 overflow) must not carry over


class LarsTrainer(LarsTrainerMixin, Trainer):
    """``transformers.Trainer`` with ``optim="lars"`` or ``"lamb"`` (and variants) and trust ratios in its logs."""
