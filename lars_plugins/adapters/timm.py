"""timm: the registry ``create_optimizer_v2`` reads (``timm.optim._optim_factory.default_registry``).

timm offers ``register`` on its registry but no way to replace or remove an entry quietly; these
read and write its private table of entries by name.
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["default_registry", "registered", "registered_names", "remove", "put", "lookahead_base"]


def default_registry() -> Any:
    """The ``OptimizerRegistry`` ``create_optimizer_v2`` and ``train.py`` look names up in."""
    from timm.optim._optim_factory import default_registry as registry

    return registry


def registered(registry: Any, name: str) -> Optional[Any]:
    """The ``OptimInfo`` registered under ``name``, or ``None``."""
    return registry._optimizers.get(name)


def registered_names(registry: Any) -> list[str]:
    """Every name in the registry."""
    return list(registry._optimizers)


def remove(registry: Any, name: str) -> None:
    """Take ``name`` out of the registry."""
    del registry._optimizers[name]


def put(registry: Any, name: str, info: Any) -> None:
    """Put ``info`` back under ``name`` without timm's overwrite warning."""
    registry._optimizers[name] = info


def lookahead_base(optimizer: Any) -> Optional[Any]:
    """The optimizer inside timm's ``Lookahead`` (``_base_optimizer``; ``base_optimizer`` before
    timm 1.0), or ``None`` for anything else."""
    return getattr(optimizer, "_base_optimizer", None) or getattr(optimizer, "base_optimizer", None)
