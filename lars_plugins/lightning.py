"""PyTorch Lightning (``lightning.pytorch``) integration: ``configure_lars``, ``LarsCLI``, ``TrustRatioCallback``.

For the ``pytorch_lightning`` namespace use :mod:`lars_plugins.pytorch_lightning`, which has the same
names built on that namespace's classes (LightningCLI accepts only its own namespace's callbacks).

* :func:`configure_lars`: the dict ``configure_optimizers`` returns -- LARS with bias/norm groups and
  a per-step warm-up + cosine/poly schedule, total steps from ``trainer.estimated_stepping_batches``;
* ``LarsCLI``: ``LightningCLI`` that steps ``--lr_scheduler`` every optimizer step;
* ``TrustRatioCallback``: per-layer trust ratios to the Trainer's loggers on its logging steps.

``--optimizer lars_plugins.LARS`` works in any ``LightningCLI``; ``--optimizer LARS`` once
``lars_plugins`` is imported (as importing this module does).
"""

from __future__ import annotations

try:
    import lightning.pytorch as _pl
    from lightning.pytorch.cli import LightningCLI as _CLI
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError('lars_plugins.lightning needs lightning: pip install "lars_plugins[lightning]"') from err

from ._lightning import LarsCLIMixin, TrustRatioCallbackMixin, configure_lars
from .lars import LARS
from .schedules import WarmupDecayLR

__all__ = ["configure_lars", "TrustRatioCallback", "LarsCLI", "LARS", "WarmupDecayLR"]


class TrustRatioCallback(TrustRatioCallbackMixin, _pl.Callback):
    """Per-layer trust ratios to the Trainer's loggers on its logging steps (see the mixin for how)."""


class LarsCLI(LarsCLIMixin, _CLI):
    """``LightningCLI`` that steps ``--lr_scheduler`` every optimizer step (LARS recipes decay per step)."""
