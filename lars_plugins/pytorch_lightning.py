"""The ``pytorch_lightning`` twin of :mod:`lars_plugins.lightning`: the same names, built on this namespace's
``Callback`` and ``LightningCLI`` (LightningCLI accepts only its own namespace's callbacks)."""

from __future__ import annotations

from typing import Sequence

try:
    import pytorch_lightning as _pl
    from pytorch_lightning.cli import LightningCLI as _CLI
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError('lars_plugins.pytorch_lightning needs pytorch-lightning: '
                      'pip install "lars_plugins[pytorch-lightning]"') from err

from ._lightning import LarsCLIMixin, TrustRatioCallbackMixin, configure_lars
from .history import METRICS
from .optim import LARS
from .schedules import WarmupDecayLR

__all__ = ["configure_lars", "TrustRatioCallback", "LarsCLI", "LARS", "WarmupDecayLR"]


class TrustRatioCallback(TrustRatioCallbackMixin, _pl.Callback):
    """Per-layer trust ratios, norms and effective LRs to the Trainer's loggers, on its logging steps.

    Args:
        per_layer: log one value per parameter tensor and metric.
        summaries: log ``{metric}_stats/min|median|max``.
        metrics: which of ``trust_ratio``, ``effective_lr``, ``weight_norm``, ``grad_norm``.

    How it hooks Lightning (steps, accumulation, AMP, several optimizers): :class:`TrustRatioCallbackMixin`.
    """

    def __init__(self, per_layer: bool = True, summaries: bool = True, metrics: Sequence[str] = METRICS) -> None:
        # Declared here, typed, for LightningCLI's --trainer.callbacks.init_args.
        super().__init__(per_layer=per_layer, summaries=summaries, metrics=metrics)


class LarsCLI(LarsCLIMixin, _CLI):
    """``LightningCLI`` that steps ``--lr_scheduler`` every optimizer step (LARS recipes decay per step)."""
