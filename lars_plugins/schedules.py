"""Per-step LR schedules for large-batch training: linear warm-up, then cosine or polynomial decay.

:class:`WarmupDecayLR` is a ``torch.optim.lr_scheduler.LambdaLR`` whose factor is a small callable
object, so its state dict holds plain numbers (``torch.load(weights_only=True)`` works) and it scales
each group's own initial LR (layer-wise LR decay keeps its ratios). Unlike lightning-bolts'
``LinearWarmupCosineAnnealingLR``, the LR never climbs again after ``total_steps`` and
``warmup_steps == total_steps`` is not an error.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional, cast

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupDecay", "WarmupDecayLR", "DECAYS"]

DECAYS = ("cosine", "poly", "linear", "constant")


class WarmupDecay:
    """LR factor at step ``t``: linear warm-up over ``warmup_steps``, then ``decay`` from 1 to
    ``min_lr_ratio`` at ``total_steps``, constant after. ``poly`` is the paper's ``(1 - t/T)^power``
    (power 2 in its experiments).

    The warm-up climbs from ``1/warmup_steps`` at step 0 to 1 (``(t+1)/warmup_steps``), or, with
    ``warmup_start=s``, from exactly ``s`` at step 0 to 1 at ``warmup_steps`` (``s + (1-s)·t/warmup_steps``,
    the form of torch's ``LinearLR``): the first LR is then stated, not a consequence of the length.
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0, decay: str = "cosine", power: float = 2.0,
                 min_lr_ratio: float = 0.0, warmup_start: Optional[float] = None) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be an int in [0, total_steps={total_steps}], got {warmup_steps!r}")
        if decay not in DECAYS:
            raise ValueError(f"decay must be one of {', '.join(DECAYS)}, got {decay!r}")
        if not power > 0:
            raise ValueError(f"power must be > 0, got {power!r}")
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
        if warmup_start is not None and (isinstance(warmup_start, bool) or not isinstance(warmup_start, (int, float))
                                         or not 0 <= warmup_start <= 1):
            raise ValueError(f"warmup_start must be None (warm-up from 1/warmup_steps) or a factor of the peak LR in "
                             f"[0, 1], got {warmup_start!r}")
        self.warmup_start = None if warmup_start is None else float(warmup_start)
        self.total_steps, self.warmup_steps, self.decay = total_steps, warmup_steps, decay
        self.power, self.min_lr_ratio = float(power), float(min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            if self.warmup_start is None:
                return (step + 1) / self.warmup_steps
            return self.warmup_start + (1.0 - self.warmup_start) * step / self.warmup_steps
        span = self.total_steps - self.warmup_steps
        progress = 1.0 if span <= 0 else min(1.0, (step - self.warmup_steps) / span)
        if self.decay == "constant":
            shape = 1.0
        elif self.decay == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif self.decay == "linear":
            shape = 1.0 - progress
        else:
            shape = (1.0 - progress) ** self.power
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


class WarmupDecayLR(LambdaLR):
    """``LambdaLR`` with :class:`WarmupDecay`; step it once per optimizer step.

    ``total_steps`` and ``warmup_steps`` count this scheduler's steps. A scheduler stepped less often
    than its optimizer (LightningCLI's default, once per epoch) would stay in warm-up for
    ``warmup_steps`` epochs and never decay within the run; that is detected: when two steps in a row
    each come after more than one optimizer step (a cadence, not one late start as under
    ``SequentialLR``), it warns, once, saying how to step it per step.
    """

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, decay: str = "cosine",
                 power: float = 2.0, min_lr_ratio: float = 0.0, last_epoch: int = -1,
                 warmup_start: Optional[float] = None) -> None:
        # Before the base constructor, whose initial step() reads them.
        self._optimizer_steps = 0  # optimizer steps since this scheduler's last step
        self._slow_steps_in_a_row = 0  # scheduler steps in a row that each followed several optimizer steps
        self._warned_slow_stepping = False
        super().__init__(optimizer, WarmupDecay(total_steps, warmup_steps, decay, power, min_lr_ratio,
                                                    warmup_start),
                         last_epoch=last_epoch)
        self._step_hook = optimizer.register_step_post_hook(self._count_optimizer_step)

    def _count_optimizer_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self._optimizer_steps += 1

    def step(self, epoch: Optional[int] = None) -> None:
        steps = self._optimizer_steps
        slow = steps > 1 and epoch is None  # an explicit epoch is a jump, not a cadence
        self._slow_steps_in_a_row = self._slow_steps_in_a_row + 1 if slow else 0
        if self._slow_steps_in_a_row >= 2 and not self._warned_slow_stepping:
            self._warned_slow_stepping = True
            schedule = cast(WarmupDecay, self.lr_lambdas[0])
            warnings.warn(
                f"WarmupDecayLR was stepped once for {steps} optimizer steps, but its total_steps="
                f"{schedule.total_steps} and warmup_steps={schedule.warmup_steps} count its own steps, so "
                "the schedule runs that much slower than training. Call scheduler.step() after every "
                "optimizer.step(); in Lightning use interval='step' (configure_lars and LarsCLI do: "
                "a plain LightningCLI steps --lr_scheduler once per epoch).", UserWarning, stacklevel=2)
        self._optimizer_steps = 0
        super().step(epoch)

    def state_dict(self) -> dict[str, Any]:
        """As ``LambdaLR``'s: plain numbers only (``torch.load(weights_only=True)`` works)."""
        state = super().state_dict()
        state.pop("_step_hook", None)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        hook = self._step_hook
        super().load_state_dict(state_dict)
        self._step_hook = hook
