"""The fused (Triton) LARS and LAMB steps against the float64 references of test_optim and test_lamb.

On a machine with a GPU these run the kernels on CUDA. Without one they run the same kernels in
Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set here before the kernels are
first imported), with small blocks so that every tensor spans several programs and the
last-program reduction loops more than once.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before lars_plugins._kernels is imported (it is imported lazily)

from checkpoints import weights_only_round_trip  # noqa: E402
from test_lamb import CONFIGS as LAMB_CONFIGS, ReferenceLAMB  # noqa: E402
from test_optim import CONFIGS as LARS_CONFIGS, ReferenceLARS  # noqa: E402

from lars_plugins import LAMB, LARS, TrustRatioMonitor, fused  # noqa: E402

pytestmark = pytest.mark.skipif(not fused.available(), reason="needs Triton")
DEVICE = torch.device("cuda" if CUDA else "cpu")
# An empty tensor, a zero-initialised one, sizes that end mid-block, several blocks per tensor.
SHAPES = [(16, 8), (8,), (4, 3, 3, 3), (0,), (5,), (32, 16), (300,), (13, 11)]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(fused, "BLOCK", 64)
    monkeypatch.setattr(fused, "RBLOCK", 2)


def make_params(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    params[6].zero_()  # ‖w‖ = 0: the documented fallback ratio
    return [nn.Parameter(p.to(device=DEVICE, dtype=dtype)) for p in params]


def gradients(step, scale=1.0):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=gen) * scale for s in SHAPES]


def give(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.to(device=DEVICE, dtype=p.dtype)  # a new tensor each step, as after zero_grad(set_to_none=True)


def lr_for(value, tensor_lr):
    return torch.tensor(value, device=DEVICE) if tensor_lr else value


@pytest.mark.parametrize("tensor_lr", [False, True])
@pytest.mark.parametrize("cfg", LARS_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_fused_lars_matches_the_reference(cfg, tensor_lr):
    params = make_params()
    adapt = [len(s) > 1 or s == (300,) for s in SHAPES]  # the zero tensor is adapted (its own group)
    ref = ReferenceLARS(params, adapt, **cfg)
    opt = LARS([{"params": [p for p, a in zip(params, adapt) if not a]},
                {"params": [p for p, a in zip(params, adapt) if a], "exclude": False}],
               fused=True, **{**cfg, "lr": lr_for(cfg["lr"], tensor_lr)})
    for step in range(4):
        grads = gradients(step)
        ref.step(grads)
        give(params, grads)
        opt.step()
        for i, p in enumerate(params):
            torch.testing.assert_close(p.detach().cpu().double(), ref.w[i], rtol=1e-5, atol=1e-6)
            if adapt[i]:
                ratio = opt.state[p]["trust_ratio"]
                assert ratio.dtype == torch.float32 and ratio.device == p.device
                assert ratio.item() == pytest.approx(ref.ratios[i], rel=1e-5)


@pytest.mark.parametrize("tensor_lr", [False, True])
@pytest.mark.parametrize("cfg", LAMB_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_fused_lamb_matches_algorithm_2(cfg, tensor_lr):
    params = make_params()
    adapt = [len(s) > 1 for s in SHAPES]
    ref = ReferenceLAMB(params, adapt, **cfg)
    opt = LAMB(params, fused=True, **{**cfg, "lr": lr_for(cfg["lr"], tensor_lr)})
    for step in range(4):
        grads = gradients(step)
        ref.step(grads)
        give(params, grads)
        opt.step()
        for i, p in enumerate(params):
            torch.testing.assert_close(p.detach().cpu().double(), ref.w[i], rtol=1e-5, atol=1e-6)
            state = opt.state[p]
            assert state["step"].device == p.device and state["step"].item() == step + 1
            if adapt[i]:
                assert state["trust_ratio"].item() == pytest.approx(ref.ratios[i], rel=1e-5)


def test_half_precision_parameters_follow_the_reference():
    for dtype in (torch.bfloat16, torch.float16):
        params = make_params(dtype=dtype)
        adapt = [len(s) > 1 for s in SHAPES]
        lars_ref = ReferenceLARS(params, adapt, lr=1.0, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.01)
        opt = LARS(params, lr=1.0, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.01, fused=True)
        for step in range(3):
            grads = [g.to(dtype).float() for g in gradients(step)]
            lars_ref.step(grads)
            give(params, grads)
            opt.step()
        tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
        for i, p in enumerate(params):
            torch.testing.assert_close(p.detach().cpu().double(), lars_ref.w[i], rtol=tol, atol=tol)
            assert p.dtype == dtype and opt.state[p]["momentum_buffer"].dtype == dtype


@pytest.mark.parametrize("kind", ["lars", "lamb"])
def test_a_non_finite_gradient_gives_nan_in_its_layer_only(kind):
    params = make_params()
    opt = (LARS(params, lr=1.0, weight_decay=1e-4, fused=True) if kind == "lars"
           else LAMB(params, lr=1e-2, fused=True))
    grads = gradients(0)
    grads[0][0, 0] = math.nan
    give(params, grads)
    opt.step()
    assert torch.isnan(opt.state[params[0]]["trust_ratio"]).item()
    assert torch.isnan(params[0]).all()
    assert torch.isfinite(params[5]).all() and torch.isfinite(opt.state[params[5]]["trust_ratio"]).item()


def test_tables_are_reused_while_addresses_stay_and_rebuilt_when_they_move():
    fused._tables.clear()
    params = make_params()
    opt = LARS(params, lr=1.0, momentum=0.9, fused=True)
    grads = [g.to(DEVICE) for g in gradients(0)]
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()  # the first step makes the momentum buffers: a table with them
    opt.step()
    opt.step()
    assert len(fused._tables) == 2  # first step (new buffers), then one table for every later step
    give(params, gradients(1))  # new gradient tensors: new addresses
    opt.step()
    assert len(fused._tables) == 3


def test_lamb_checkpoint_moves_between_the_fused_and_unfused_paths():
    params = make_params()
    adapt = [len(s) > 1 for s in SHAPES]
    ref = ReferenceLAMB(params, adapt, lr=1e-2)
    opt = LAMB(params, lr=1e-2, fused=True)
    for step in range(2):
        ref.step(gradients(step))
        give(params, gradients(step))
        opt.step()
    saved = weights_only_round_trip(opt.state_dict())
    unfused = LAMB(params, lr=1e-2, fused=False, foreach=True)
    unfused.load_state_dict(saved)
    for step in range(2, 4):
        ref.step(gradients(step))
        give(params, gradients(step))
        unfused.step()
    for i, p in enumerate(params):
        torch.testing.assert_close(p.detach().cpu().double(), ref.w[i], rtol=1e-5, atol=1e-6)
    assert unfused.state[params[0]]["step"].device.type == "cpu"


def test_the_monitor_records_the_norms_the_fused_step_took():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 40), nn.LayerNorm(40), nn.Linear(40, 3)).to(DEVICE)
    opt = LARS(model.parameters(), lr=2.0, weight_decay=1e-4, trust_coefficient=2e-3, fused=True)
    monitor = TrustRatioMonitor(model, opt, every_n_steps=1)
    model(torch.randn(8, 12, device=DEVICE)).pow(2).mean().backward()
    w = {n: p.detach().norm().item() for n, p in model.named_parameters()}
    g = {n: p.grad.norm().item() for n, p in model.named_parameters()}
    opt.step()
    for name in ("0.weight", "2.weight"):
        assert monitor.latest[f"weight_norm/{name}"] == pytest.approx(w[name], rel=1e-5)
        assert monitor.latest[f"grad_norm/{name}"] == pytest.approx(g[name], rel=1e-5)
        expected = 2e-3 * w[name] / (g[name] + 1e-4 * w[name] + 1e-8)
        assert monitor.latest[f"trust_ratio/{name}"] == pytest.approx(expected, rel=1e-5)


def test_unsupported_fused_setups_are_refused_before_any_update():
    double = [nn.Parameter(torch.randn(3, 3, dtype=torch.float64, device=DEVICE))]
    with pytest.raises(ValueError, match="fused=True.*float64"):
        LARS(double, fused=True)
    with pytest.raises(ValueError, match="fused=True and foreach=True"):
        LAMB(make_params(), fused=True, foreach=True)
    params = make_params()
    opt = LARS(params, fused=True)
    give(params, gradients(0))
    params[0].grad = params[0].grad.t().contiguous().t()  # another memory layout than its parameter
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="fused=True.*memory layout"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params))
