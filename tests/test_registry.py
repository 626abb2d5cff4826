"""One registry: a new optimizer is one entry, selectable by name in timm, the HF Trainer and
Lightning, with its trust ratios in the monitor; the built-in names, the wrapper's included."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import Optimizer

import lars_plugins
from lars_plugins import Layerwise, OptimizerEntry, TrustRatioMonitor, register_optimizer
from lars_plugins.registry import optimizer_entry, unregister_optimizer

PACKAGE = Path(lars_plugins.__file__).parent


class ToyLion(Optimizer):
    """Lion (Chen et al. 2023), the sign of an interpolated momentum, written here in a few lines."""

    def __init__(self, params: Any, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(beta1 * m + (1 - beta1) * p.grad), alpha=-group["lr"])
                m.lerp_(p.grad, 1 - beta2)


def layerwise_lion(params: Any, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-8,
                   weight_decay: float = 0.0, *, trust_coefficient: float = 1.0) -> Layerwise:
    """A trust ratio over Lion: what a fourth optimizer takes, besides its tests and docs."""
    return Layerwise(ToyLion(params, lr=lr, betas=betas, weight_decay=weight_decay),
                     trust_coefficient=trust_coefficient)


@pytest.fixture
def toy_lion():
    entry = register_optimizer(OptimizerEntry("toy_lion", layerwise_lion, "a trust ratio over Lion (a test's toy)",
                                              timm_names=("lptoylion",), family="adam"))
    yield entry
    unregister_optimizer("toy_lion")


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))


def steps_with_monitor(net, optimizer, steps=2):
    monitor = TrustRatioMonitor(net, optimizer, every_n_steps=1)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    return monitor.latest


def test_a_registered_optimizer_is_selectable_in_timm_hf_and_lightning(toy_lion, tmp_path):
    # timm, registered after lars_plugins.timm was imported: it joins timm's registry as it comes.
    timm_optim = pytest.importorskip("timm.optim")
    import lars_plugins.timm

    net = model()
    built = timm_optim.create_optimizer_v2(net, opt="lptoylion", lr=1e-3, weight_decay=0.01)
    assert isinstance(built, Layerwise) and isinstance(built.base, ToyLion)
    assert issubclass(timm_optim.get_optimizer_class("lptoylion", bind_defaults=False), Optimizer)
    record = steps_with_monitor(net, built)
    assert record["trust_ratio/0.weight"] > 0 and "trust_ratio/0.bias" not in record

    # Lightning's configure_lars, by name.
    pytest.importorskip("lightning")
    import lars_plugins.lightning

    net = model()
    configured = lars_plugins.lightning.configure_lars(net, lr=1e-3, optimizer="toy_lion", total_steps=4,
                                                       trust_coefficient=0.5)
    assert isinstance(configured["optimizer"], Layerwise)
    assert configured["optimizer"].param_groups[0]["trust_coefficient"] == 0.5

    # The HF Trainer: optim and optim_args, betas from the Trainer's Adam arguments (the "adam" family).
    pytest.importorskip("transformers")
    from lars_plugins.hf import LarsTrainingArguments, lars_optimizer_kwargs

    args = LarsTrainingArguments(output_dir=str(tmp_path), optim="toy_lion", optim_args="trust_coefficient=0.25",
                                 learning_rate=1e-3, adam_beta1=0.8, report_to="none", use_cpu=True)
    kwargs = lars_optimizer_kwargs(args, model())
    assert kwargs["trust_coefficient"] == 0.25 and kwargs["betas"] == (0.8, 0.999)
    from lars_plugins.hf import LarsTrainer

    trainer = LarsTrainer(model=model(), args=args)
    hf_built = trainer.create_optimizer()
    assert isinstance(hf_built, Layerwise) and isinstance(hf_built.base, ToyLion)
    assert hf_built.base.param_groups[0]["betas"] == (0.8, 0.999)
    assert hf_built.param_groups[0]["trust_coefficient"] == 0.25
    assert trainer.lars_trust_monitor is not None  # the Trainer's logs get its ratios
    lars_plugins.timm.unregister()
    lars_plugins.timm.register()  # without toy_lion, as before the test


@pytest.mark.parametrize("name", ["layerwise_adamw", "lars_ranger"])
def test_the_wrapper_by_name(name, tmp_path):
    """Layerwise over AdamW and LARS + Ranger: named entries, each a class LightningCLI can take by
    its path, building what their docs say."""
    pytest.importorskip("timm")
    net = model()
    entry = optimizer_entry(name)
    built = entry.build(lars_plugins.param_groups(net, weight_decay=0.01), lr=1e-3)
    inner = built if name == "layerwise_adamw" else built._base_optimizer
    assert isinstance(inner, Layerwise)
    assert type(inner.base) is (torch.optim.AdamW if name == "layerwise_adamw" else torch.optim.RAdam)
    if name == "lars_ranger":
        assert inner.base.param_groups[0]["betas"] == (0.95, 0.999)
        assert inner.param_groups[0]["centralize_gradients"] is True and built.defaults["lookahead_k"] == 6
    record = steps_with_monitor(net, built)
    assert record["trust_ratio/0.weight"] > 0
    cls = entry.factory()
    assert cls.__module__.startswith("lars_plugins") and getattr(lars_plugins, cls.__name__) is cls


def test_layerwise_adamw_is_layerwise_over_adamw_step_for_step():
    a, b = model(), model()
    named = lars_plugins.LayerwiseAdamW(a.parameters(), lr=1e-2, weight_decay=0.05, trust_coefficient=0.5)
    by_hand = Layerwise(torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.05), trust_coefficient=0.5)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    for _ in range(3):
        for net, opt in ((a, named), (b, by_hand)):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_bad_entries_and_names_are_refused():
    with pytest.raises(ValueError, match="registered as 'lars' already; pass replace=True"):
        register_optimizer(OptimizerEntry("lars", layerwise_lion, "another"))
    with pytest.raises(ValueError, match="timm needs lower-case names without '_'"):
        OptimizerEntry("x", layerwise_lion, "x", timm_names=("lp_x",))
    with pytest.raises(ValueError, match="family must be 'sgd' or 'adam'"):
        OptimizerEntry("x", layerwise_lion, "x", family="rmsprop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'lamb_clp' is not one of lars_plugins' names.*did you mean 'lamb_clip'"):
        optimizer_entry("lamb_clp")
    with pytest.raises(ValueError, match="max_grad_norm=1.0: lars_plugins.LAMB does not clip"):
        optimizer_entry("lamb").build([nn.Parameter(torch.ones(2, 2))], max_grad_norm=1.0)


def test_no_integration_branches_on_an_optimizer_class():
    """timm, HF and Lightning read the registry: none tests for LARS or LAMB itself."""
    for module in ("timm.py", "hf.py", "_lightning.py", "lightning.py", "pytorch_lightning.py"):
        tree = ast.parse((PACKAGE / module).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Is, ast.IsNot, ast.Eq)) for op in node.ops):
                names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
                assert not names & {"LARS", "LAMB", "Layerwise"}, f"{module}: {ast.unparse(node)}"
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass"):
                names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                assert not names & {"LARS", "LAMB", "Layerwise"}, f"{module}: {ast.unparse(node)}"
