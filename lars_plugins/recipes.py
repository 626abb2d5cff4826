"""Large-batch image classification in plain PyTorch: the model, optimizers and training loop that
``lars-plugins demo`` and ``benchmarks/large_batch.py`` share.

A :class:`Recipe` names one optimizer setting (SGD, Nesterov, LARS, AdamW, LAMB, Ranger or
LARS + Ranger; its LR; warm-up or not).
:func:`train` runs it for a fixed budget of epochs from a seed, so two recipes compared at one batch
size see the same initial weights and the same batches. Framework-free: only torch.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .groups import param_groups
from .lamb import LAMB
from .lars import LARS
from .schedules import WarmupDecayLR
from .registry import optimizer_entry
from .wrapper import centralize_gradients_

__all__ = ["RECIPE_OPTIMIZERS", "Recipe", "RunResult", "mlp_bn", "build_optimizer",
           "train", "evaluate", "sgd_linear_lr", "lars_sqrt_lr"]

RECIPE_OPTIMIZERS = ("sgd", "nesterov", "lars", "adamw", "lamb", "ranger", "lars_ranger")
# Ranger's settings (Wright 2019), as in lars_plugins.ranger (which imports timm): RAdam with β1 = 0.95,
# Lookahead every 6 steps halfway back, and Gradient Centralization.
RANGER_BETAS = (0.95, 0.999)
LOOKAHEAD_K, LOOKAHEAD_ALPHA = 6, 0.5


def sgd_linear_lr(batch_size: int) -> float:
    """SGD's LR for :func:`mlp_bn` on Fashion-MNIST by the linear scaling rule: 0.05 at batch 128
    (within 0.1 points of the best LR of the tuning grid there; docs/results.md), times B/128."""
    return 0.05 * batch_size / 128


def lars_sqrt_lr(batch_size: int) -> float:
    """LARS's γ (with η = 0.001) for the same model by square-root scaling: 2·√(B/128), which puts
    γ·η on the best value found at batch 8192 (see docs/results.md)."""
    return 2.0 * math.sqrt(batch_size / 128)


@dataclass(frozen=True)
class Recipe:
    """One optimizer setting. ``lr`` is the peak LR (γ for LARS and LARS + Ranger, RAdam's LR for
    Ranger); ``warmup_epochs`` of linear warm-up, then the paper's poly(2) decay to 0 at the end of the
    budget, per step. The warm-up starts at ``warmup_start`` times the peak LR, or, where it is
    ``None``, at ``1/warmup_steps`` of it (:class:`~lars_plugins.WarmupDecay`)."""

    optimizer: str
    lr: float
    warmup_epochs: float = 0.0
    trust_coefficient: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_start: Optional[float] = None
    state_precision: str = "float32"  # LARS and LAMB only (their state_precision)

    def __post_init__(self) -> None:
        if self.optimizer not in RECIPE_OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(RECIPE_OPTIMIZERS)}, got {self.optimizer!r}")
        for name in ("lr", "trust_coefficient"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("warmup_epochs", "momentum", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.state_precision != "float32" and self.optimizer not in ("lars", "lamb"):
            raise ValueError(f"state_precision={self.state_precision!r} needs optimizer 'lars' or 'lamb' (the ones "
                             f"that store narrow state), got {self.optimizer!r}; leave it at 'float32'")
        if self.warmup_start is not None and (isinstance(self.warmup_start, bool) or not isinstance(
                self.warmup_start, (int, float)) or not 0 <= self.warmup_start <= 1):
            raise ValueError("warmup_start must be None or a factor of the peak LR in [0, 1], "
                             f"got {self.warmup_start!r}")

    def with_lr(self, lr: float) -> "Recipe":
        return replace(self, lr=lr)


@dataclass
class RunResult:
    accuracy: float  # on the evaluation set; 0.0 for a run whose loss became non-finite
    diverged: bool
    steps: int


def mlp_bn(in_features: int = 784, width: int = 512, num_classes: int = 10) -> nn.Sequential:
    """Two hidden layers with BatchNorm (linear layers without bias before it), as in large-batch
    recipes: about 670k parameters for 28x28 images."""
    return nn.Sequential(OrderedDict([
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(in_features, width, bias=False)), ("bn1", nn.BatchNorm1d(width)), ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(width, width, bias=False)), ("bn2", nn.BatchNorm1d(width)), ("relu2", nn.ReLU()),
        ("fc3", nn.Linear(width, num_classes)),
    ]))


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's optimizer. Weight decay goes on weight matrices only, for every optimizer, and
    LARS and LAMB adapt only those (biases and BatchNorm take the plain LR γ, as in the paper's
    recipes). ``adamw`` and ``lamb``: torch's AdamW and :class:`lars_plugins.LAMB` with their default
    betas and ε, ``weight_decay`` decoupled (AdamW's) or inside the update (LAMB's).

    ``ranger``: ``Lookahead(RAdam)`` with Gradient Centralization; ``lars_ranger``: the registry's
    ``lars_ranger`` (:class:`lars_plugins.LarsRanger`: ``Lookahead(Layerwise(RAdam, η,
    centralize_gradients=True))``, the trust ratio on RAdam's update; Lookahead from timm)."""
    groups = param_groups(model, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "lars":
        return LARS(groups, lr=recipe.lr, momentum=recipe.momentum, trust_coefficient=recipe.trust_coefficient,
                    state_precision=recipe.state_precision)
    if recipe.optimizer == "lamb":
        return LAMB(groups, lr=recipe.lr, state_precision=recipe.state_precision)
    plain = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups]
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(plain, lr=recipe.lr)
    if recipe.optimizer == "lars_ranger":
        return optimizer_entry("lars_ranger").build(plain, lr=recipe.lr, trust_coefficient=recipe.trust_coefficient)
    if recipe.optimizer == "ranger":
        radam = torch.optim.RAdam(plain, lr=recipe.lr, betas=RANGER_BETAS)
        # Gradient Centralization as a step pre-hook: the same step composes with any optimizer.
        radam.register_step_pre_hook(lambda optimizer, *_: centralize_gradients_(
            [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]))
        return _lookahead(radam)
    return torch.optim.SGD(plain, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.optimizer == "nesterov")


def _lookahead(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    try:
        from timm.optim import Lookahead
    except ImportError as err:
        raise ImportError('the Ranger recipes use timm\'s Lookahead: pip install "lars_plugins[timm]"') from err
    return Lookahead(optimizer, alpha=LOOKAHEAD_ALPHA, k=LOOKAHEAD_K)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 4096) -> float:
    """Top-1 accuracy in eval mode (BatchNorm's running statistics)."""
    was_training = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(y), batch_size))
    model.train(was_training)
    return correct / len(y)


def train(
    model: nn.Module,
    recipe: Recipe,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int,
    epochs: int,
    seed: int,
    eval_set: Optional[tuple[Tensor, Tensor]] = None,
    on_start: Optional[Callable[[torch.optim.Optimizer], None]] = None,
    on_epoch: Optional[Callable[[int], None]] = None,
) -> RunResult:
    """Train ``model`` in place for ``epochs`` epochs (the last batch of an epoch may be smaller);
    return the accuracy on ``eval_set`` at the end. The batch order depends on ``seed`` alone.

    A run whose training loss becomes non-finite stops at the end of that epoch and scores 0.
    ``on_start(optimizer)`` is called once before the first step (to attach a monitor, say), and
    ``on_epoch(epoch)`` after each epoch (1-based; for a progress bar).
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not (isinstance(epochs, int) and epochs >= 1):
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    n = len(y)
    steps_per_epoch = -(-n // batch_size)
    total = epochs * steps_per_epoch
    warmup = min(total, round(recipe.warmup_epochs * steps_per_epoch))
    optimizer = build_optimizer(model, recipe)
    scheduler = WarmupDecayLR(optimizer, total_steps=total, warmup_steps=warmup, decay="poly",
                              warmup_start=recipe.warmup_start)
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    if on_start is not None:
        on_start(optimizer)
    model.train()
    steps = 0
    for epoch in range(1, epochs + 1):
        losses = []
        for idx in torch.randperm(n, generator=generator).split(batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            scheduler.step()
            steps += 1
            losses.append(loss.detach())
        if not bool(torch.stack(losses).isfinite().all()):  # one host sync per epoch
            return RunResult(0.0, True, steps)
        if on_epoch is not None:
            on_epoch(epoch)
    accuracy = evaluate(model, *eval_set) if eval_set is not None else math.nan
    return RunResult(accuracy, False, steps)
