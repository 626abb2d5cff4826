"""What ``lars_plugins.lightning`` and ``lars_plugins.pytorch_lightning`` share, importing neither.

Lightning ships as two namespaces (``lightning.pytorch`` and ``pytorch_lightning``) whose classes are
distinct, and LightningCLI accepts a callback only if it subclasses its own namespace's ``Callback``.
So the logic lives here in mixins, and each namespace module declares its two small classes:
``class TrustRatioCallback(TrustRatioCallbackMixin, Callback)`` and
``class LarsCLI(LarsCLIMixin, LightningCLI)``.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

from torch import nn

from .adapters import lightning as lightning_adapter
from .groups import ExcludeT, param_groups, renamed_exclude
from .history import METRICS, STATS_SUFFIX
from .monitor import TrustRatioMonitor, check_options
from .registry import optimizer_entry
from .schedules import WarmupDecayLR

__all__ = ["configure_lars", "TrustRatioCallbackMixin", "LarsCLIMixin"]


def configure_lars(
    module: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    *,
    optimizer: str = "lars",
    warmup_steps: int = 0,
    decay: str = "cosine",
    power: float = 2.0,
    min_lr_ratio: float = 0.0,
    total_steps: Optional[int] = None,
    layer_decay: Optional[float] = None,
    exclude_if: ExcludeT = None,
    **optimizer_kwargs: Any,
) -> dict[str, Any]:
    """What ``LightningModule.configure_optimizers`` returns for one of the registry's optimizers (LARS
    by default) with a per-step LR schedule.

    ``optimizer`` is a name of :mod:`lars_plugins.registry` (``lars``, ``larc``, ``nlars``, ``nlarc``,
    ``lamb``, ``lamb_clip``, ``layerwise_adamw``, ``lars_ranger``, or one you registered);
    ``optimizer_kwargs`` go to it (LARS: ``momentum``, ``trust_coefficient``…; LAMB: ``betas``,
    ``eps``…, their defaults otherwise).
    Groups from :func:`lars_plugins.param_groups` (biases and norms not adapted, not decayed;
    optional ``layer_decay``), then :class:`~lars_plugins.schedules.WarmupDecayLR`: linear warm-up
    over ``warmup_steps``, then ``decay`` (``cosine``, ``poly`` -- the paper's ``(1 - t/T)^power`` --,
    ``linear`` or ``constant``) to ``min_lr_ratio·lr`` at ``total_steps``, stepped every optimizer step.
    ``total_steps`` defaults to ``module.trainer.estimated_stepping_batches``.
    """
    trainer = lightning_adapter.attached_trainer(module)
    if total_steps is None:
        if trainer is None:
            raise ValueError("total_steps is needed when the module is not attached to a Trainer "
                             "(inside configure_optimizers it is taken from trainer.estimated_stepping_batches)")
        estimated = trainer.estimated_stepping_batches
        if estimated == float("inf"):
            raise ValueError("the Trainer has no finite length (max_steps=-1 and max_epochs=-1): pass total_steps")
        total_steps = int(estimated)
    entry = optimizer_entry(optimizer)
    if "exclude" in optimizer_kwargs:  # its former name
        exclude_if = renamed_exclude(exclude_if, {"exclude": optimizer_kwargs.pop("exclude")}, "configure_lars")
    groups = param_groups(module, weight_decay=weight_decay, exclude_if=exclude_if, layer_decay=layer_decay,
                          lr=lr if layer_decay is not None else None)
    built = entry.build(groups, lr=lr, **optimizer_kwargs)
    scheduler = WarmupDecayLR(built, total_steps=total_steps, warmup_steps=warmup_steps, decay=decay,
                              power=power, min_lr_ratio=min_lr_ratio)
    return {"optimizer": built, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


class TrustRatioCallbackMixin:
    """Log per-layer trust ratios, norms and effective LRs on Lightning's logging steps.

    A thin layer over :class:`lars_plugins.TrustRatioMonitor`: one monitor per optimizer of the
    Trainer, armed in ``on_train_batch_start`` on the batches Lightning logs (``log_every_n_steps``,
    the same test Lightning's own ``LearningRateMonitor`` uses) and read in ``on_train_batch_end``,
    where the values go to every logger of the Trainer under the step Lightning uses for
    ``self.log`` metrics of that batch. Other steps cost nothing. Gradient accumulation: the record
    is of the optimizer step that ends the accumulation. AMP: a step the scaler skips records
    nothing. Manual optimization and several optimizers work (each optimizer's steps are recorded;
    summary keys of optimizer ``i > 0`` end in ``_opt{i}``).

    Args:
        per_layer: log one value per parameter tensor and metric.
        summaries: log ``{metric}_stats/min|median|max``.
        metrics: which of ``trust_ratio``, ``effective_lr``, ``weight_norm``, ``grad_norm``.
    """

    def __init__(self, per_layer: bool = True, summaries: bool = True, metrics: Sequence[str] = METRICS) -> None:
        super().__init__()
        check_options(per_layer=per_layer, summaries=summaries, metrics=metrics)  # now, not at the first step
        self.per_layer, self.summaries, self.metrics = per_layer, summaries, list(metrics)
        self.monitors: list[TrustRatioMonitor] = []
        self._pending: dict[str, float] = {}

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._remove()
        for index, optimizer in enumerate(trainer.optimizers):
            suffix = f"_opt{index}" if index else ""
            self.monitors.append(TrustRatioMonitor(
                pl_module, optimizer, per_layer=self.per_layer, summaries=self.summaries, metrics=self.metrics,
                keep_history=False, on_record=functools.partial(self._collect, suffix),
            ))

    def _collect(self, suffix: str, step: int, record: dict[str, float]) -> None:
        if suffix:
            record = {(k.replace(STATS_SUFFIX + "/", f"{STATS_SUFFIX}{suffix}/") if STATS_SUFFIX + "/" in k else k): v
                      for k, v in record.items()}
        self._pending.update(record)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self.monitors:
            return
        if lightning_adapter.logs_this_batch(trainer):  # what Lightning's LearningRateMonitor checks
            for monitor in self.monitors:
                monitor.record_next_step()
        else:
            for monitor in self.monitors:
                monitor.cancel_recording()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._pending:
            return
        step = lightning_adapter.logging_step(trainer)  # the step of this batch's self.log metrics
        for logger in trainer.loggers:
            logger.log_metrics(self._pending, step=step)
        self._pending = {}

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._remove()

    def _remove(self) -> None:
        for monitor in self.monitors:
            monitor.remove()
        self.monitors, self._pending = [], {}


class LarsCLIMixin:
    """LightningCLI whose ``--lr_scheduler`` is stepped every optimizer step, not every epoch
    (LARS recipes decay per step), e.g. ``--optimizer lars_plugins.LARS --lr_scheduler
    lars_plugins.WarmupDecayLR --lr_scheduler.total_steps 1000 --lr_scheduler.warmup_steps 50``.
    Importing its module imports ``lars_plugins``, so the short ``--optimizer LARS`` resolves too."""

    @staticmethod
    def configure_optimizers(lightning_module: Any, optimizer: Any, lr_scheduler: Any = None) -> Any:
        if lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "interval": "step"}}
