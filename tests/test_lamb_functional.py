"""lars_plugins.functional.lamb against Algorithm 2 of the LAMB paper written here in float64, and
against timm's Lamb where the two agree (every tensor adapted, weight decay inside u, no clipping)."""

from __future__ import annotations

import math

import pytest
import torch

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


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("tensor_step", [False, True])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_matches_algorithm_2(cfg, foreach, tensor_step):
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
        lamb(params, grads, m, v, ratios, adapt, step=step, **kwargs)
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
        lamb(ours, grads, m, v, ratios, [True] * len(ours), step=t, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6,
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
    lamb([w], [g], [m], [v], [ratio], [True], step=1, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    # First step with bias correction: u = g/(|g| + ε) ≈ sign(g); ratio 1 since ‖w‖ = 0.
    torch.testing.assert_close(w, -0.1 * torch.sign(g), atol=1e-6, rtol=0)
    assert ratio.item() == 1.0 and torch.equal(g, g_before)
