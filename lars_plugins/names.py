"""The names frameworks select our optimizers by: one table for the HF Trainer and Lightning helpers.

timm takes the same variants under its own naming rules (no ``_``; ``lp`` before names timm
already uses): see :mod:`lars_plugins.timm`.
"""

from __future__ import annotations

import difflib
from typing import Any, Union

from .lamb import LAMB, LAMB_VARIANTS
from .optim import LARS, VARIANTS

__all__ = ["OPTIMIZERS", "optimizer_by_name"]

OptimizerClass = Union[type[LARS], type[LAMB]]

# name -> (optimizer class, the keywords the name implies)
OPTIMIZERS: dict[str, tuple[OptimizerClass, dict[str, Any]]] = {
    **{name: (LARS, keywords) for name, keywords in VARIANTS.items()},
    **{name: (LAMB, keywords) for name, keywords in LAMB_VARIANTS.items()},
}


def optimizer_by_name(name: str) -> tuple[OptimizerClass, dict[str, Any]]:
    """``(class, keywords)`` for one of :data:`OPTIMIZERS`' names; a ``ValueError`` listing them otherwise."""
    key = str(name).lower()
    if key not in OPTIMIZERS:
        close = difflib.get_close_matches(key, OPTIMIZERS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"optimizer {name!r} is not one of lars_plugins' names ({', '.join(OPTIMIZERS)}){hint}")
    return OPTIMIZERS[key]
