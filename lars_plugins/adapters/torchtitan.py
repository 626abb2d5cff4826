"""torchtitan: how ``OptimizersContainer`` turns an ``optimizer_name`` into an optimizer.

torchtitan 0.3 resolves names in a private static method, ``_resolve_optimizer_factory``, with a
closed table (``Adam``, ``AdamW``, ``DistMuon``), and documents subclassing the container as the way
to customise it; a subclass that adds names overrides that method. Both the override and the
lookup of torchtitan's own names live here.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

__all__ = ["builtin_factory", "container_resolving"]


def builtin_factory(name: str) -> Optional[Callable[..., Any]]:
    """torchtitan's own factory for ``name`` (``"AdamW"``…), or ``None`` where it has none."""
    from torchtitan.components.optimizer import OptimizersContainer

    try:
        return OptimizersContainer._resolve_optimizer_factory(name)
    except NotImplementedError:  # "Optimizer X not added."
        return None


def container_resolving(base: type, resolve: Callable[[Any, str], Callable[..., Any]]) -> Callable[[type], type]:
    """A class decorator for a subclass of torchtitan's ``OptimizersContainer`` (``base``): its
    optimizer names are resolved by ``resolve(container, name)``, called during ``__init__`` with
    the container being built."""

    def decorate(cls: type) -> type:
        if not issubclass(cls, base):
            raise TypeError(f"{cls.__name__} must subclass {base.__name__}")

        def _resolve_optimizer_factory(self: Any, name: str) -> Callable[..., Any]:
            return resolve(self, name)

        cls._resolve_optimizer_factory = _resolve_optimizer_factory  # type: ignore[attr-defined]
        return cls

    return decorate
