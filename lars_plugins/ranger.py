"""``LarsRanger``: LARS + Ranger (Lookahead over LARS's trust ratio on RAdam's update, with Gradient
Centralization) as one class. Needs timm, whose ``Lookahead`` it is: imported on first use only."""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from .wrapper import Layerwise

try:
    from timm.optim import Lookahead
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError('LarsRanger uses timm\'s Lookahead: pip install "lars_plugins[timm]"') from err

__all__ = ["LarsRanger", "RANGER_BETAS", "LOOKAHEAD_K", "LOOKAHEAD_ALPHA"]

# Ranger's settings (Wright 2019): RAdam with β1 = 0.95, Lookahead every 6 steps halfway back.
RANGER_BETAS = (0.95, 0.999)
LOOKAHEAD_K, LOOKAHEAD_ALPHA = 6, 0.5


class LarsRanger(Lookahead):
    """``Lookahead(Layerwise(RAdam(params, ...), centralize_gradients=True))``: the registry's
    ``lars_ranger`` and a class path for LightningCLI (``--optimizer lars_plugins.LarsRanger``).

    The trust ratio rescales each layer's RAdam update (docs/optimizers.md), gradients are
    centralised before RAdam's step, and Lookahead, around the wrapper, pulls the weights halfway back
    to its slow copy every ``lookahead_k`` steps. The same optimizer as the ``lars_ranger`` recipe of
    the benchmarks.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: Union[float, Tensor] = 1e-3,
        betas: tuple[float, float] = RANGER_BETAS,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        trust_coefficient: float = 0.001,
        trust_eps: float = 1e-8,
        trust_clip: bool = False,
        exclude_bias_and_norm: bool = True,
        centralize_gradients: bool = True,
        lookahead_k: int = LOOKAHEAD_K,
        lookahead_alpha: float = LOOKAHEAD_ALPHA,
    ) -> None:
        inner = Layerwise(torch.optim.RAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay),
                          trust_coefficient=trust_coefficient, trust_eps=trust_eps, trust_clip=trust_clip,
                          exclude_bias_and_norm=exclude_bias_and_norm, centralize_gradients=centralize_gradients)
        super().__init__(inner, alpha=lookahead_alpha, k=lookahead_k)
