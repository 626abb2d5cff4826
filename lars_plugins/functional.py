"""The update rules as plain functions over lists of tensors (no framework, no optimizer state):
LARS's in :mod:`lars_plugins.lars_rule`, LAMB's in :mod:`lars_plugins.lamb_rule`, the helpers they
share in :mod:`lars_plugins.tensor_lists`. This module is their public face."""

from __future__ import annotations

from .lamb_rule import lamb, lamb_directions, lamb_trust_ratio
from .lars_rule import lars, trust_ratio
from .tensor_lists import ratio_dtype

__all__ = ["lars", "trust_ratio", "lamb", "lamb_trust_ratio", "lamb_directions", "ratio_dtype"]
