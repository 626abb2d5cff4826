"""lars_plugins.functional.lamb against Algorithm 2 of the LAMB paper written here in float64, and
against timm's Lamb where the two agree (every tensor adapted, weight decay inside u, no clipping)."""

from __future__ import annotations

import math

import pytest
import torch
from checkpoints import weights_only_round_trip
from torch import nn

from lars_plugins import LAMB
from lars_plugins import cpu_directions, cpu_kernels, functional, tensor_lists
from lars_plugins.functional import lamb, lamb_trust_ratio

SHAPES = [(16, 8), (8,), (4, 3, 3, 3), (32, 16)]


def tensors(seed, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in shapes]


class ReferenceLAMB:
    """Algorithm 2, one tensor at a time in float64, with the documented fallbacks."""

    def __init__(self, params, adapt, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True,
                 weight_norm_bounds=None, trust_clip=False, maximize=False):
        self.w = [p.double().clone() for p in params]
        self.m = [torch.zeros_like(w) for w in self.w]
        self.v = [torch.zeros_like(w) for w in self.w]
        self.adapt, self.t = adapt, 0
        self.h = dict(lr=lr, b1=betas[0], b2=betas[1], eps=eps, wd=weight_decay, bc=bias_correction,
                      bounds=weight_norm_bounds, clip=trust_clip, maximize=maximize)
        self.ratios = [None] * len(params)

    def step(self, grads):
        h = self.h
        self.t += 1
        for i, g in enumerate(grads):
            g = -g.double() if h["maximize"] else g.double()
            self.m[i] = h["b1"] * self.m[i] + (1 - h["b1"]) * g
            self.v[i] = h["b2"] * self.v[i] + (1 - h["b2"]) * g * g
            m_hat, v_hat = self.m[i], self.v[i]
            if h["bc"]:
                m_hat, v_hat = m_hat / (1 - h["b1"] ** self.t), v_hat / (1 - h["b2"] ** self.t)
            u = m_hat / (v_hat.sqrt() + h["eps"])
            if not self.adapt[i]:
                self.w[i] = self.w[i] - h["lr"] * u
                continue
            u = u + h["wd"] * self.w[i]
            w_norm, u_norm = self.w[i].norm().item(), u.norm().item()
            phi = w_norm if h["bounds"] is None else min(max(w_norm, h["bounds"][0]), h["bounds"][1])
            ratio = phi / u_norm if w_norm > 0 and u_norm > 0 else 1.0
            if h["clip"]:
                ratio = min(ratio, 1.0)
            self.ratios[i] = ratio
            self.w[i] = self.w[i] - h["lr"] * ratio * u


CONFIGS = [
    dict(lr=1e-2),
    dict(lr=1e-2, weight_decay=0.0),
    dict(lr=5e-3, betas=(0.8, 0.99), eps=1e-8, bias_correction=False),
    dict(lr=1e-2, weight_norm_bounds=(0.5, 3.0)),
    dict(lr=2e-2, trust_clip=True),
    dict(lr=1e-2, maximize=True),
]


# "cpu": the CPU path (one tensor at a time, norms read on the host; Numba's one-pass loops where
# Numba is installed); "cpu-torch": the same with torch's kernels only; "single": the single-tensor
# path accelerators take (no host reads), forced here on CPU tensors; "foreach": multi-tensor.
PATHS = ["cpu", "cpu-torch", "single", "foreach"]


def use_path(path, monkeypatch):
    """The ``foreach`` argument for ``path``; "single" also turns the CPU path off."""
    if path == "single":
        monkeypatch.setattr(tensor_lists, "_FORCED_PATH", "tensor")
    if path == "cpu-torch":
        monkeypatch.setattr(cpu_kernels, "enabled", False)
    return path == "foreach"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("tensor_step", [False, True])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_matches_algorithm_2(cfg, path, tensor_step, monkeypatch):
    foreach = use_path(path, monkeypatch)
    params = tensors(0)
    adapt = [len(s) > 1 for s in SHAPES]
    ref = ReferenceLAMB(params, adapt, **cfg)
    betas = cfg.get("betas", (0.9, 0.999))
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    ratios = [torch.zeros(()) if a else None for a in adapt]
    kwargs = dict(lr=cfg["lr"], beta1=betas[0], beta2=betas[1], eps=cfg.get("eps", 1e-6),
                  weight_decay=cfg.get("weight_decay", 0.01), bias_correction=cfg.get("bias_correction", True),
                  weight_norm_bounds=cfg.get("weight_norm_bounds"), trust_clip=cfg.get("trust_clip", False),
                  maximize=cfg.get("maximize", False), foreach=foreach)
    for t in range(1, 5):
        grads = tensors(t)
        ref.step(grads)
        step = torch.tensor(float(t)) if tensor_step else t
        lamb(params, grads, m, v, ratios, excluded=[not a for a in adapt], step=step, **kwargs)
        for i, p in enumerate(params):
            torch.testing.assert_close(p.double(), ref.w[i], rtol=1e-5, atol=1e-6)
            if adapt[i]:
                assert ratios[i].item() == pytest.approx(ref.ratios[i], rel=1e-5)


@pytest.mark.parametrize("foreach", [False, True])
def test_equals_timm_lamb_where_the_rules_coincide(foreach):
    timm_optim = pytest.importorskip("timm.optim")
    ours, theirs = tensors(0), [torch.nn.Parameter(p.clone()) for p in tensors(0)]
    opt = timm_optim.Lamb(theirs, lr=1e-2, weight_decay=0.05, max_grad_norm=None)
    m = [torch.zeros_like(p) for p in ours]
    v = [torch.zeros_like(p) for p in ours]
    ratios = [torch.zeros(()) for _ in ours]
    for t in range(1, 5):
        grads = tensors(t)
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        opt.step()
        lamb(ours, grads, m, v, ratios, excluded=[False] * len(ours), step=t, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6,
             weight_decay=0.05, foreach=foreach)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-7)


def test_zero_and_non_finite_norms():
    w = torch.tensor([0.0, 2.0, 2.0, math.nan, 3.0])
    u = torch.tensor([1.0, 0.0, 4.0, 1.0, math.inf])
    ratio = lamb_trust_ratio(w, u)
    assert ratio[:3].tolist() == [1.0, 1.0, 0.5]  # ‖w‖ = 0 or ‖u‖ = 0: the plain step; else ‖w‖/‖u‖
    assert math.isnan(ratio[3]) and math.isnan(ratio[4])
    assert lamb_trust_ratio(torch.tensor([8.0]), torch.tensor([2.0]), trust_clip=True).item() == 1.0
    assert lamb_trust_ratio(torch.tensor([8.0]), torch.tensor([2.0]), weight_norm_bounds=(0.0, 4.0)).item() == 2.0


def test_a_zero_tensor_takes_the_plain_adam_step_and_gradients_are_not_written():
    w, g = torch.zeros(5), torch.linspace(-1, 1, 5)
    g_before = g.clone()
    m, v, ratio = torch.zeros(5), torch.zeros(5), torch.zeros(())
    lamb([w], [g], [m], [v], [ratio], excluded=[False], step=1, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8,
         weight_decay=0.01)
    # First step with bias correction: u = g/(|g| + ε) ≈ sign(g); ratio 1 since ‖w‖ = 0.
    torch.testing.assert_close(w, -0.1 * torch.sign(g), atol=1e-6, rtol=0)
    assert ratio.item() == 1.0 and torch.equal(g, g_before)


# --- the optimizer ---------------------------------------------------------------------------------


MODEL_SHAPES = [(16, 8), (16,), (4, 16), (4,)]  # two weights, two biases


def make_params(seed=0, shapes=MODEL_SHAPES):
    return [nn.Parameter(t) for t in tensors(seed, shapes)]


def run(opt, params, steps, first=1):
    for t in range(first, first + steps):
        for p, g in zip(params, tensors(100 + t, [p.shape for p in params])):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_optimizer_matches_algorithm_2_with_biases_excluded(cfg, path, monkeypatch):
    foreach = use_path(path, monkeypatch)
    params = make_params()
    ref = ReferenceLAMB(params, [len(s) > 1 for s in MODEL_SHAPES], **cfg)
    opt = LAMB(params, foreach=foreach, **cfg)
    for t in range(1, 5):
        grads = tensors(100 + t, MODEL_SHAPES)
        ref.step(grads)
        run(opt, params, 1, first=t)
    for i, p in enumerate(params):
        torch.testing.assert_close(p.detach().double(), ref.w[i], rtol=1e-5, atol=1e-6)
        ratio = opt.state[p].get("trust_ratio")
        assert (ratio is None) == (ref.ratios[i] is None)
        if ratio is not None:
            assert ratio.item() == pytest.approx(ref.ratios[i], rel=1e-5)


def test_optimizer_equals_timm_lamb_with_every_tensor_adapted():
    timm_optim = pytest.importorskip("timm.optim")
    ours, theirs = make_params(), make_params()
    a = run(LAMB(ours, lr=1e-2, weight_decay=0.05, exclude_bias_and_norm=False), ours, 5)
    b = run(timm_optim.Lamb(theirs, lr=1e-2, weight_decay=0.05, max_grad_norm=None, always_adapt=True), theirs, 5)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_a_parameter_without_gradient_keeps_its_own_step_count():
    """Bias correction follows each parameter's own count (as torch's Adam does), not the group's."""
    late, early = make_params(shapes=[(8, 4), (8, 4)])
    ref_late = ReferenceLAMB([late], [True], lr=1e-2)
    opt = LAMB([early, late], lr=1e-2)
    early.grad = torch.ones(8, 4)
    opt.step()  # late has no gradient: not stepped, no state
    assert "step" not in opt.state[late]
    for t in range(2):
        grads = tensors(7 + t, [(8, 4), (8, 4)])
        early.grad, late.grad = grads
        ref_late.step([grads[1]])
        opt.step()
    assert opt.state[late]["step"].item() == 2 and opt.state[early]["step"].item() == 3
    torch.testing.assert_close(late.detach().double(), ref_late.w[0], rtol=1e-5, atol=1e-6)


def test_tensor_lr_equals_float_lr_and_scheduler_drives_it():
    a_params, b_params = make_params(), make_params()
    a = run(LAMB(a_params, lr=3e-3), a_params, 3)
    b = run(LAMB(b_params, lr=torch.tensor(3e-3)), b_params, 3)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    params = make_params()
    opt = LAMB(params, lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    ref = ReferenceLAMB(params, [len(s) > 1 for s in MODEL_SHAPES], lr=1e-2)
    for t in range(1, 4):
        ref.step(tensors(100 + t, MODEL_SHAPES))
        run(opt, params, 1, first=t)
        sched.step()
        ref.h["lr"] *= 0.5
    for i, p in enumerate(params):
        torch.testing.assert_close(p.detach().double(), ref.w[i], rtol=1e-5, atol=1e-6)


def test_resume_from_a_weights_only_checkpoint_equals_the_uninterrupted_run():
    cfg = dict(lr=torch.tensor(5e-3), weight_decay=0.02, weight_norm_bounds=(0.1, 10.0))
    straight_params = make_params()
    straight = run(LAMB(straight_params, **cfg), straight_params, 6)
    params = make_params()
    opt = LAMB(params, **cfg)
    run(opt, params, 3)
    ckpt = weights_only_round_trip({"params": [p.detach() for p in params], "optim": opt.state_dict()})
    resumed = [nn.Parameter(t.clone()) for t in ckpt["params"]]
    opt2 = LAMB(resumed)
    opt2.load_state_dict(ckpt["optim"])
    assert opt2.param_groups[0]["weight_norm_bounds"] == (0.1, 10.0)
    for a, b in zip(run(opt2, resumed, 3, first=4), straight):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("foreach", [False, True])
def test_step_reads_nothing_on_the_host_but_its_cpu_step_counts(foreach, monkeypatch):
    """The accelerator paths, run here on CPU tensors (the CPU path reads its norms on purpose)."""
    monkeypatch.setattr(tensor_lists, "_FORCED_PATH", "tensor")
    params = make_params()
    opt = LAMB(params, lr=torch.tensor(1e-2), trust_clip=True, weight_norm_bounds=(0.0, 5.0), foreach=foreach)

    def guarded(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if not any(self is state.get("step") for state in opt.state.values()):
                raise AssertionError(f"host read ({name}) of a tensor inside LAMB.step()")
            return real(self, *args, **kwargs)
        return read

    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, guarded(name))
    run(opt, params, 2)


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(lr=-1.0), ValueError, "lr"),
    (dict(betas=(0.9, 1.0)), ValueError, "betas[1]"),
    (dict(betas=0.9), TypeError, "betas"),
    (dict(eps=-1e-8), ValueError, "eps"),
    (dict(weight_decay=math.nan), ValueError, "weight_decay"),
    (dict(weight_norm_bounds=(2.0, 1.0)), ValueError, "weight_norm_bounds"),
    (dict(weight_norm_bounds=(-1.0, 1.0)), ValueError, "weight_norm_bounds[0]"),
    (dict(trust_clip="yes"), TypeError, "trust_clip"),
    (dict(bias_correction=None), TypeError, "bias_correction"),
])
def test_bad_arguments_are_refused_by_name(kwargs, error, name):
    with pytest.raises(error, match=name.replace("[", r"\[").replace("]", r"\]")):
        LAMB(make_params(), **kwargs)


def test_other_libraries_keys_are_refused_with_ours():
    with pytest.raises(TypeError, match="'always_adapt' is timm's name.*'exclude_bias_and_norm'.*=False"):
        LAMB([{"params": make_params(), "always_adapt": True}])
    with pytest.raises(TypeError, match="did you mean 'weight_decay'"):
        LAMB([{"params": make_params(), "weight_decays": 0.1}])


def test_trains_a_real_model_and_excludes_biases_and_norms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 3))
    x = torch.randn(256, 10)
    y = (x[:, :3] * torch.tensor([1.0, -2.0, 0.5])).argmax(1)
    opt = LAMB(model.parameters(), lr=2e-2)
    first = None
    for _ in range(60):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.3 * first
    adapted = {n for n, p in model.named_parameters() if "trust_ratio" in opt.state[p]}
    assert adapted == {"0.weight", "3.weight"}


@pytest.mark.parametrize("path", PATHS)
def test_a_nan_gradient_gives_that_layer_a_nan_ratio_and_leaves_the_others_alone(path, monkeypatch):
    foreach = use_path(path, monkeypatch)
    params = make_params()
    opt = LAMB(params, lr=1e-2, foreach=foreach)
    grads = tensors(5, MODEL_SHAPES)
    grads[0][0, 0] = math.nan
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    assert math.isnan(opt.state[params[0]]["trust_ratio"].item())
    healthy = opt.state[params[2]]["trust_ratio"].item()
    assert math.isfinite(healthy) and healthy > 0 and torch.isfinite(params[2]).all()


@pytest.mark.parametrize("foreach", [False, True])
def test_complex_parameters_step_as_their_real_views(foreach):
    """As torch's Adam steps them: the second moment holds the squares of the real and imaginary
    parts (it accumulated g·g, a complex number, before), and ‖w‖ is the complex tensor's norm."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 4), (5,)]
    start = [torch.randn(s, dtype=torch.complex128, generator=gen) for s in shapes]
    params = [nn.Parameter(t.clone()) for t in start]
    ref = ReferenceLAMB([torch.view_as_real(t) for t in start], adapt=[True, False], lr=1e-2)
    opt = LAMB(params, lr=1e-2, foreach=foreach)
    for _ in range(3):
        grads = [torch.randn(s, dtype=torch.complex128, generator=gen) for s in shapes]
        ref.step([torch.view_as_real(g) for g in grads])
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    for i, p in enumerate(params):
        torch.testing.assert_close(torch.view_as_real(p.detach()), ref.w[i], rtol=1e-10, atol=1e-12)
        assert torch.view_as_real(opt.state[p]["exp_avg_sq"]).ge(0).all()  # squares of both parts
    ratio = opt.state[params[0]]["trust_ratio"]
    assert ratio.dtype == torch.float64 and ratio.item() == pytest.approx(ref.ratios[0], rel=1e-10)


def test_a_timm_lamb_checkpoint_goes_on_where_it_stopped():
    """timm keeps one step count per group, none per parameter: its moments were silently replaced by
    zeros and bias correction restarted from step 1."""
    timm_optim = pytest.importorskip("timm.optim")
    theirs = [torch.nn.Parameter(p.clone()) for p in tensors(0)]
    ours = [torch.nn.Parameter(p.clone()) for p in tensors(0)]
    # always_adapt=True: every tensor adapted, as ours with exclude_bias_and_norm=False (which the
    # checkpoint's always_adapt sets on load: docs/timm.md).
    timm_opt = timm_optim.Lamb(theirs, lr=1e-2, weight_decay=0.05, max_grad_norm=None, always_adapt=True)

    def step(opt, params, t):
        for p, g in zip(params, tensors(t)):
            p.grad = g.clone()
        opt.step()

    for t in range(1, 3):
        step(timm_opt, theirs, t)
    with torch.no_grad():
        for a, b in zip(ours, theirs):
            a.copy_(b)
    opt = LAMB(ours, lr=1e-2, weight_decay=0.05)
    opt.load_state_dict(weights_only_round_trip(timm_opt.state_dict()))
    assert all(opt.state[p]["step"].item() == 2 for p in ours)
    assert "step" not in opt.param_groups[0]
    for t in range(3, 5):
        step(timm_opt, theirs, t)
        step(opt, ours, t)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-7)
    moments_only = opt.state_dict()
    for entry in moments_only["state"].values():
        del entry["step"]
    with pytest.raises(ValueError, match="Adam moments but no step count"):
        LAMB(ours, lr=1e-2).load_state_dict(moments_only)


@pytest.mark.parametrize("route", ["numba", "torch kernels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_cpu_path_takes_its_fast_route(dtype, route, monkeypatch):
    """The CPU path's fast route is the one taken for every adapted dense tensor, and it is Algorithm 2
    (the float64 reference): Numba's loops, one call per step for all of them, where Numba is
    installed (float32 and float64); else, and for bfloat16, AdamW's fused kernel on a scratch buffer
    (cpu_directions.adamw_direction, which gives −m̂/(√v̂+ε)) one tensor at a time."""
    if route == "numba":
        pytest.importorskip("numba")
        cpu_kernels.available(dtype)  # its once-per-dtype check builds batches of its own: before they are counted
    else:
        monkeypatch.setattr(cpu_kernels, "enabled", False)
    per_tensor, batches = [], []
    real, real_batch = cpu_directions.adamw_direction, cpu_kernels.AdamWBatch
    monkeypatch.setattr(cpu_directions, "adamw_direction", lambda *a, **k: per_tensor.append(1) or real(*a, **k))
    monkeypatch.setattr(cpu_kernels, "AdamWBatch", lambda *a, **k: batches.append(len(a[0])) or real_batch(*a, **k))
    params = [p.to(dtype) for p in tensors(0)]
    adapt = [len(s) > 1 for s in SHAPES]
    ref = ReferenceLAMB(params, adapt, lr=1e-2, weight_decay=0.05)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    ratios = [torch.zeros((), dtype=functional.ratio_dtype(dtype)) if a else None for a in adapt]
    for t in range(1, 4):
        grads = [g.to(dtype) for g in tensors(t)]
        ref.step(grads)
        lamb(params, grads, m, v, ratios, excluded=[not a for a in adapt], step=torch.tensor(float(t)), lr=1e-2,
             beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.05)
    if route == "numba" and dtype != torch.bfloat16:
        assert batches == [sum(adapt)] * 3 and not per_tensor
    else:
        assert len(per_tensor) == 3 * sum(adapt) and not batches
    tol = dict(rtol=1e-5, atol=1e-6) if dtype != torch.bfloat16 else dict(rtol=2e-2, atol=2e-2)
    for p, w in zip(params, ref.w):
        torch.testing.assert_close(p.double(), w, **tol)


def spy_routes(monkeypatch):
    """Count what a CPU step calls: the one-pass route's kernels and the generic route (lamb())."""
    import lars_plugins.lamb as lamb_module

    assert cpu_kernels.available(torch.float32) and cpu_directions.supported(torch.float32)  # (their probes run first)
    calls = {"batch": [], "fused_adamw": [], "generic": 0}
    real_batch, real_fused, real_generic = cpu_kernels.AdamWBatch, torch._fused_adamw_, lamb_module.lamb

    def generic(*args, **kwargs):
        calls["generic"] += 1
        return real_generic(*args, **kwargs)

    monkeypatch.setattr(cpu_kernels, "AdamWBatch",
                        lambda *a, **k: calls["batch"].append(len(a[0])) or real_batch(*a, **k))
    monkeypatch.setattr(torch, "_fused_adamw_",
                        lambda *a, **k: calls["fused_adamw"].append(len(a[0])) or real_fused(*a, **k))
    monkeypatch.setattr(lamb_module, "lamb", generic)
    return calls


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c.get("bias_correction", True)],
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_a_cpu_group_is_stepped_in_one_pass_as_algorithm_2(cfg, monkeypatch):
    """Dense float32 CPU tensors: per step, one Numba call for the adapted tensors and one fused
    AdamW call for the excluded ones, nothing through the generic route; Algorithm 2 in float64,
    the ratios in their slots, each count advanced once."""
    pytest.importorskip("numba")
    calls = spy_routes(monkeypatch)
    params = make_params()
    adapt = [len(s) > 1 for s in MODEL_SHAPES]
    ref = ReferenceLAMB(params, adapt, **cfg)
    opt = LAMB(params, **cfg)
    for t in range(1, 4):
        ref.step(tensors(100 + t, MODEL_SHAPES))
        run(opt, params, 1, first=t)
    assert calls == {"batch": [2, 2, 2], "fused_adamw": [2, 2, 2], "generic": 0}
    for i, p in enumerate(params):
        torch.testing.assert_close(p.detach().double(), ref.w[i], rtol=1e-5, atol=1e-6)
        assert opt.state[p]["step"].item() == 3
        if adapt[i]:
            assert opt.state[p]["trust_ratio"].item() == pytest.approx(ref.ratios[i], rel=1e-5)


@pytest.mark.parametrize("odd", ["strided gradient", "float64 tensor", "no bias correction", "bfloat16 state"])
def test_a_group_the_one_pass_route_cannot_take_is_stepped_whole_by_the_generic_route(odd, monkeypatch):
    """One tensor that does not fit (a transposed gradient, another dtype in the group) or an option
    the route leaves to the generic one: the whole group goes there, untouched by the one-pass route
    before it, and the result is still Algorithm 2."""
    pytest.importorskip("numba")
    calls = spy_routes(monkeypatch)
    shapes = [(8, 8), (8,), (4, 8)]
    params = make_params(shapes=shapes)
    if odd == "float64 tensor":
        params[2] = nn.Parameter(params[2].detach().double())
    cfg = dict(lr=1e-2, bias_correction=odd != "no bias correction")
    ref = ReferenceLAMB(params, [True, False, True], **cfg)
    opt = LAMB(params, state_precision="bfloat16" if odd == "bfloat16 state" else "float32", **cfg)
    for t in range(1, 3):
        grads = tensors(100 + t, shapes)
        ref.step(grads)
        for p, g in zip(params, grads):
            p.grad = g.t().contiguous().t() if odd == "strided gradient" and g.dim() == 2 else g.to(p.dtype)
        opt.step()
    assert calls["generic"] == 2
    tol = dict(rtol=2e-2, atol=2e-3) if odd == "bfloat16 state" else dict(rtol=1e-5, atol=1e-6)
    for p, w in zip(params, ref.w):
        torch.testing.assert_close(p.detach().double(), w, **tol)
        assert opt.state[p]["step"].item() == 2


def test_a_sparse_gradient_is_refused_by_the_one_pass_route_as_by_the_generic_one():
    params = make_params()
    opt = LAMB(params, lr=1e-2)
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, tensors(3, MODEL_SHAPES)):
        p.grad = g
    params[2].grad = params[2].grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
