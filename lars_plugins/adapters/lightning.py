"""Lightning (``lightning`` or ``pytorch_lightning``): what its own ``LearningRateMonitor`` reads.

The callbacks here log on the batches Lightning logs and at the step ``self.log`` uses; Lightning
exposes neither publicly, and its ``LearningRateMonitor`` reads the same private attributes.
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["attached_trainer", "logs_this_batch", "logging_step", "wrapped_optimizer"]


def attached_trainer(module: Any) -> Optional[Any]:
    """The Trainer a ``LightningModule`` is attached to, without the error ``module.trainer`` raises
    when there is none (``_trainer``)."""
    return getattr(module, "_trainer", None)


def logs_this_batch(trainer: Any) -> bool:
    """Whether the Trainer logs on the current batch (``log_every_n_steps``;
    ``_logger_connector.should_update_logs``)."""
    return bool(trainer._logger_connector.should_update_logs)


def logging_step(trainer: Any) -> int:
    """The step under which the current batch's ``self.log`` metrics are logged
    (``fit_loop.epoch_loop._batches_that_stepped``)."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def wrapped_optimizer(optimizer: Any) -> Optional[Any]:
    """The torch optimizer inside a ``LightningOptimizer`` (``_optimizer``), or ``None``."""
    return getattr(optimizer, "_optimizer", None)
