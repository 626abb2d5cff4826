"""The shared large-batch training loop against a loop written here with torch's own SGD and LambdaLR."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lars_plugins.recipes import Recipe, evaluate, mlp_bn, train


def toy_data(n=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return x, y


def reference_loop(model, x, y, *, lr, batch_size, epochs, seed, warmup, nesterov, weight_decay=5e-4):
    """SGD with momentum 0.9, weight decay on ≥2-D weights only, linear warm-up then (1 - t/T)^2."""
    decayed = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.SGD([{"params": decayed, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}],
                          lr=lr, momentum=0.9, nesterov=nesterov)
    steps_per_epoch = math.ceil(len(y) / batch_size)
    total = epochs * steps_per_epoch

    def factor(t):
        if t < warmup:
            return (t + 1) / warmup
        return (1 - min(1.0, (t - warmup) / (total - warmup))) ** 2

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()


@pytest.mark.parametrize("optimizer,warmup_epochs", [("sgd", 0.0), ("nesterov", 1.0)])
def test_sgd_recipes_match_torch_sgd_with_the_stated_schedule(optimizer, warmup_epochs):
    x, y = toy_data()
    torch.manual_seed(3)
    ours, theirs = mlp_bn(width=32), mlp_bn(width=32)
    theirs.load_state_dict(ours.state_dict())
    train(ours, Recipe(optimizer, 0.2, warmup_epochs=warmup_epochs), x, y, batch_size=32, epochs=3, seed=5)
    reference_loop(theirs, x, y, lr=0.2, batch_size=32, epochs=3, seed=5, warmup=round(warmup_epochs * 3),
                   nesterov=optimizer == "nesterov")
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_lars_recipe_adapts_only_the_weight_matrices():
    x, y = toy_data()
    torch.manual_seed(0)
    model = mlp_bn(width=32)
    seen = {}
    train(model, Recipe("lars", 4.0), x, y, batch_size=96, epochs=1, seed=0,
          on_start=lambda opt: seen.update(groups=[(g["exclude"], [p.ndim for p in g["params"]])
                                                   for g in opt.param_groups]))
    adapted = [ndims for excluded, ndims in seen["groups"] if not excluded]
    excluded = [ndims for excluded, ndims in seen["groups"] if excluded]
    assert sorted(n for g in adapted for n in g) == [2, 2, 2]  # fc1, fc2, fc3 weights
    assert all(n == 1 for g in excluded for n in g) and sum(len(g) for g in excluded) == 5  # 2 BN x 2, fc3.bias


def test_a_diverged_run_scores_zero_and_says_so():
    x, y = toy_data()
    torch.manual_seed(0)
    result = train(mlp_bn(width=32), Recipe("sgd", 1e12), x, y, batch_size=32, epochs=3, seed=0, eval_set=(x, y))
    assert result.diverged and result.accuracy == 0.0
    assert result.steps == 3  # stopped at the end of the first epoch


def test_evaluate_counts_correct_predictions_in_eval_mode():
    model = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4))
    model[1].running_mean.fill_(0.0)
    model[1].running_var.fill_(1.0)
    x = torch.eye(4).reshape(4, 1, 2, 2) * 5
    assert evaluate(model, x, torch.tensor([0, 1, 2, 0]), batch_size=3) == 0.75
    assert model.training  # restored


@pytest.mark.parametrize("kwargs,message", [
    (dict(optimizer="adam", lr=1.0), "optimizer must be one of sgd, nesterov, lars"),
    (dict(optimizer="sgd", lr=0.0), "lr must be a finite number > 0"),
    (dict(optimizer="lars", lr=float("inf")), "lr must be a finite number > 0"),
    (dict(optimizer="lars", lr=1.0, trust_coefficient=-1e-3), "trust_coefficient must be"),
    (dict(optimizer="sgd", lr=1.0, warmup_epochs=-1), "warmup_epochs must be a finite number >= 0"),
    # inf reached train() and ended in an OverflowError from round()
    (dict(optimizer="sgd", lr=1.0, warmup_epochs=float("inf")), "warmup_epochs must be a finite number >= 0"),
    (dict(optimizer="sgd", lr=1.0, warmup_epochs=float("nan")), "warmup_epochs must be a finite number >= 0"),
    (dict(optimizer="sgd", lr=1.0, momentum=float("nan")), "momentum must be a finite number >= 0"),
    (dict(optimizer="lars", lr=1.0, weight_decay=-1e-4), "weight_decay must be a finite number >= 0"),
    (dict(optimizer="lars", lr=1.0, warmup_start=2.0), "warmup_start must be None or a factor"),
    (dict(optimizer="nesterov", lr=1.0, state_precision="int8"), "needs optimizer 'lars' or 'lamb'"),
])
def test_bad_recipes_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Recipe(**kwargs)


def test_bad_budgets_are_refused():
    x, y = toy_data()
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        train(mlp_bn(width=8), Recipe("sgd", 0.1), x, y, batch_size=0, epochs=1, seed=0)
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        train(mlp_bn(width=8), Recipe("sgd", 0.1), x, y, batch_size=8, epochs=0, seed=0)
