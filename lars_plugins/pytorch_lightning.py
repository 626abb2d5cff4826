"""The ``pytorch_lightning`` twin of :mod:`lars_plugins.lightning`: the same names, built on this namespace's
``Callback`` and ``LightningCLI`` (LightningCLI accepts only its own namespace's callbacks)."""

from __future__ import annotations

try:
    import pytorch_lightning as _pl
    from pytorch_lightning.cli import LightningCLI as _CLI
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError('lars_plugins.pytorch_lightning needs pytorch-lightning: '
                      'pip install "lars_plugins[pytorch-lightning]"') from err

from ._lightning import LarsCLIMixin, TrustRatioCallbackMixin, configure_lars
from .lars import LARS
from .schedules import WarmupDecayLR

__all__ = ["configure_lars", "TrustRatioCallback", "LarsCLI", "LARS", "WarmupDecayLR"]


class TrustRatioCallback(TrustRatioCallbackMixin, _pl.Callback):
    """Per-layer trust ratios to the Trainer's loggers on its logging steps (see the mixin for how)."""


class LarsCLI(LarsCLIMixin, _CLI):
    """``LightningCLI`` that steps ``--lr_scheduler`` every optimizer step (LARS recipes decay per step)."""
