"""LARS against independent expectations: a reference written here, torch.optim.SGD and timm's Lars."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lars_plugins import LARS, Layerwise, tensor_lists
from checkpoints import weights_only_round_trip

SHAPES = [(16, 8), (8,), (4, 3, 3, 3), (5,), (32, 16)]
FOREACH = [False, True]


def make_params(seed=0, shapes=SHAPES, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def grad_sequence(shapes, steps, seed=1, scale=1.0):
    """Gradients fixed in advance, so two optimizers see identical inputs whatever they do."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) * scale for s in shapes] for _ in range(steps)]


def run(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(p.dtype).clone()
        opt.step()
    return [p.detach().clone() for p in params]


class ReferenceLARS:
    """The update rule as the issue states it, one tensor at a time in float64."""

    def __init__(self, params, adapt, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 trust_coefficient=1e-3, eps=1e-8, trust_clip=False, maximize=False):
        self.w = [p.detach().double().clone() for p in params]
        self.adapt = adapt
        self.bufs = [None] * len(params)
        self.ratios = [None] * len(params)
        self.h = dict(lr=lr, m=momentum, damp=dampening, wd=weight_decay, nesterov=nesterov,
                      eta=trust_coefficient, eps=eps, clip=trust_clip, maximize=maximize)

    def step(self, grads):
        h = self.h
        for i, (w, g) in enumerate(zip(self.w, grads)):
            g = g.double()
            if h["maximize"]:
                g = -g
            if self.adapt[i]:
                # From the documented rule, not the implementation's comparisons: a non-finite norm
                # gives NaN; ‖w‖ = 0 or a zero denominator gives η; else Eq. 6.
                wn, gn = w.norm().item(), g.norm().item()
                denom = gn + h["wd"] * wn + h["eps"]
                if not (math.isfinite(wn) and math.isfinite(gn)):
                    ratio = math.nan
                elif wn == 0 or denom == 0:
                    ratio = h["eta"]
                else:
                    ratio = h["eta"] * wn / denom
                if h["clip"]:
                    ratio = min(ratio / h["lr"], 1.0)
                self.ratios[i] = ratio
                d = ratio * (g + h["wd"] * w)
            else:
                d = g
            if h["m"] != 0:
                if self.bufs[i] is None:
                    self.bufs[i] = d.clone()
                else:
                    self.bufs[i] = h["m"] * self.bufs[i] + (1 - h["damp"]) * d
                d = d + h["m"] * self.bufs[i] if h["nesterov"] else self.bufs[i]
            self.w[i] = w - h["lr"] * d


CONFIGS = [
    dict(lr=2.0, momentum=0.9, weight_decay=5e-4),
    dict(lr=2.0, momentum=0.9, weight_decay=0.0),  # weight_decay=0 is still LARS
    dict(lr=0.5, momentum=0.0, weight_decay=1e-4),
    dict(lr=1.0, momentum=0.9, weight_decay=1e-4, nesterov=True),
    dict(lr=1.0, momentum=0.8, dampening=0.3, weight_decay=1e-4),
    dict(lr=3.0, momentum=0.9, weight_decay=1e-4, trust_clip=True, trust_coefficient=0.02),
    dict(lr=1.0, momentum=0.9, weight_decay=1e-4, maximize=True, eps=1e-3),
]


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_matches_reference_formula(cfg, foreach):
    params = make_params()
    adapt = [len(s) > 1 for s in SHAPES]  # default rule: ndim <= 1 excluded
    ref = ReferenceLARS(params, adapt, **cfg)
    opt = LARS(params, foreach=foreach, **cfg)
    grads = grad_sequence(SHAPES, steps=5)
    for step_grads in grads:
        ref.step(step_grads)
        run(opt, params, [step_grads])
        for i, p in enumerate(params):
            torch.testing.assert_close(p.detach().double(), ref.w[i], rtol=1e-5, atol=1e-6)
            if adapt[i]:
                ratio = opt.state[p]["trust_ratio"]
                assert ratio.dtype == torch.float32 and ratio.device == p.device and ratio.dim() == 0
                assert ratio.item() == pytest.approx(ref.ratios[i], rel=1e-5)
            else:
                assert "trust_ratio" not in opt.state[p]


BIG_SHAPES = [(300, 301), (70_000,), (128, 64, 3, 3)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_large_and_channels_last_tensors_match_reference_formula(cfg):
    """Tensors large enough for multi-threaded kernels, one of them channels_last, with an excluded
    group beside an adapted one."""
    params = make_params(shapes=BIG_SHAPES)
    params[2] = nn.Parameter(params[2].detach().to(memory_format=torch.channels_last))
    adapt = [True, False, True]
    ref = ReferenceLARS(params, adapt, **cfg)
    groups = [{"params": [params[0], params[2]]}, {"params": [params[1]], "exclude": True}]
    opt = LARS(groups, foreach=False, **cfg)
    for step_grads in grad_sequence(BIG_SHAPES, steps=3):
        ref.step(step_grads)
        run(opt, params, [step_grads])
    for i, p in enumerate(params):
        torch.testing.assert_close(p.detach().double(), ref.w[i], rtol=1e-5, atol=1e-6)


def test_weight_decay_zero_is_not_sgd():
    params = make_params()
    sgd_params = [nn.Parameter(p.detach().clone()) for p in params]
    grads = grad_sequence(SHAPES, steps=3)
    lars_out = run(LARS(params, lr=1.0, momentum=0.9, weight_decay=0.0), params, grads)
    sgd_out = run(torch.optim.SGD(sgd_params, lr=1.0, momentum=0.9), sgd_params, grads)
    adapted = [i for i, s in enumerate(SHAPES) if len(s) > 1]
    for i in adapted:
        # The adapted step is η‖w‖/‖g‖ ≈ 1e-3 of the SGD one: nothing like it.
        assert (lars_out[i] - params[i]).abs().max() < 0.1 * (sgd_out[i] - params[i]).abs().max()
        assert not torch.allclose(lars_out[i], sgd_out[i])


SGD_CONFIGS = [
    dict(lr=0.1, momentum=0.0),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.1, momentum=0.9, dampening=0.5),
    dict(lr=0.1, momentum=0.9, nesterov=True),
    dict(lr=0.1, momentum=0.9, maximize=True),
]


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("cfg", SGD_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_all_excluded_group_is_torch_sgd(cfg, foreach):
    params = make_params()
    sgd_params = [nn.Parameter(p.detach().clone()) for p in params]
    grads = grad_sequence(SHAPES, steps=6)
    # weight_decay on the optimizer is inherited by the excluded group and does not apply to it.
    ours = run(LARS([{"params": params, "exclude": True}], weight_decay=0.1, foreach=foreach, **cfg),
               params, grads)
    theirs = run(torch.optim.SGD(sgd_params, weight_decay=0.0, foreach=foreach, **cfg), sgd_params, grads)
    for a, b in zip(ours, theirs):
        # float32 rounding only: the single-tensor path adds lr·g and lr·m·buf separately.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


TIMM_CONFIGS = [
    dict(lr=1.0, momentum=0.9, weight_decay=1e-4),
    dict(lr=1.0, momentum=0.9, weight_decay=0.0),
    dict(lr=2.0, momentum=0.9, weight_decay=5e-4, nesterov=True),
    dict(lr=0.7, momentum=0.9, dampening=0.2, weight_decay=1e-4),
    dict(lr=5.0, momentum=0.9, weight_decay=1e-4, trust_clip=True),
]


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("cfg", TIMM_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_all_adapted_matches_timm_lars(cfg, foreach):
    timm_optim = pytest.importorskip("timm.optim")
    params = make_params()
    timm_params = [nn.Parameter(p.detach().clone()) for p in params]
    grads = grad_sequence(SHAPES, steps=6)
    ours = run(LARS(params, exclude_bias_and_norm=False, foreach=foreach, **cfg), params, grads)
    theirs = run(timm_optim.Lars(timm_params, always_adapt=True, **cfg), timm_params, grads)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("foreach", FOREACH)
def test_zero_initialised_tensor_gets_small_step_and_is_not_frozen(foreach):
    lr, eta = 10.0, 1e-3
    w = nn.Parameter(torch.zeros(6))
    opt = LARS([{"params": [w], "exclude": False}], lr=lr, momentum=0.0, weight_decay=1e-4,
               trust_coefficient=eta, foreach=foreach)
    g = torch.arange(1.0, 7.0)
    w.grad = g.clone()
    opt.step()
    # ratio = η (not 1: that would move w by lr·g = 10·g), and the step is not zero.
    torch.testing.assert_close(w.detach(), -lr * eta * g)
    assert opt.state[w]["trust_ratio"].item() == pytest.approx(eta)
    # Second step: ‖w‖ > 0, so Eq. 6 applies.
    w_before = w.detach().clone()
    w.grad = g.clone()
    opt.step()
    wn, gn = w_before.norm().item(), g.norm().item()
    ratio = eta * wn / (gn + 1e-4 * wn + 1e-8)
    torch.testing.assert_close(w.detach(), w_before - lr * ratio * (g + 1e-4 * w_before))


@pytest.mark.parametrize("foreach", FOREACH)
def test_zero_gradient_and_zero_denominator_stay_finite(foreach):
    w = nn.Parameter(torch.randn(4, 4))
    z = nn.Parameter(torch.zeros(4, 4))
    opt = LARS([w, z], lr=1.0, momentum=0.9, weight_decay=0.0, eps=0.0, foreach=foreach)
    before = w.detach().clone()
    w.grad, z.grad = torch.zeros(4, 4), torch.zeros(4, 4)
    opt.step()
    assert torch.equal(w.detach(), before) and torch.equal(z.detach(), torch.zeros(4, 4))
    for p in (w, z):
        assert math.isfinite(opt.state[p]["trust_ratio"].item())


@pytest.mark.parametrize("foreach", FOREACH)
def test_per_group_overrides(foreach):
    keys = [
        dict(lr=0.3), dict(momentum=0.5), dict(weight_decay=1e-2), dict(trust_coefficient=0.05),
        dict(eps=1e-2), dict(trust_clip=True), dict(exclude=True, weight_decay=0.0),
    ]
    base = dict(lr=2.0, momentum=0.9, weight_decay=1e-4, trust_coefficient=1e-3, eps=1e-8)
    grads = grad_sequence([(16, 8)], steps=3)
    for override in keys:
        w = make_params(shapes=[(16, 8)])
        ref_cfg = {**base, **{k: v for k, v in override.items() if k != "exclude"}}
        ref = ReferenceLARS(w, [not override.get("exclude", False)], **ref_cfg)
        other = make_params(seed=3, shapes=[(16, 8)])
        opt = LARS([{"params": other}, {"params": w, **override}], foreach=foreach, **base)
        for step_grads in grads:
            ref.step(step_grads)
            other[0].grad = step_grads[0].clone()
            run(opt, w, [step_grads])
        torch.testing.assert_close(w[0].detach().double(), ref.w[0], rtol=1e-5, atol=1e-6, msg=str(override))


def test_exclusion_rules():
    w2, b1 = nn.Parameter(torch.randn(3, 3)), nn.Parameter(torch.randn(3))
    opt = LARS([w2, b1])
    group = opt.param_groups[0]
    assert not LARS.is_excluded(group, w2) and LARS.is_excluded(group, b1)
    opt = LARS([w2, b1], exclude_bias_and_norm=False)
    assert not LARS.is_excluded(opt.param_groups[0], b1)
    opt = LARS([{"params": [w2], "exclude": True}, {"params": [b1], "exclude": False}])
    assert LARS.is_excluded(opt.param_groups[0], w2) and not LARS.is_excluded(opt.param_groups[1], b1)


def test_state_dict_round_trip_weights_only():
    params = make_params()
    grads = grad_sequence(SHAPES, steps=6)
    cfg = dict(lr=torch.tensor(1.5), momentum=0.9, weight_decay=1e-4, trust_clip=True)
    straight_params = make_params()
    straight = run(LARS(straight_params, **cfg), straight_params, grads)

    opt = LARS(params, **cfg)
    run(opt, params, grads[:3])
    ckpt = weights_only_round_trip({"params": [p.detach() for p in params], "optim": opt.state_dict()})
    resumed = [nn.Parameter(t.clone()) for t in ckpt["params"]]
    opt2 = LARS(resumed, lr=0.1)  # hyperparameters come back from the checkpoint
    opt2.load_state_dict(ckpt["optim"])
    assert opt2.param_groups[0]["trust_clip"] is True
    assert opt2.state[resumed[0]]["momentum_buffer"].shape == SHAPES[0]
    out = run(opt2, resumed, grads[3:])
    for a, b in zip(out, straight):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lr_scheduler_and_zero_grad_and_grad_untouched():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = LARS(model.parameters(), lr=1.0, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x = torch.randn(32, 8)
    for expected_lr in (1.0, 0.5, 0.25):
        assert opt.param_groups[0]["lr"] == pytest.approx(expected_lr)
        model(x).pow(2).mean().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        for p, g in zip(model.parameters(), grads):
            assert torch.equal(p.grad, g)  # p.grad is not modified
        opt.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in model.parameters())
        sched.step()
    opt.step()  # a step with no gradients at all is a no-op, not an error


@pytest.mark.parametrize("host", [True, False])
def test_a_zero_lr_with_trust_clip_is_a_no_op_with_ratio_one(host, monkeypatch):
    """A schedule reaches lr = 0 (warm-up from 0, decay to 0): LARC's ratio/lr is then inf, clipped to 1."""
    if not host:
        monkeypatch.setattr(tensor_lists, "_FORCED_PATH", "tensor")
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = LARS(params, lr=0.0, momentum=0.9, weight_decay=1e-4, trust_clip=True)
    run(opt, params, grad_sequence(SHAPES, steps=2))
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    assert opt.state[params[0]]["trust_ratio"].item() == 1.0


def test_lr_schedule_changes_update():
    params = make_params(shapes=[(8, 8)])
    grads = grad_sequence([(8, 8)], steps=4)
    ref = ReferenceLARS(params, [True], lr=1.0, momentum=0.9, weight_decay=1e-4)
    opt = LARS(params, lr=1.0, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    for k, step_grads in enumerate(grads):
        ref.h["lr"] = 1.0 / (1 + k)
        ref.step(step_grads)
        run(opt, params, [step_grads])
        sched.step()
    torch.testing.assert_close(params[0].detach().double(), ref.w[0], rtol=1e-5, atol=1e-6)


def test_closure_runs_first_and_loss_is_returned():
    w = nn.Parameter(torch.randn(4, 4))
    opt = LARS([w], lr=1.0)
    calls = []

    def closure():
        calls.append(w.detach().clone())
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1 and loss.item() == pytest.approx((calls[0] ** 2).sum().item())
    assert not torch.equal(w.detach(), calls[0])


@pytest.mark.parametrize("foreach", FOREACH)
def test_tensor_lr_equals_float_lr(foreach):
    grads = grad_sequence(SHAPES, steps=4)
    for momentum, nesterov in ((0.9, False), (0.9, True), (0.0, False)):
        cfg = dict(momentum=momentum, nesterov=nesterov, weight_decay=1e-4, foreach=foreach)
        a_params, b_params = make_params(), make_params()
        a = run(LARS(a_params, lr=1.3, **cfg), a_params, grads)
        b = run(LARS(b_params, lr=torch.tensor(1.3), **cfg), b_params, grads)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y)


@pytest.mark.parametrize("foreach", FOREACH)
def test_step_reads_no_tensor_on_host(foreach, monkeypatch):
    """No .item(), bool(tensor), float(tensor) or .tolist() inside step(): each would sync a GPU.

    On the CPU the single-tensor path reads its coefficients on purpose (nothing to wait for there);
    the accelerator path, run here on CPU tensors, must not."""
    monkeypatch.setattr(tensor_lists, "_FORCED_PATH", "tensor")
    params = make_params()
    opt = LARS(params, lr=torch.tensor(2.0), momentum=0.9, weight_decay=1e-4, trust_clip=True,
               nesterov=True, foreach=foreach)
    grads = grad_sequence(SHAPES, steps=2)

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of a tensor inside LARS.step()")

    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for step_grads in grads:  # first step (buffers created) and a later one
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()


@pytest.mark.parametrize("foreach", FOREACH)
def test_mixed_dtypes_in_one_group(foreach):
    shapes = [(8, 8), (8, 8)]
    params = [nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8, 8).to(torch.float64))]
    ref = ReferenceLARS(params, [True, True], lr=1.0, momentum=0.9, weight_decay=1e-4)
    opt = LARS(params, lr=1.0, momentum=0.9, weight_decay=1e-4, foreach=foreach)
    for step_grads in grad_sequence(shapes, steps=3):
        ref.step(step_grads)
        run(opt, params, [step_grads])
    for p, r in zip(params, ref.w):
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-5, atol=1e-6)
    assert params[1].dtype == torch.float64


def test_bfloat16_params_train():
    params = make_params(dtype=torch.bfloat16)
    opt = LARS(params, lr=1.0, momentum=0.9, weight_decay=1e-4)
    before = [p.detach().clone() for p in params]
    run(opt, params, grad_sequence(SHAPES, steps=2))
    assert all(p.dtype == torch.bfloat16 and not torch.equal(p, b) for p, b in zip(params, before))
    assert all(opt.state[p]["trust_ratio"].dtype == torch.float32 for p in params if p.ndim > 1)
    reloaded = LARS(params, lr=1.0)
    reloaded.load_state_dict(opt.state_dict())
    assert all(reloaded.state[p]["momentum_buffer"].dtype == torch.bfloat16 for p in params)


@pytest.mark.parametrize("kind", ["lars", "lamb", "layerwise"])
def test_checkpoints_hold_state_but_not_the_last_steps_trust_ratios(kind):
    """The ratios are statistics each step recomputes (FSDP1 and ZeRO keep them outside the
    per-tensor state): checkpoints leave them out, so that they move between layouts."""
    from lars_plugins import LAMB

    params = make_params()
    opt = {"lars": lambda: LARS(params, lr=1.0, momentum=0.9), "lamb": lambda: LAMB(params, lr=1e-2),
           "layerwise": lambda: Layerwise(torch.optim.SGD(params, lr=0.1, momentum=0.9))}[kind]()
    run(opt, params, grad_sequence(SHAPES, steps=1))
    assert any("trust_ratio" in opt.state[p] for p in params)
    saved = opt.state_dict()
    assert saved["state"] and all("trust_ratio" not in entry for entry in saved["state"].values())
    assert all(len(entry) >= 1 for entry in saved["state"].values())  # momentum, moments, counts stay


@pytest.mark.parametrize("dtype, ratio", [(torch.float16, 199725.6), (torch.bfloat16, 1.047988)])
@pytest.mark.parametrize("kind", ["lars", "layerwise"])
def test_loaded_trust_ratios_keep_float32_under_half_precision_parameters(kind, dtype, ratio):
    """A checkpoint that holds ratios (earlier versions saved them): torch casts loaded state to the
    parameter's dtype, which would make 199725.6 inf in float16 and 1.047988 1.046875 in bfloat16."""
    params = make_params(dtype=dtype)

    def build():
        return LARS(params, lr=1.0, momentum=0.9) if kind == "lars" else \
            Layerwise(torch.optim.SGD(params, lr=0.1, momentum=0.9))

    opt = build()
    run(opt, params, grad_sequence(SHAPES, steps=1))
    saved = opt.state_dict()
    saved["state"][0]["trust_ratio"] = torch.tensor(ratio)
    reloaded = build()
    reloaded.load_state_dict(saved)
    loaded = reloaded.state[params[0]]["trust_ratio"]
    assert loaded.dtype == torch.float32 and loaded.item() == torch.tensor(ratio).item()
    assert reloaded.state[params[0]]["momentum_buffer"].dtype == dtype


def test_foreach_paths_agree():
    grads = grad_sequence(SHAPES, steps=5)
    for cfg in CONFIGS:
        a_params, b_params = make_params(), make_params()
        a = run(LARS(a_params, foreach=False, **cfg), a_params, grads)
        b = run(LARS(b_params, foreach=True, **cfg), b_params, grads)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_trains_a_real_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 3))
    x = torch.randn(256, 10)
    y = (x[:, :3].argmax(1))
    opt = LARS(model.parameters(), lr=5.0, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.01)
    loss_fn = nn.CrossEntropyLoss()
    first = loss_fn(model(x), y).item()
    for _ in range(60):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


# --- bad input ------------------------------------------------------------------------------------

BAD = [
    (dict(lr=-0.1), ValueError, "lr"),
    (dict(lr="0.1"), TypeError, "lr"),
    (dict(lr=torch.ones(2)), ValueError, "lr"),
    (dict(lr=torch.tensor(-1.0)), ValueError, "lr"),
    (dict(momentum=-0.9), ValueError, "momentum"),
    (dict(weight_decay=-1e-4), ValueError, "weight_decay"),
    (dict(eps=-1e-8), ValueError, "eps"),
    (dict(trust_coefficient=0.0), ValueError, "trust_coefficient"),
    (dict(trust_coefficient=-1e-3), ValueError, "trust_coefficient"),
    (dict(dampening=1.5), ValueError, "dampening"),
    (dict(momentum=0.0, nesterov=True), ValueError, "nesterov"),
    (dict(momentum=0.9, dampening=0.1, nesterov=True), ValueError, "nesterov"),
    (dict(trust_clip=1), TypeError, "trust_clip"),
    (dict(weight_decay=float("nan")), ValueError, "weight_decay"),
    # inf: NaN weights (lr, weight_decay, trust_coefficient) or silently no update (eps).
    (dict(lr=float("inf")), ValueError, "lr"),
    (dict(lr=torch.tensor(float("inf"))), ValueError, "lr"),
    (dict(momentum=float("inf")), ValueError, "momentum"),
    (dict(weight_decay=float("inf")), ValueError, "weight_decay"),
    (dict(eps=float("inf")), ValueError, "eps"),
    (dict(trust_coefficient=float("inf")), ValueError, "trust_coefficient"),
    # A one-element lr of shape (1,) failed at step on some paths: a 0-d tensor is asked for.
    (dict(lr=torch.ones(1)), ValueError, "lr"),
]


@pytest.mark.parametrize("kwargs,error,name", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_arguments_are_refused(kwargs, error, name):
    with pytest.raises(error, match=name):
        LARS([nn.Parameter(torch.randn(2, 2))], **kwargs)
    # The same value in a group is refused too, naming the group.
    if "lr" not in kwargs or not isinstance(kwargs["lr"], torch.Tensor):
        with pytest.raises(error, match=name):
            LARS([{"params": [nn.Parameter(torch.randn(2, 2))], **kwargs}])


def test_group_conflicts_and_foreign_keys_are_refused():
    p = nn.Parameter(torch.randn(2, 2))
    with pytest.raises(ValueError, match="exclude=True with weight_decay"):
        LARS([{"params": [p], "exclude": True, "weight_decay": 1e-4}])
    with pytest.raises(TypeError, match="trust_coefficient"):
        LARS([{"params": [p], "trust_coeff": 0.01}])
    with pytest.raises(TypeError, match="exclude"):
        LARS([{"params": [p], "exclude": "yes"}])


@pytest.mark.parametrize("foreign,ours", [
    ("trust_coeff", "trust_coefficient"), ("eta", "trust_coefficient"), ("clip", "trust_clip"),
    ("always_adapt", "exclude_bias_and_norm"), ("lars_exclude", "exclude"),
    ("lars_adaptation_filter", "exclude"), ("exclude_from_adaptation", "exclude"),
])
def test_every_foreign_name_in_a_group_is_refused_with_ours(foreign, ours):
    """In our own constructor a foreign key would otherwise be an extra group key torch ignores."""
    with pytest.raises(TypeError, match=f"'{foreign}' is .*'s name; lars_plugins.LARS calls it '{ours}'"):
        LARS([{"params": [nn.Parameter(torch.randn(2, 2))], foreign: True}])
    with pytest.raises(TypeError, match=f"'{foreign}'.*'{ours}'"):
        Layerwise(torch.optim.SGD([{"params": [nn.Parameter(torch.randn(2, 2))], foreign: True}], lr=0.1))


def test_checkpoint_keys_of_other_names_are_translated_on_load():
    """A checkpoint of a pre-release lars_plugins (group key ``lars_exclude``) and timm's names load as ours."""
    w, b = nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(3))
    saved = LARS([{"params": [w]}, {"params": [b]}]).state_dict()
    saved["param_groups"][0].update(lars_exclude=True, trust_coeff=0.02)
    saved["param_groups"][0].pop("exclude")
    saved["param_groups"][0].pop("trust_coefficient")
    opt = LARS([{"params": [w]}, {"params": [b]}])
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["exclude"] is True and opt.param_groups[0]["trust_coefficient"] == 0.02
    assert "lars_exclude" not in opt.param_groups[0] and "trust_coeff" not in opt.param_groups[0]
    saved["param_groups"][1]["lars_adaptation_filter"] = True  # a predicate elsewhere: no faithful value
    with pytest.raises(TypeError, match="loaded param group 1: 'lars_adaptation_filter'"):
        opt.load_state_dict(saved)


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gradient_gives_a_nan_ratio_and_leaves_other_layers_alone(foreach, bad):
    params = make_params()
    grads = grad_sequence(SHAPES, 1)
    grads[0][2][0, 0, 0, 0] = bad  # one element of one adapted layer
    opt = LARS(params, lr=1.0, momentum=0.9, weight_decay=1e-4, foreach=foreach)
    ref = ReferenceLARS(params, [len(s) > 1 for s in SHAPES], lr=1.0, momentum=0.9, weight_decay=1e-4)
    got = run(opt, params, grads)
    ref.step(grads[0])
    assert math.isnan(opt.state[params[2]]["trust_ratio"].item()) and math.isnan(ref.ratios[2])
    for i in (0, 1, 3, 4):  # every other layer exactly as the reference
        torch.testing.assert_close(got[i].double(), ref.w[i], rtol=1e-5, atol=1e-6)
        if ref.ratios[i] is not None:
            assert opt.state[params[i]]["trust_ratio"].item() == pytest.approx(ref.ratios[i], rel=1e-5)


def test_a_refused_group_leaves_the_optimizer_unchanged():
    a, b = nn.Parameter(torch.randn(2, 2)), nn.Parameter(torch.randn(2, 2))
    opt = LARS([a], lr=1.0)
    with pytest.raises(ValueError, match="param group 1: lr"):
        opt.add_param_group({"params": [b], "lr": -1.0})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [b], "lr": 0.5})  # the corrected retry
    a.grad, b.grad = torch.ones(2, 2), torch.ones(2, 2)
    opt.step()  # and the optimizer still steps
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.5]


def test_a_misspelt_lars_key_is_refused_with_the_right_name():
    p = nn.Parameter(torch.randn(2, 2))
    with pytest.raises(TypeError, match="'excluded'.*did you mean 'exclude'"):
        LARS([{"params": [p], "excluded": True}])
    with pytest.raises(TypeError, match="did you mean 'trust_coefficient'"):
        LARS([{"params": [p], "trust_coeficient": 0.01}])
    LARS([{"params": [p], "lr_scale": 0.5, "layer_id": 3, "param_names": ["p"]}])  # other keys are welcome


def test_numpy_scalars_are_taken_as_numbers():
    np = pytest.importorskip("numpy")
    p = nn.Parameter(torch.ones(2, 2))
    opt = LARS([p], lr=np.float32(0.5), momentum=np.float64(0.9), weight_decay=np.float32(1e-4))
    p.grad = torch.ones(2, 2)
    opt.step()
    reference = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=np.float32(0.5))  # torch takes them too
    assert reference.param_groups[0]["lr"] == 0.5
    assert type(opt.param_groups[0]["lr"]) is float and torch.isfinite(p).all()


@pytest.mark.parametrize("bad,message", [
    ({"trust_coefficient": 0.0}, "loaded param group 0: trust_coefficient"),
    ({"lr": -1.0}, "loaded param group 0: lr"),
    ({"exclude": "yes"}, "loaded param group 0: exclude"),
    ({"momentum": float("nan")}, "loaded param group 0: momentum"),
    ({"nesterov": 1}, "loaded param group 0: nesterov"),
])
def test_loaded_groups_are_validated(bad, message):
    p = nn.Parameter(torch.randn(2, 2))
    opt = LARS([p], lr=1.0)
    saved = opt.state_dict()
    saved["param_groups"][0].update(bad)
    with pytest.raises((ValueError, TypeError), match=message):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["lr"] == 1.0  # nothing was loaded


@pytest.mark.parametrize("foreach", FOREACH)
def test_sparse_gradients_are_refused(foreach):
    emb = nn.Embedding(10, 4, sparse=True)
    opt = LARS(emb.parameters(), foreach=foreach)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_is_a_real_optimizer():
    opt = LARS([nn.Parameter(torch.randn(2))])
    assert isinstance(opt, torch.optim.Optimizer)
    assert copy.deepcopy(opt).param_groups[0]["trust_coefficient"] == 1e-3
    twin = copy.deepcopy(opt)  # a copy steps its own (copied) parameters
    twin.param_groups[0]["params"][0].grad = torch.ones(2)
    before = twin.param_groups[0]["params"][0].detach().clone()
    twin.step()
    assert not torch.equal(twin.param_groups[0]["params"][0], before)
    hook_calls = []
    opt.register_step_post_hook(lambda *a: hook_calls.append(1))
    opt.step()
    assert hook_calls == [1]


def test_all_parameters_are_typed_with_defaults():
    import inspect

    sig = inspect.signature(LARS.__init__)
    names = list(sig.parameters)[1:]
    assert names[0] == "params"
    expected = ["params", "lr", "momentum", "dampening", "weight_decay", "nesterov", "trust_coefficient", "eps",
                "trust_clip", "exclude_bias_and_norm", "maximize", "foreach", "fused", "state_precision"]
    assert names == expected
    for name in expected[1:]:
        param = sig.parameters[name]
        assert param.default is not inspect.Parameter.empty and param.annotation is not inspect.Parameter.empty


def test_named_parameters_are_accepted():
    model = nn.Linear(3, 2)
    opt = LARS(model.named_parameters())
    assert opt.param_groups[0]["param_names"] == ["weight", "bias"]



@pytest.mark.parametrize("key, meant", [("trust_coef", "'trust_coefficient'"), ("wd", "'weight_decay'"),
                                        ("mom", "'momentum'"), ("weight_dec", "'weight_decay'"),
                                        ("trust", "'trust_coefficient' or 'trust_clip'"), ("nest", "'nesterov'"),
                                        ("epsilon", "'eps'")])
def test_abbreviated_and_short_keys_are_refused_with_ours(key, meant):
    """A group key that is a prefix or a common short form of ours did nothing at all."""
    p = nn.Parameter(torch.randn(2, 2))
    with pytest.raises(TypeError, match=f"unknown LARS key '{key}'; did you mean {meant}\\?"):
        LARS([{"params": [p], key: 0.5}])


def test_keys_that_schedulers_and_frameworks_put_in_groups_are_accepted():
    from lars_plugins import LAMB

    p = nn.Parameter(torch.randn(2, 2))
    keys = {"initial_lr": 0.1, "max_lr": 1.0, "min_lr": 0.0, "base_momentum": 0.85, "max_momentum": 0.95,
            "lr_scale": 0.5, "layer_id": 3, "param_names": ["p"], "name": "decay", "use_fallback": False,
            "applied_lr_scale": 1.0, "weight_decay_filter": True}
    LARS([{"params": [p], **keys}])
    LAMB([{"params": [p], **keys}])
    with pytest.raises(TypeError, match="did you mean 'betas'"):
        LAMB([{"params": [p], "beta1": 0.8}])
