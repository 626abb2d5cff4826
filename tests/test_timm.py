"""timm integration with real timm models (random init): registry, groups, training, layer decay, checkpoints."""

from __future__ import annotations

import copy
import inspect
import logging
import subprocess
import sys

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
import timm.optim  # noqa: E402, F811  (the submodule, after importorskip has checked timm)

import lars_plugins.timm as lars_timm  # noqa: E402  (registers)
import lars_plugins  # noqa: E402
from lars_plugins import LAMB, LARS  # noqa: E402
from checkpoints import weights_only_round_trip  # noqa: E402

create = timm.optim.create_optimizer_v2


def resnet(name="resnet18"):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=4)


def images(n=16, seed=0, size=32):
    """Four classes, each a bright quadrant in noise: learnable in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randn(n, 3, size, size, generator=gen) * 0.5
    half = size // 2
    for i, c in enumerate(y.tolist()):
        r, k = divmod(c, 2)
        x[i, :, r * half:(r + 1) * half, k * half:(k + 1) * half] += 2.0
    return x, y


def test_plain_import_does_not_import_frameworks():
    code = ("import sys, lars_plugins; bad = [m for m in ('timm', 'transformers', 'lightning', 'pytorch_lightning', "
            "'matplotlib') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name,nesterov,clip", [
    ("lars", False, False), ("larc", False, True), ("nlars", True, False), ("nlarc", True, True),
    ("lplars", False, False), ("lplarc", False, True), ("lpnlars", True, False), ("lpnlarc", True, True),
])
def test_names_build_our_lars(name, nesterov, clip):
    opt = create(resnet(), opt=name, lr=2.0, weight_decay=1e-4)
    assert type(opt) is LARS
    group = opt.param_groups[-1]
    assert group["nesterov"] is nesterov and group["trust_clip"] is clip
    assert group["momentum"] == 0.9 and group["lr"] == 2.0


@pytest.mark.parametrize("name,clip", [("lplamb", False), ("lplambc", True)])
def test_lamb_names_build_our_lamb_beside_timm_s_own(name, clip):
    opt = create(resnet(), opt=name, lr=2e-3, weight_decay=0.02, betas=(0.8, 0.99), eps=1e-7)  # as train.py passes them
    assert type(opt) is LAMB
    decayed = [g for g in opt.param_groups if g["weight_decay"]]
    assert decayed and all(g["weight_decay"] == 0.02 for g in decayed)
    for group in opt.param_groups:
        assert group["betas"] == (0.8, 0.99) and group["eps"] == 1e-7 and group["trust_clip"] is clip
    for timm_name in ("lamb", "lambc", "lambw", "lambcw"):  # timm's family is left alone
        assert type(create(resnet(), opt=timm_name)) is timm.optim.Lamb
    with pytest.raises(ValueError, match="--clip-grad"):
        lars_timm.create_lamb(resnet().parameters(), max_grad_norm=1.0)


def test_lplamb_trains_a_resnet():
    model = resnet()
    opt = create(model, opt="lplamb", lr=1e-2, weight_decay=1e-4)
    x, y = images()
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_register_is_idempotent_quiet_and_reversible(caplog):
    with caplog.at_level(logging.DEBUG):
        assert "lars" in lars_timm.register() and "lplars" in lars_timm.register()
    assert not caplog.records
    lars_timm.unregister()
    try:
        assert type(create(resnet(), opt="lars", weight_decay=1e-4)) is timm.optim.Lars
        with pytest.raises(Exception):
            create(resnet(), opt="lplars")
        lars_timm.register(override_builtin=False)  # side by side: timm's lars and ours
        assert type(create(resnet(), opt="lars", weight_decay=1e-4)) is timm.optim.Lars
        assert type(create(resnet(), opt="lplars", weight_decay=1e-4)) is LARS
    finally:
        lars_timm.register()
    assert type(create(resnet(), opt="lars")) is LARS


def test_timm_groups_mean_the_right_thing():
    model = resnet()
    opt = create(model, opt="lars", lr=1.0, weight_decay=1e-4)
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        adapted = not LARS.is_excluded(group, p)
        # timm's filter: 1-D tensors (biases, BatchNorm) get no weight decay; LARS does not adapt them.
        assert adapted == (p.ndim > 1), name
        assert (id(p) in decay) == (p.ndim > 1), name


def test_weight_decay_zero_is_still_lars():
    model = resnet()
    opt = create(model, opt="lars", lr=1.0, weight_decay=0.0)
    x, y = images()
    nn.functional.cross_entropy(model(x), y).backward()
    w = model.conv1.weight
    before, g = w.detach().clone(), w.grad.clone()
    opt.step()
    ratio = 1e-3 * before.norm() / (g.norm() + 1e-8)  # Eq. 6, wd = 0
    torch.testing.assert_close(w.detach(), before - ratio * g, rtol=1e-4, atol=1e-7)
    assert opt.state[w]["trust_ratio"].item() == pytest.approx(ratio.item(), rel=1e-5)


def test_timm_keyword_names():
    model = resnet()
    opt = create(model, opt="lars", weight_decay=1e-4, trust_coeff=0.02, always_adapt=True, foreach=True)
    assert all(g["trust_coefficient"] == 0.02 and g["foreach"] is True for g in opt.param_groups)
    assert all(not LARS.is_excluded(g, p) for g in opt.param_groups for p in g["params"])
    with pytest.raises(TypeError, match="trust_coeff"):
        create(model, opt="lars", trust_coeff=0.02, trust_coefficient=0.01)
    with pytest.raises(TypeError, match="always_adapt must be a bool, got 'yes'"):
        create(model, opt="lars", always_adapt="yes")


@pytest.mark.parametrize("name,kwargs,lr,eta,steps", [
    ("resnet18", {}, 4.0, 0.01, 8),
    ("resnet50", {}, 4.0, 0.01, 8),
    # Transformers want gentler settings with LARS (the LAMB paper's point); still LARS, still learning.
    ("vit_tiny_patch16_224", {"img_size": 32}, 0.5, 0.02, 12),
])
def test_real_training_steps_reduce_the_loss(name, kwargs, lr, eta, steps):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=4, **kwargs)
    opt = create(model, opt="lars", lr=lr, weight_decay=5e-5, trust_coeff=eta)
    x, y = images(n=32)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-3:]) < 0.7 * losses[0], losses


def test_lookahead_lars():
    from timm.optim import Lookahead

    model = resnet()
    opt = create(model, opt="lookahead_lars", lr=2.0, weight_decay=1e-4)
    base = getattr(opt, "_base_optimizer", None) or opt.base_optimizer  # renamed across timm versions
    assert isinstance(opt, Lookahead) and type(base) is LARS
    x, y = images()
    before = model.conv1.weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert not torch.equal(before, model.conv1.weight.detach())


def test_layer_decay_with_timm_and_torch_schedulers():
    from timm.scheduler import CosineLRScheduler

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=4)
    opt = create(model, opt="lars", lr=2.0, weight_decay=0.05, layer_decay=0.75)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    num_layers = 14  # patch embed, 12 blocks, head (timm's group_matcher)
    assert scales == pytest.approx(sorted(0.75 ** (num_layers - 1 - i) for i in range(num_layers)))
    # timm's scheduler applies lr_scale itself.
    sched = CosineLRScheduler(opt, t_initial=10)
    sched.step(1)
    base = sched._get_values(1)[0]
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(base * g["lr_scale"])
    # torch's schedulers ignore lr_scale: fold it in first, then any torch scheduler keeps the ratios.
    opt = lars_timm.apply_lr_scale(create(model, opt="lars", lr=2.0, weight_decay=0.05, layer_decay=0.75))
    ratios = [g["lr"] / 2.0 for g in opt.param_groups]
    assert ratios == pytest.approx([g["applied_lr_scale"] for g in opt.param_groups]) and min(ratios) < 0.05
    torch_sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()
    torch_sched.step()
    assert [g["lr"] / 1.0 for g in opt.param_groups] == pytest.approx(ratios)


def test_timm_lars_checkpoint_loads_into_ours():
    model = resnet()
    groups = timm.optim.param_groups_weight_decay(model, weight_decay=1e-4)
    theirs = timm.optim.Lars(groups, lr=1.5, momentum=0.9, trust_coeff=0.005)
    x, y = images()
    for _ in range(3):
        theirs.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        theirs.step()
    saved = weights_only_round_trip(theirs.state_dict())

    ours = create(model, opt="lars", lr=0.1, weight_decay=1e-4)
    ours.load_state_dict(saved)
    for g in ours.param_groups:
        assert g["trust_coefficient"] == 0.005 and g["lr"] == 1.5 and "trust_coeff" not in g
        assert g["exclude_bias_and_norm"] is True and "always_adapt" not in g  # timm's always_adapt=False
    adapt_all = copy.deepcopy(saved)
    for g in adapt_all["param_groups"]:
        g["always_adapt"] = True
    other = create(copy.deepcopy(model), opt="lars", lr=0.1, weight_decay=1e-4)
    other.load_state_dict(adapt_all)
    assert all(g["exclude_bias_and_norm"] is False for g in other.param_groups)
    for p in model.parameters():
        torch.testing.assert_close(ours.state[p]["momentum_buffer"], theirs.state[p]["momentum_buffer"])
    # And it trains on as timm's Lars would from the same checkpoint: one more step each, same gradients.
    twin = copy.deepcopy(model)
    theirs_again = timm.optim.Lars(timm.optim.param_groups_weight_decay(twin, weight_decay=1e-4), lr=0.1,
                                   momentum=0.9, trust_coeff=0.1)
    theirs_again.load_state_dict(copy.deepcopy(saved))  # torch's loading keeps the tensors: no shared buffers
    ours.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    ours.step()
    theirs_again.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_fallback_groups():
    if "fallback_list" not in inspect.signature(create).parameters:
        pytest.skip("this timm has no fallback groups")
    model = resnet()
    opt = create(model, opt="lars", weight_decay=1e-4, fallback_list=["fc.bias"])
    fallback = [g for g in opt.param_groups if g.get("use_fallback")]
    assert fallback and all(g["exclude"] is True for g in fallback)
    with pytest.raises(ValueError, match="fallback"):
        create(model, opt="lars", weight_decay=1e-4, fallback_list=["fc.weight"])


def test_old_timm_gets_a_clear_error(monkeypatch):
    monkeypatch.delattr(timm.optim, "OptimInfo")
    with pytest.raises(ImportError, match="1.0.12"):
        lars_timm.register()


# --- timm's own contract for registered optimizers ---------------------------------------------------
# timm's tests/test_optim.py (not shipped in its wheel) demands of every registered name: the class
# from get_optimizer_class(name, bind_defaults=False) is an Optimizer subclass; the factory's
# optimizer, over three layouts of param groups (and non-contiguous tensors), lowers a quadratic
# loss in 200 closure steps; its state dict reloads into a twin that then steps identically; a
# deepcopy keeps its public attributes; and (test_lars, test_lamb) the Rosenbrock function's
# cyclic coordinate descent ends no farther from the solution than it began. Restated here.

OUR_NAMES = list(lars_timm.timm_names())


def _lowers_the_loss(build, weight, bias, x):
    weight, bias = nn.Parameter(weight), nn.Parameter(bias)
    opt = build(weight, bias)
    repr(opt)

    def loss_fn():
        opt.zero_grad()
        loss = (weight.mv(x) + bias).pow(2).sum()
        loss.backward()
        return loss

    start = loss_fn().item()
    for _ in range(200):
        opt.step(loss_fn)
    assert loss_fn().item() < start


def _reloads_and_steps_alike(build, weight, bias, x):
    a = [nn.Parameter(weight.clone()), nn.Parameter(bias.clone())]
    opt = build(*a)

    def closure(opt, w, b):
        def run():
            opt.zero_grad()
            loss = (w.mv(x) + b).pow(2).sum()
            loss.backward()
            return loss
        return run

    for _ in range(20):
        opt.step(closure(opt, *a))
    b = [nn.Parameter(t.detach().clone()) for t in a]
    twin = build(*b)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(20):
        opt.step(closure(opt, *a))
        twin.step(closure(twin, *b))
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q)
    saved, twin_saved = opt.state_dict(), twin.state_dict()
    torch.testing.assert_close(saved["state"], twin_saved["state"])
    assert saved["param_groups"] == twin_saved["param_groups"]
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert public == {k for k in vars(copy.deepcopy(opt)) if not k.startswith("_")}


@pytest.mark.parametrize("name", OUR_NAMES)
def test_every_registered_name_meets_timms_optimizer_contract(name):
    cls = timm.optim.get_optimizer_class(name, bind_defaults=False)
    assert inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)
    assert isinstance(timm.optim.get_optimizer_info(name), timm.optim.OptimInfo)
    torch.manual_seed(0)
    layouts = [lambda w, b: create([w, b], name, lr=1e-2),
               lambda w, b: create([{"params": [w]}, {"params": [b], "lr": 1e-2}], name, lr=1e-3),
               lambda w, b: create([{"params": b, "lr": 1e-2}], name, lr=1e-3),
               lambda w, b: create([{"params": b, "lr": 1e-2}], name)]
    for build in layouts:
        _reloads_and_steps_alike(build, torch.randn(10, 5), torch.randn(10), torch.randn(5))
        _lowers_the_loss(build, torch.randn(10, 5), torch.randn(10), torch.randn(5))
        _lowers_the_loss(build, torch.randn(10, 5, 2)[..., 0], torch.randn(10, 2)[..., 0], torch.randn(5))


@pytest.mark.parametrize("name", ["lars", "larc", "nlars", "lpnlarc"])
def test_rosenbrock_cyclic_coordinate_descent_ends_no_farther_from_the_solution(name):
    """timm's test_lars. (Its test_lamb runs timm's own Lamb, which clips the global gradient norm
    by default; on this 2-element tensor ours is plain Adam, as torch's Adam, which does not pass it.)"""
    xy = nn.Parameter(torch.tensor([1.5, 1.5]))
    opt = create([xy], name, lr=1e-3)
    start = xy.detach().dist(torch.ones(2))
    for i in range(2000):
        def closure(i=i):
            opt.zero_grad()
            x, y = xy
            loss = (1 - x) ** 2 + 100 * (y - x ** 2) ** 2
            loss.backward()
            xy.grad[(i + 1) % 2] = 0.0  # one coordinate at a time: x on odd steps, y on even ones
            return loss
        opt.step(closure)
    assert xy.detach().dist(torch.ones(2)) <= start


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "convnext_atto"])
def test_layer_decay_on_timm_models_equals_timms_own(name):
    """ViT's final norm, Swin's 14 depths and ConvNeXt's stem: the model's group_matcher decides, as
    in timm's param_groups_layer_decay (a name rule gave ViT's norm 1.0, Swin 6 depths, ConvNeXt 7)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=4)
    theirs = {n: g["lr_scale"] for g in timm.optim.param_groups_layer_decay(model, layer_decay=0.8)
              for n in _names_of(model, g["params"])}
    ours = {n: g["applied_lr_scale"] for g in lars_plugins.param_groups(model, lr=1.0, layer_decay=0.8)
            for n, _ in g["params"]}
    assert ours.keys() == theirs.keys()
    different = [n for n in ours if ours[n] != pytest.approx(theirs[n], rel=1e-12)]
    assert not different, different[:5]


def _names_of(model, params):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


def test_layer_ids_of_a_transformers_model_follow_its_layer_index():
    """BERT: embeddings at 0, encoder.layer.i at i + 1, pooler and classifier at L + 1 (the BEiT and
    ELECTRA layer-wise decay convention, which the layer index of transformers' models gives)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=32, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    depth = {n: g["layer_id"] for g in lars_plugins.param_groups(model, lr=1.0, layer_decay=0.5)
             for n, _ in g["params"]}
    for n, d in depth.items():
        if ".layer." in n:
            assert d == int(n.split(".layer.")[1].split(".")[0]) + 1, n
        elif "embeddings" in n:
            assert d == 0, n
        else:
            assert d == config.num_hidden_layers + 1, n  # pooler, classifier
