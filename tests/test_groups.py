"""param_groups: exclusion by module type and name, patterns, layer-wise LR decay."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lars_plugins import LARS, block_ids, param_groups


class MyNorm(nn.Module):
    """A custom norm whose weight is 1-D: excluded for its class name."""

    def __init__(self, n):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * self.scale


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.gn = nn.GroupNorm(2, 8)
        self.ln = nn.LayerNorm(8)
        self.rms = nn.RMSNorm(8)
        self.mine = MyNorm(8)
        self.scale_1d = nn.Parameter(torch.ones(8))  # a 1-D tensor that is not a bias nor a norm
        self.fc = nn.Linear(8, 2)


def names_by_exclusion(groups):
    out = {True: set(), False: set()}
    for g in groups:
        out[g["exclude"]].update(n for n, _ in g["params"])
    return out


def test_default_exclusion_is_timms_for_a_plain_model():
    groups = param_groups(Net(), weight_decay=1e-4)
    by = names_by_exclusion(groups)
    # timm's rule: every tensor with ndim <= 1 (scale_1d too, like LayerScale's gamma), names in .bias
    assert by[False] == {"conv.weight", "fc.weight"}
    assert by[True] == {"conv.bias", "bn.weight", "bn.bias", "gn.weight", "gn.bias", "ln.weight", "ln.bias",
                        "rms.weight", "mine.scale", "fc.bias", "scale_1d"}
    for g in groups:
        assert g["weight_decay"] == (0.0 if g["exclude"] else 1e-4)


def test_name_rule_does_not_depend_on_ndim_nor_over_match_class_names():
    """is_bias_or_norm: a flattened weight (1-D) stays adapted; a 2-D weight inside a module whose
    class name says "norm" is adapted, its 1-D scale is not."""
    from lars_plugins import is_bias_or_norm

    class Normalizer(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4, bias=False)
            self.scale = nn.Parameter(torch.ones(4))

    model = nn.Module()
    model.flat = nn.Linear(4, 4)
    model.flat.weight = nn.Parameter(torch.randn(16))
    model.normalizer = Normalizer()
    by = names_by_exclusion(param_groups(model, exclude_if=is_bias_or_norm))
    assert by[False] == {"flat.weight", "normalizer.proj.weight"}
    assert by[True] == {"flat.bias", "normalizer.scale"}


def test_patterns_and_callables():
    by = names_by_exclusion(param_groups(Net(), exclude_if=["*.bias", "scale_1d"]))
    assert by[True] == {"conv.bias", "bn.bias", "gn.bias", "ln.bias", "fc.bias", "scale_1d"}
    by = names_by_exclusion(param_groups(Net(), exclude_if=lambda name, p, m: name.startswith("fc")))
    assert by[True] == {"fc.weight", "fc.bias"}
    with pytest.raises(TypeError, match=r"exclude_if=\['\*\.bias'\]"):
        param_groups(Net(), exclude_if="*.bias")


def test_the_former_name_of_exclude_if_still_selects_with_a_warning():
    """``exclude`` names the per-group bool; the rule's argument is ``exclude_if``. Code written
    with the former name keeps its groups, is told the new name, and cannot give both."""
    with pytest.warns(FutureWarning, match="exclude_if"):
        by = names_by_exclusion(param_groups(Net(), exclude=["*.bias"]))
    assert by[True] == {"conv.bias", "bn.bias", "gn.bias", "ln.bias", "fc.bias"}
    with pytest.raises(TypeError, match="not also exclude"):
        param_groups(Net(), exclude_if=["*.bias"], exclude=["*.bias"])
    with pytest.raises(TypeError, match="unexpected keyword argument 'exclud'"):
        param_groups(Net(), exclud=["*.bias"])


def test_torch_records_param_names():
    opt = LARS(param_groups(Net(), weight_decay=1e-4))
    names = [n for g in opt.param_groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in Net().named_parameters())


def test_frozen_params_are_left_out():
    net = Net()
    net.conv.requires_grad_(False)
    names = {n for g in param_groups(net) for n, _ in g["params"]}
    assert "conv.weight" not in names and "fc.weight" in names


def test_block_ids():
    names = ["embed.weight", "cls", "blocks.0.a.weight", "blocks.0.b.bias", "blocks.1.a.weight", "norm.weight",
             "head.weight"]
    assert block_ids(names) == {"embed.weight": 0, "cls": 0, "blocks.0.a.weight": 1, "blocks.0.b.bias": 1,
                                "blocks.1.a.weight": 2, "norm.weight": 3, "head.weight": 3}
    assert block_ids(["conv1.weight", "bn1.weight", "fc.weight"]) == {"conv1.weight": 0, "bn1.weight": 1,
                                                                       "fc.weight": 2}


def vit_like():
    model = nn.Module()
    model.embed = nn.Linear(4, 8)
    model.blocks = nn.Sequential(*[nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)) for _ in range(3)])
    model.head = nn.Linear(8, 2)
    return model


def test_layer_decay_sets_group_lrs_by_depth():
    groups = param_groups(vit_like(), weight_decay=0.05, lr=1.0, layer_decay=0.5)
    lr_of = {n: g["lr"] for g in groups for n, _ in g["params"]}
    assert lr_of["head.weight"] == 1.0 and lr_of["head.bias"] == 1.0
    assert lr_of["blocks.2.1.weight"] == 0.5
    assert lr_of["blocks.0.0.weight"] == 0.125
    assert lr_of["embed.weight"] == 0.0625
    for g in groups:
        assert g["lr"] == pytest.approx(g["applied_lr_scale"] * 1.0) and "lr_scale" not in g


def test_layer_decay_ratios_survive_torch_schedulers():
    groups = param_groups(vit_like(), lr=2.0, layer_decay=0.5)
    opt = LARS(groups, lr=2.0)
    initial = [g["lr"] for g in opt.param_groups]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for _ in range(4):
        opt.step()
        sched.step()
    now = [g["lr"] for g in opt.param_groups]
    factor = now[0] / initial[0]
    assert 0 < factor < 1
    assert now == pytest.approx([lr * factor for lr in initial])


def test_custom_layer_id_and_frozen_layers_keep_depth():
    model = vit_like()
    full = {n: g["lr"] for g in param_groups(model, lr=1.0, layer_decay=0.5) for n, _ in g["params"]}
    model.embed.requires_grad_(False)
    partial = {n: g["lr"] for g in param_groups(model, lr=1.0, layer_decay=0.5) for n, _ in g["params"]}
    assert all(partial[n] == full[n] for n in partial)
    custom = param_groups(model, lr=1.0, layer_decay=0.5, layer_id=lambda name: 0 if name.startswith("blocks") else 1)
    lr_of = {n: g["lr"] for g in custom for n, _ in g["params"]}
    assert lr_of["blocks.0.1.weight"] == 0.5 and lr_of["head.weight"] == 1.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(layer_decay=1.5, lr=1.0), "layer_decay"),
    (dict(layer_decay=0.0, lr=1.0), "layer_decay"),
    (dict(layer_decay=0.8), "lr"),
    (dict(lr=-1.0), "lr must be a number >= 0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        param_groups(Net(), **kwargs)


def test_lr_without_layer_decay_is_set_on_every_group():
    groups = param_groups(Net(), weight_decay=1e-4, lr=0.3)
    assert len(groups) == 2 and all(g["lr"] == 0.3 and "applied_lr_scale" not in g for g in groups)
    assert all("lr" not in g for g in param_groups(Net()))  # without lr, the optimizer's applies


def test_no_trainable_parameters():
    net = Net().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        param_groups(net)


def test_layer_decay_is_applied_once_under_a_timm_scheduler():
    pytest.importorskip("timm")
    from timm.scheduler import CosineLRScheduler

    groups = param_groups(vit_like(), lr=0.5, layer_decay=0.5)
    opt = LARS(groups, lr=0.5)
    depth_lrs = sorted({g["lr"] for g in opt.param_groups})
    assert depth_lrs[0] == pytest.approx(0.5 * 0.5 ** 4)  # the shallowest depth, before any scheduler
    scheduler = CosineLRScheduler(opt, t_initial=10, lr_min=0.0)
    scheduler.step(0)  # at t=0 the cosine factor is 1: every group at its own lr, scaled once
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx(depth_lrs)
    scheduler.step(5)  # half way: every group at half its lr, the depth ratios kept
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([lr / 2 for lr in depth_lrs])
