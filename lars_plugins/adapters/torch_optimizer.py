"""torch's optimizers: the step hooks an optimizer has, which torch keeps in private dictionaries.

``Layerwise`` steps the tensors of some bases itself (:mod:`lars_plugins.known_directions`); a hook
registered on the base (``register_step_pre_hook``) or globally
(``torch.optim.optimizer.register_optimizer_step_pre_hook``) expects to run around the base's step
of every tensor, so where there is one the wrapper leaves the whole step to the base.
"""

from __future__ import annotations

from typing import Any

__all__ = ["has_step_hooks"]


def has_step_hooks(optimizer: Any) -> bool:
    """Whether a step pre- or post-hook is registered on ``optimizer`` or on every optimizer."""
    from torch.optim import optimizer as torch_optimizer

    own = (getattr(optimizer, "_optimizer_step_pre_hooks", None),
           getattr(optimizer, "_optimizer_step_post_hooks", None))
    shared = (torch_optimizer._global_optimizer_pre_hooks, torch_optimizer._global_optimizer_post_hooks)
    return any(bool(hooks) for hooks in (*own, *shared))
