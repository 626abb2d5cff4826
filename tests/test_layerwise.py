"""The Layerwise wrapper against the rule written here in float64 over torch's own optimizers, against
LARS and LAMB where the rules coincide, and with Lookahead, schedulers and checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lars_plugins import LAMB, LARS, Layerwise, TrustRatioMonitor, centralize_gradients_, tensor_lists
from checkpoints import weights_only_round_trip

SHAPES = [(16, 8), (16,), (4, 3, 3), (4,)]  # weights are adapted, vectors excluded


def make_params(seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in SHAPES]


def grads_at(step, dtype=torch.float64):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]


def run(opt, params, steps, first=0):
    for t in range(first, first + steps):
        for p, g in zip(params, grads_at(t, params[0].dtype)):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in params]


def reference(make_base, steps, eta, eps=1e-8, clip=False, centralize=False):
    """The documented rule, in plain torch: the base steps, then each adapted layer's update Δ
    becomes r·Δ with r = η‖w‖/(‖Δ‖/lr + ε) (min(r/lr, 1) clipped), ‖w‖ taken before the step."""
    params = make_params()
    base = make_base(params)
    ratios = []
    for t in range(steps):
        grads = grads_at(t)
        if centralize:
            grads = [g - g.mean(dim=tuple(range(1, g.ndim)), keepdim=True) if g.ndim > 1 else g for g in grads]
        for p, g in zip(params, grads):
            p.grad = g
        old = [p.detach().clone() for p in params]
        base.step()
        lr = base.param_groups[0]["lr"]
        ratios = []
        with torch.no_grad():
            for p, w in zip(params, old):
                if p.ndim <= 1:
                    ratios.append(None)
                    continue
                delta = p - w
                w_norm, d_norm = w.norm().item(), delta.norm().item() / lr
                r = eta * w_norm / (d_norm + eps) if w_norm > 0 and d_norm + eps > 0 else eta
                if clip:
                    r = min(r / lr, 1.0)
                p.copy_(w + r * delta)
                ratios.append(r)
    return [p.detach() for p in params], ratios


@pytest.fixture(params=["cpu", "tensor"])
def path(request, monkeypatch):
    """"cpu": norms and ratios as Python floats, one tensor at a time (the CPU path); "tensor": the
    accelerator path (0-d tensors, no host reads), forced here on CPU tensors."""
    if request.param == "tensor":
        monkeypatch.setattr(tensor_lists, "_FORCED_PATH", "tensor")  # the bases' steps and the wrapper's rescaling

        def host_path(*_):
            raise AssertionError("the CPU rescaling ran where the tensor path was asked for")
        monkeypatch.setattr(Layerwise, "_rescale_on_host", host_path)
    return request.param


BASES = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9, weight_decay=1e-3),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05),
    "radam": lambda ps: torch.optim.RAdam(ps, lr=1e-2),
    "adafactor": lambda ps: torch.optim.Adafactor(ps, lr=1e-2),
}


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("name", list(BASES))
def test_rescales_each_base_update_as_documented(name, clip, path):
    expected, expected_ratios = reference(BASES[name], 4, eta=0.02, clip=clip)
    params = make_params()
    opt = Layerwise(BASES[name](params), trust_coefficient=0.02, trust_clip=clip)
    for a, b in zip(run(opt, params, 4), expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for p, r in zip(params, expected_ratios):
        assert (r is None) == ("trust_ratio" not in opt.state[p])
        if r is not None:
            assert opt.state[p]["trust_ratio"].item() == pytest.approx(r, rel=1e-9)


def test_over_plain_sgd_is_lars(path):
    """SGD without momentum or decay: the base's direction is the gradient, so r is LARS's Eq. 6."""
    a_params, b_params = make_params(), make_params()
    a = run(Layerwise(torch.optim.SGD(a_params, lr=3.0, momentum=0.0), trust_coefficient=0.01), a_params, 5)
    b = run(LARS(b_params, lr=3.0, momentum=0.0, trust_coefficient=0.01), b_params, 5)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_over_adamw_with_unit_coefficient_is_lamb(path):
    """AdamW's update is lr·(m̂/(√v̂+ε) + wd·w) = lr·u: with η = 1 and no ε the ratio is ‖w‖/‖u‖."""
    a_params, b_params = make_params(), make_params()
    adamw = torch.optim.AdamW([{"params": a_params[0::2], "weight_decay": 0.05},
                               {"params": a_params[1::2], "weight_decay": 0.0}], lr=1e-2, eps=1e-6)
    a = run(Layerwise(adamw, trust_coefficient=1.0, trust_eps=0.0), a_params, 5)
    b = run(LAMB(b_params, lr=1e-2, eps=1e-6, weight_decay=0.05), b_params, 5)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_gradient_centralization_is_the_paper_rule_and_composes():
    g = torch.randn(6, 3, 2, dtype=torch.float64)
    expected = g - g.mean(dim=(1, 2), keepdim=True)
    bias = torch.randn(6, dtype=torch.float64)
    bias_before = bias.clone()
    centralize_gradients_([g, bias])
    torch.testing.assert_close(g, expected)
    assert torch.equal(bias, bias_before) and g.sum(dim=(1, 2)).abs().max() < 1e-12
    expected_params, _ = reference(BASES["radam"], 3, eta=0.02, centralize=True)
    params = make_params()
    got = run(Layerwise(BASES["radam"](params), trust_coefficient=0.02, centralize_gradients=True), params, 3)
    for a, b in zip(got, expected_params):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_a_scheduler_sees_one_optimizer_and_schedules_the_base():
    params = make_params()
    opt = Layerwise(torch.optim.AdamW(params, lr=1e-2), trust_coefficient=1.0)
    assert opt.param_groups is opt.base.param_groups and opt.state is opt.base.state
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    run(opt, params, 1)
    sched.step()
    assert opt.base.param_groups[0]["lr"] == pytest.approx(5e-3)


def lookahead(optimizer):
    timm_optim = pytest.importorskip("timm.optim")
    return timm_optim.Lookahead(optimizer, alpha=0.5, k=2)


@pytest.mark.parametrize("arrangement", ["lookahead_outside", "lookahead_inside"])
def test_lookahead_either_side_resumes_from_a_weights_only_checkpoint(arrangement):
    def build(params):
        radam = torch.optim.RAdam(params, lr=1e-2, weight_decay=1e-3)
        if arrangement == "lookahead_outside":  # "LARS + Ranger": Lookahead(Layerwise(RAdam))
            return lookahead(Layerwise(radam, trust_coefficient=0.05, centralize_gradients=True))
        return Layerwise(lookahead(radam), trust_coefficient=0.05, centralize_gradients=True)

    straight_params = make_params()
    straight = run(build(straight_params), straight_params, 6)
    params = make_params()
    opt = build(params)
    run(opt, params, 3)
    ckpt = weights_only_round_trip({"params": [p.detach() for p in params], "optim": opt.state_dict()})
    resumed = [nn.Parameter(t.clone()) for t in ckpt["params"]]
    opt2 = build(resumed)
    opt2.load_state_dict(ckpt["optim"])
    for a, b in zip(run(opt2, resumed, 3, first=3), straight):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Lookahead around the wrapper leaves the step to it: the ratios of the last step are there.
    if arrangement == "lookahead_outside":
        assert all(("trust_ratio" in opt2._base_optimizer.state[p]) == (p.ndim > 1) for p in resumed)


def test_checkpoints_are_the_bare_base_s_both_ways():
    params = make_params()
    wrapped = Layerwise(torch.optim.AdamW(params, lr=1e-2), trust_coefficient=1.0)
    run(wrapped, params, 2)
    bare = torch.optim.AdamW(make_params(), lr=1e-3)
    bare.load_state_dict(wrapped.state_dict())
    assert bare.param_groups[0]["lr"] == 1e-2 and bare.state[bare.param_groups[0]["params"][0]]["step"] == 2
    again = Layerwise(torch.optim.AdamW(make_params(), lr=1e-3), trust_coefficient=0.3)
    again.load_state_dict(torch.optim.AdamW(make_params(), lr=1e-4).state_dict())  # a bare base's checkpoint
    assert again.param_groups[0]["trust_coefficient"] == 0.3 and again.param_groups[0]["lr"] == 1e-4


def test_a_deep_copy_keeps_its_base_and_steps_like_the_original():
    import copy

    params = make_params()
    opt = Layerwise(torch.optim.AdamW(params, lr=1e-2), trust_coefficient=0.5)
    run(opt, params, 2)
    twin = copy.deepcopy({"params": params, "opt": opt})
    assert twin["opt"].param_groups is twin["opt"].base.param_groups and twin["opt"].state is twin["opt"].base.state
    for a, b in zip(run(opt, params, 2, first=2), run(twin["opt"], twin["params"], 2, first=2)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_new_groups_go_to_the_base_with_the_wrapper_s_keys():
    params = make_params()
    opt = Layerwise(torch.optim.SGD(params[:2], lr=0.1), trust_coefficient=0.02)
    opt.add_param_group({"params": params[2:], "exclude": True})
    assert len(opt.base.param_groups) == 2 and opt.base.param_groups[1]["trust_coefficient"] == 0.02
    run(opt, params, 1)
    assert "trust_ratio" not in opt.state[params[2]] and "trust_ratio" in opt.state[params[0]]


def test_a_zero_initialised_layer_takes_eta_times_the_base_step_and_moves(path):
    w = nn.Parameter(torch.zeros(4, 4, dtype=torch.float64))
    opt = Layerwise(torch.optim.SGD([w], lr=1.0), trust_coefficient=0.01)
    w.grad = torch.ones(4, 4, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((4, 4), -0.01, dtype=torch.float64))
    assert opt.state[w]["trust_ratio"].item() == pytest.approx(0.01)


def test_monitor_records_the_wrapper_s_ratios():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = Layerwise(torch.optim.AdamW(model.parameters(), lr=1e-2), trust_coefficient=1.0)
    monitor = TrustRatioMonitor(model, opt, every_n_steps=1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    ratios = {k for k in monitor.latest if k.startswith("trust_ratio/")}
    assert ratios == {"trust_ratio/0.weight", "trust_ratio/2.weight"}
    assert monitor.latest["trust_ratio/0.weight"] == pytest.approx(opt.state[model[0].weight]["trust_ratio"].item())


def test_bad_bases_and_keys_are_refused():
    params = make_params()
    with pytest.raises(TypeError, match="base must be a torch.optim.Optimizer"):
        Layerwise(params)
    with pytest.raises(ValueError, match="apply them twice"):
        Layerwise(LARS(params, lr=1.0))
    with pytest.raises(ValueError, match="trust_coefficient must be > 0"):
        Layerwise(torch.optim.SGD(params, lr=0.1), trust_coefficient=0.0)
    with pytest.raises(TypeError, match="did you mean 'trust_clip'"):
        Layerwise(torch.optim.SGD([{"params": params, "trust_clips": True}], lr=0.1))
    with pytest.raises(TypeError, match="centralize_gradients must be a bool"):
        Layerwise(torch.optim.SGD(params, lr=0.1), centralize_gradients=1)
    assert math.isfinite(Layerwise(torch.optim.SGD(params, lr=0.1)).param_groups[0]["trust_eps"])


def test_one_copy_of_the_adapted_parameters_during_the_step_and_none_when_nothing_is_adapted(monkeypatch):
    """What the generic route allocates: a clone of each adapted parameter with a gradient, nothing
    else (SGD without momentum allocates nothing of its own; a step hook on it keeps the route that
    computes SGD's direction itself away)."""
    clones = []
    real_clone = torch.Tensor.clone

    def counted(self, *args, **kwargs):
        clones.append(self.numel())
        return real_clone(self, *args, **kwargs)

    for excluded, expected in ((False, [p.numel() for p in make_params()]), (True, [])):
        params = make_params()
        base = torch.optim.SGD([{"params": params, "exclude": excluded}], lr=0.1)
        base.register_step_pre_hook(lambda *_: None)
        opt = Layerwise(base)
        for p, g in zip(params, grads_at(0)):
            p.grad = g
        clones.clear()
        monkeypatch.setattr(torch.Tensor, "clone", counted)
        opt.step()
        monkeypatch.setattr(torch.Tensor, "clone", real_clone)
        assert sorted(clones) == sorted(expected)


def test_the_wrapper_hands_its_weight_norms_to_the_monitor(path, monkeypatch):
    """On a recorded step the monitor takes ‖w‖ of adapted layers from the wrapper (which takes it
    anyway) instead of a second pass, and the values are those of the weights before the step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    opt = Layerwise(torch.optim.AdamW(model.parameters(), lr=1e-2), trust_coefficient=0.5)
    monitor = TrustRatioMonitor(model, opt, every_n_steps=1)
    model(torch.randn(3, 4)).sum().backward()
    w = {n: p.detach().double().norm().item() for n, p in model.named_parameters()}  # before the step
    g = {n: p.grad.double().norm().item() for n, p in model.named_parameters()}
    adapted = {id(model[0].weight), id(model[2].weight)}
    seen = []
    real_norm = torch._foreach_norm
    monkeypatch.setattr(torch, "_foreach_norm", lambda ts, *a, **k: seen.extend(map(id, ts)) or real_norm(ts, *a, **k))
    opt.step()
    for name in w:
        assert monitor.latest[f"weight_norm/{name}"] == pytest.approx(w[name], rel=1e-6)
        assert monitor.latest[f"grad_norm/{name}"] == pytest.approx(g[name], rel=1e-6)
    if path == "cpu":  # there the wrapper's norms are BLAS dots: every foreach norm is the monitor's
        assert not set(seen) & adapted
    else:  # the wrapper's one pass over the adapted weights, none by the monitor
        assert all(seen.count(i) == 1 for i in adapted)


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_at_lr_zero_adapted_layers_stay_put_even_where_the_base_moves(path, tensor_lr):
    """Rprop's step sizes are its own after the first step: at lr 0 (where WarmupDecayLR ends) it
    still moves. The wrapper's update r·Δw then is 0, the limit as lr goes to 0, not NaN."""
    params = make_params()
    lr = torch.tensor(0.01, dtype=torch.float64) if tensor_lr else 0.01
    opt = Layerwise(torch.optim.Rprop(params, lr=lr), trust_coefficient=0.02)
    run(opt, params, 2)
    if tensor_lr:
        opt.param_groups[0]["lr"].fill_(0.0)
    else:
        opt.param_groups[0]["lr"] = 0.0
    before = [p.detach().clone() for p in params]
    run(opt, params, 1, first=2)
    for p, b in zip(params, before):
        if p.ndim > 1:
            assert torch.equal(p, b)  # adapted: not moved
            assert opt.state[p]["trust_ratio"].item() == 0.0
        else:
            assert not torch.equal(p, b)  # excluded: Rprop's own step, as ever
    # NaN stays reserved for NaN: SGD at lr 0 turns a NaN gradient into a NaN update (0·NaN).
    sgd = Layerwise(torch.optim.SGD(params, lr=torch.tensor(0.0, dtype=torch.float64) if tensor_lr else 0.0))
    for p, g in zip(params, grads_at(3)):
        p.grad = g
    params[0].grad[0, 0] = math.nan
    sgd.step()
    assert math.isnan(sgd.state[params[0]]["trust_ratio"].item())
    assert sgd.state[params[2]]["trust_ratio"].item() == 0.0


@pytest.mark.parametrize("scheduler", ["OneCycleLR", "CyclicLR"])
@pytest.mark.parametrize("base", ["AdamW", "SGD"])
def test_momentum_cycling_schedulers_schedule_the_base_through_the_wrapper(base, scheduler):
    """OneCycleLR and CyclicLR cycle the base's momentum (SGD) or β1 (AdamW) beside its lr; they look
    for it in optimizer.defaults. Through the wrapper they must do to the base what they do to it bare."""
    def build(params):
        if base == "AdamW":
            return torch.optim.AdamW(params, lr=1e-2)
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)

    def schedule(opt):
        if scheduler == "OneCycleLR":
            return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
        return torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=3)

    bare_params, wrapped_params = make_params(), make_params()
    bare = build(bare_params)
    wrapped = Layerwise(build(wrapped_params))
    schedules = [schedule(bare), schedule(wrapped)]
    for _ in range(4):
        run(bare, bare_params, 1)
        run(wrapped, wrapped_params, 1)
        for s in schedules:
            s.step()
    key = "betas" if base == "AdamW" else "momentum"
    assert wrapped.base.param_groups[0]["lr"] == bare.param_groups[0]["lr"]
    assert wrapped.base.param_groups[0][key] == bare.param_groups[0][key]
    assert wrapped.param_groups[0][key] != build(make_params()).param_groups[0][key]  # it was cycled
    pickled = weights_only_round_trip(wrapped.state_dict())
    assert "trust_coefficient" in pickled["param_groups"][0]


def test_bases_the_wrapper_cannot_serve_are_refused_at_construction():
    params = make_params()
    with pytest.raises(ValueError, match="LBFGS.*closure"):
        Layerwise(torch.optim.LBFGS(params))
    transformers = pytest.importorskip("transformers.optimization")
    adafactor = transformers.Adafactor(params)  # its defaults: lr=None, relative_step=True
    with pytest.raises(ValueError, match=r"param group 0: the base Adafactor has lr=None.*relative_step=False"):
        Layerwise(adafactor)
    before = [p.detach().clone() for p in params]
    wrapped = Layerwise(transformers.Adafactor(params, lr=1e-3, relative_step=False, scale_parameter=False,
                                               warmup_init=False))
    run(wrapped, params, 1)  # with an lr it runs
    assert not torch.equal(params[0], before[0])
    with pytest.raises(ValueError, match="param group 1: the base Adafactor has lr=None"):
        wrapped.add_param_group({"params": [nn.Parameter(torch.zeros(3, 3, dtype=torch.float64))], "lr": None})


# --- the CPU route over torch's Adam and AdamW (lars_plugins.known_directions) ---------------------------

ROUTE_BASES = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05),
    "adamw-amsgrad-maximize": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.05, amsgrad=True,
                                                           maximize=True),
    "adam-l2": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.05),  # coupled decay, inside g
    "adamw-tensor-lr-fused": lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(1e-2, dtype=torch.float64),
                                                          weight_decay=0.05, fused=True),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9, weight_decay=1e-3),
    "sgd-nesterov-maximize": lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9, nesterov=True, maximize=True),
    "sgd-dampening": lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.8, dampening=0.3, weight_decay=1e-3),
    "sgd-plain": lambda ps: torch.optim.SGD(ps, lr=0.5, weight_decay=1e-3),
}


def count_route(monkeypatch):
    import lars_plugins.wrapper as wrapper

    calls = []
    real = wrapper.known_direction_step
    monkeypatch.setattr(wrapper, "known_direction_step", lambda *a, **k: (calls.append(1), real(*a, **k)))
    return calls


# AdamW's direction comes from Numba's one-pass loops where Numba is installed, else from torch's kernels
ROUTE_CASES = [(name, "torch kernels") for name in ROUTE_BASES] + [
    (name, "numba") for name in ROUTE_BASES if name.startswith("adamw")]


@pytest.mark.parametrize("kernels", ["torch kernels", "numba"])
def test_adamw_at_lr_zero_keeps_adapted_layers_put_and_its_moments_moving(kernels, monkeypatch):
    """At lr 0 the wrapper's ratio is 0 (its own rule, which Numba's loops do not compute: AdamW's
    tensors take torch's kernel then); AdamW's moments still advance, as torch's AdamW's do."""
    from lars_plugins import cpu_kernels

    if kernels == "numba":
        pytest.importorskip("numba")
    else:
        monkeypatch.setattr(cpu_kernels, "enabled", False)
    calls = count_route(monkeypatch)
    params, twins = make_params(), make_params()
    opt = Layerwise(torch.optim.AdamW(params, lr=0.0, weight_decay=0.05), trust_coefficient=0.02)
    plain = torch.optim.AdamW(twins, lr=0.0, weight_decay=0.05)
    before = [p.detach().clone() for p in params]
    for opt_, ps in ((opt, params), (plain, twins)):
        for p, g in zip(ps, grads_at(0)):
            p.grad = g.clone()
        opt_.step()
    assert len(calls) == 1
    for p, b, q in zip(params, before, twins):
        assert torch.equal(p.detach(), b)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], plain.state[q]["exp_avg_sq"], rtol=1e-12, atol=0)
        if p.ndim > 1:
            assert opt.state[p]["trust_ratio"].item() == 0.0


@pytest.mark.parametrize("name,kernels", ROUTE_CASES)
def test_the_route_over_sgd_adam_and_adamw_is_the_documented_rule(name, kernels, monkeypatch):
    """The base's fused CPU kernel at lr 1 (on a copy of w, or for AdamW on a scratch buffer), or
    Numba's one-pass loop for AdamW, instead of its step then a rescaling: the same result as the rule
    written here over torch's own step, and the same state as the generic route."""
    from lars_plugins import cpu_kernels

    if kernels == "numba":
        pytest.importorskip("numba")
    else:
        monkeypatch.setattr(cpu_kernels, "enabled", False)
    calls = count_route(monkeypatch)
    expected, expected_ratios = reference(ROUTE_BASES[name], 4, eta=0.02)
    params = make_params()
    given = grads_at(3)
    opt = Layerwise(ROUTE_BASES[name](params), trust_coefficient=0.02)
    run(opt, params, 3)
    for p, g in zip(params, given):
        p.grad = g
    opt.step()
    assert len(calls) == 4  # every step took the route
    assert all(p.grad is g for p, g in zip(params, given))  # the gradients are back where they were
    for a, b in zip(params, expected):
        torch.testing.assert_close(a.detach(), b, rtol=1e-9, atol=1e-12)
    for p, r in zip(params, expected_ratios):
        if r is not None:  # (a tensor where lr is one)
            assert opt.state[p]["trust_ratio"].item() == pytest.approx(float(r), rel=1e-9)
    # The generic route (taken when the base has a step hook) leaves the same state, key by key.
    generic_params = make_params()
    base = ROUTE_BASES[name](generic_params)
    base.register_step_pre_hook(lambda *_: None)
    generic = Layerwise(base, trust_coefficient=0.02)
    run(generic, generic_params, 4)
    assert len(calls) == 4  # the hook kept the route away
    ours, theirs = opt.state_dict()["state"], generic.state_dict()["state"]
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].keys() == theirs[key].keys()
        for k in ours[key]:
            assert ours[key][k].dtype == theirs[key][k].dtype and ours[key][k].device == theirs[key][k].device
            torch.testing.assert_close(ours[key][k], theirs[key][k], rtol=1e-9, atol=1e-12)


def test_a_base_hook_sees_every_gradient_and_the_route_is_not_taken(monkeypatch):
    calls = count_route(monkeypatch)
    params = make_params()
    base = torch.optim.AdamW(params, lr=1e-2)
    seen = []
    base.register_step_pre_hook(lambda opt, *_: seen.append(sum(p.grad is not None for p in params)))
    run(Layerwise(base, trust_coefficient=0.02), params, 2)
    assert seen == [4, 4] and calls == []


def test_gradients_come_back_when_the_base_step_fails(monkeypatch):
    params = make_params()
    opt = Layerwise(torch.optim.AdamW(params, lr=1e-2), trust_coefficient=0.02)
    given = grads_at(0)
    for p, g in zip(params, given):
        p.grad = g

    def fails(*_, **__):
        raise RuntimeError("the base's step failed")

    monkeypatch.setattr(opt.base, "step", fails)
    with pytest.raises(RuntimeError, match="failed"):
        opt.step()
    assert all(p.grad is g for p, g in zip(params, given))
