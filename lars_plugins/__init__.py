"""lars_plugins: LARS (Layer-wise Adaptive Rate Scaling) for PyTorch, timm, HF Trainer and Lightning.

``import lars_plugins`` needs torch alone; the framework integrations live in submodules
(``lars_plugins.timm``, ``lars_plugins.hf``, ``lars_plugins.lightning``) that import their framework
only when they are imported themselves. ``lars_plugins.plot`` needs matplotlib (the ``plot`` extra).
"""

from .functional import lars, trust_ratio
from .groups import block_ids, default_exclude, is_bias_or_norm, param_groups
from .history import TrustRatioHistory
from .monitor import TrustRatioMonitor
from .lamb import LAMB
from .optim import LARS
from .schedules import WarmupDecayLR
from .wrapper import Layerwise, centralize_gradients_

__version__ = "0.1.0"

__all__ = ["LARS", "LAMB", "Layerwise", "centralize_gradients_", "WarmupDecayLR", "TrustRatioMonitor",
           "TrustRatioHistory", "param_groups", "default_exclude", "is_bias_or_norm", "block_ids", "lars",
           "trust_ratio", "__version__"]
