"""lars_plugins: LARS (Layer-wise Adaptive Rate Scaling) for PyTorch, timm, HF Trainer and Lightning.

``import lars_plugins`` needs torch alone; the framework integrations live in submodules
(``lars_plugins.timm``, ``lars_plugins.hf``, ``lars_plugins.lightning``) that import their framework
only when they are imported themselves. ``lars_plugins.plot`` needs matplotlib (the ``plot`` extra).

``lars_plugins.lars`` is the module of :class:`LARS`; the update rule as a function over tensor
lists is :func:`lars_plugins.functional.lars`. The names below are imported on first use, so that
reading and plotting histories
(:mod:`lars_plugins.history`, :mod:`lars_plugins.plot`, ``lars-plugins plot``) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "LARS": ".lars", "LAMB": ".lamb", "Layerwise": ".wrapper", "LayerwiseAdamW": ".wrapper", "LarsRanger": ".ranger",
    "centralize_gradients_": ".wrapper", "OptimizerEntry": ".registry", "register_optimizer": ".registry",
    "optimizer_names": ".registry",
    "WarmupDecayLR": ".schedules", "TrustRatioMonitor": ".monitor", "TrustRatioHistory": ".history",
    "param_groups": ".groups", "default_exclude": ".groups", "is_bias_or_norm": ".groups", "block_ids": ".blocks",
    "trust_ratio": ".functional",
}

__all__ = ["LARS", "LAMB", "Layerwise", "LayerwiseAdamW", "LarsRanger", "centralize_gradients_", "WarmupDecayLR",
           "TrustRatioMonitor", "TrustRatioHistory", "param_groups", "default_exclude", "is_bias_or_norm", "block_ids",
           "trust_ratio", "OptimizerEntry", "register_optimizer", "optimizer_names", "__version__"]

if TYPE_CHECKING:
    from .blocks import block_ids
    from .functional import trust_ratio
    from .groups import default_exclude, is_bias_or_norm, param_groups
    from .history import TrustRatioHistory
    from .lamb import LAMB
    from .monitor import TrustRatioMonitor
    from .lars import LARS
    from .ranger import LarsRanger
    from .registry import OptimizerEntry, optimizer_names, register_optimizer
    from .schedules import WarmupDecayLR
    from .wrapper import Layerwise, LayerwiseAdamW, centralize_gradients_


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lars_plugins' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
