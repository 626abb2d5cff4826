"""AdamW's direction on the CPU, from torch's fused kernel on a scratch buffer (lars_plugins.cpu_directions)
or from Numba's one-pass loops (lars_plugins.cpu_kernels), against AdamW's rule written here in float64."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from lars_plugins import LAMB, Layerwise, cpu_directions, cpu_kernels
from lars_plugins.functional import lamb

BETAS, EPS = (0.9, 0.999), 1e-6
ROUTES = ["torch kernels", "numba"]


def use_route(route, monkeypatch):
    """Take ``route`` ("numba" is skipped where Numba is not installed); returns whether it is Numba's."""
    if route == "numba":
        pytest.importorskip("numba")
        assert cpu_kernels.available(torch.float32)
        return True
    monkeypatch.setattr(cpu_kernels, "enabled", False)
    return False


def reference_direction(w, g, m, v, t, weight_decay, max_v=None, maximize=False):
    """AdamW's direction at step t in float64: d = m̂/(√v̂+ε) + wd·w, from the moments before the step."""
    w, g, m, v = (x.double() for x in (w, g, m, v))
    g = -g if maximize else g
    m = BETAS[0] * m + (1 - BETAS[0]) * g
    v = BETAS[1] * v + (1 - BETAS[1]) * g * g
    if max_v is not None:
        v = torch.maximum(max_v.double(), v)
    return m / (1 - BETAS[0] ** t) / ((v / (1 - BETAS[1] ** t)).sqrt() + EPS) + weight_decay * w


def state(shape, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    w, g, m = (torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3))
    v = torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype) * 1e-2
    return w, g, m * 1e-2, v


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "amsgrad", "maximize", "float64"])
def test_the_direction_and_its_norms_match_adamw(layout, weight_decay):
    dtype = torch.float64 if layout == "float64" else torch.float32
    shape = (16, 8, 5, 3)
    w, g, m, v = state(shape, 0, dtype)
    if layout == "channels_last":
        w, g, m, v = (x.contiguous(memory_format=torch.channels_last) for x in (w, g, m, v))
    max_v = v * 1.5 if layout == "amsgrad" else None
    maximize = layout == "maximize"
    expected = reference_direction(w, g, m, v, 3, weight_decay, max_v, maximize)
    expected_max_v = None if max_v is None else torch.maximum(max_v.double(), BETAS[1] * v.double()
                                                              + (1 - BETAS[1]) * g.double() ** 2)
    w0 = w.double().clone()  # (a float64 w would otherwise be w0 itself)
    # the kernel writes where an earlier tensor's finite leftovers are (the ring wraps: w is all it serves)
    scratch = cpu_directions.Scratch()
    leftovers = scratch.like(w)
    leftovers.copy_(torch.randn(shape, dtype=dtype) * 1e3)
    d = cpu_directions.adamw_direction(w, g, m, v, max_v, torch.tensor(3.0), scratch, beta1=BETAS[0],
                                       beta2=BETAS[1], eps=EPS, weight_decay=weight_decay, maximize=maximize)
    assert d.s.data_ptr() == leftovers.data_ptr() and d.s.stride() == w.stride()
    if max_v is not None:  # the running maximum is kept
        torch.testing.assert_close(max_v.double(), expected_max_v, rtol=1e-6, atol=0)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert torch.equal(w.double(), w0)  # w is not changed until applied
    assert d.w_norm == pytest.approx(w0.norm().item(), rel=tol)
    assert d.d_norm == pytest.approx(expected.norm().item(), rel=tol)
    d.apply(0.3)
    torch.testing.assert_close(w.double(), w0 - 0.3 * expected, rtol=tol, atol=tol)
    assert w.stride() == w0.stride() or layout != "channels_last"


def test_where_the_expansion_would_cancel_the_norm_comes_from_d_itself():
    """d = m̂/(√v̂+ε) + wd·w with both terms nearly opposite: ‖d‖² from ‖s‖², ⟨s, w⟩ and ‖w‖² in
    float32 would lose most of its digits, so the step forms d and takes its norm."""
    n, weight_decay, t = 200_000, 0.5, 1
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(n, generator=gen)
    zeros = torch.zeros(n)
    direction = reference_direction(zeros, g, zeros, zeros, t, 0.0)  # m̂/(√v̂+ε) at step 1
    w = (-(1 - 0.05) * direction / weight_decay).float()  # d is 5% of either term
    expected = reference_direction(w, g, zeros, zeros, t, weight_decay)
    d = cpu_directions.adamw_direction(w, g, torch.zeros(n), torch.zeros(n), None, torch.tensor(float(t)),
                                       cpu_directions.Scratch(), beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                                       weight_decay=weight_decay, maximize=False)
    assert d.decay == 0.0  # d formed in place: s = −d
    assert d.d_norm == pytest.approx(expected.norm().item(), rel=2e-4)  # float32 dot products over 200K terms
    torch.testing.assert_close(-d.s.double(), expected, rtol=0, atol=1e-6)
    # what the expansion would have given, for contrast
    s_terms = (d.s + weight_decay * w)  # −m̂/(√v̂+ε), up to rounding
    expanded = (torch.dot(s_terms, s_terms).item() - 2 * weight_decay * torch.dot(s_terms, w).item()
                + weight_decay ** 2 * torch.dot(w, w).item())
    assert abs(math.sqrt(max(expanded, 0.0)) - expected.norm().item()) > 10 * abs(d.d_norm - expected.norm().item())


@pytest.mark.parametrize("route", ROUTES)
def test_a_non_finite_gradient_reaches_only_its_own_tensor(route, monkeypatch):
    """The scratch buffer is shared from tensor to tensor, and torch's kernel's ``0·s`` would carry an
    inf left there into the next tensor: it is zeroed after a non-finite direction. Numba's loop
    overwrites the buffer; its sums must still show the non-finite value (no fastmath that assumes
    finite numbers)."""
    use_route(route, monkeypatch)
    shapes = [(64, 32), (32, 32)]
    params = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    grads = [torch.randn_like(p) for p in params]
    grads[0][3, 4] = math.inf
    expected = reference_direction(params[1], grads[1], torch.zeros_like(params[1]), torch.zeros_like(params[1]), 1,
                                   0.01)
    w1 = params[1].double()
    ratios = [torch.zeros(()) for _ in params]
    lamb(params, grads, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params], ratios,
         excluded=[False, False], step=torch.tensor(1.0), lr=0.1, beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
         weight_decay=0.01)
    assert torch.isnan(ratios[0]) and not torch.isfinite(params[0]).all()
    ratio = w1.norm() / expected.norm()
    assert ratios[1].item() == pytest.approx(ratio.item(), rel=1e-5)
    torch.testing.assert_close(params[1].double(), w1 - 0.1 * ratio * expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_this_torch_has_the_kernels_the_route_relies_on(dtype):
    assert cpu_directions.supported(dtype)


def test_the_scratch_ring_hands_out_views_that_were_not_just_used():
    """Views advance through the buffer (aligned to 64 bytes) and wrap; the buffer holds the largest
    tensor plus the reuse distance, or all the tensors where that is less."""
    tensors = [torch.empty(n) for n in (100, 30, 250, 7)]
    scratch = cpu_directions.Scratch(reuse_distance=100 * 4)
    scratch.reserve(tensors)
    base = scratch.like(torch.empty(1)).data_ptr()  # the buffer's start
    starts = [(scratch.like(t).data_ptr() - base) // 4 for t in tensors * 2]
    # 250 + 100 = 350 elements (less than all four: 112 + 32 + 256 + 16); after the 1-element view at 0,
    # 100 at 16, 30 at 128; 250 would end at 410 > 350, so it wraps to 0; 7 at 256; 100 would end past 350: 0
    assert starts == [16, 128, 0, 256, 0, 112, 0, 256]
    small = cpu_directions.Scratch()
    small.reserve(tensors)
    assert small.like(torch.empty(250)).untyped_storage().nbytes() == 4 * (112 + 32 + 256 + 16)  # all of them
    channels_last = torch.empty(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    assert small.like(channels_last).stride() == channels_last.stride()


@pytest.mark.parametrize("make", [lambda ps: LAMB(ps, lr=1e-2, weight_decay=0.01),
                                  lambda ps: Layerwise(torch.optim.AdamW(ps, lr=1e-2), trust_coefficient=1.0)],
                         ids=["LAMB", "Layerwise(AdamW)"])
@pytest.mark.parametrize("route", ROUTES)
def test_the_scratch_is_kept_between_steps_but_is_neither_state_nor_copied(make, route, monkeypatch):
    """torch's kernels write into the scratch (both tensors: less than the largest plus 32 MiB);
    Numba's loops into one buffer of the largest tensor and 64 elements to align it."""
    numba_route = use_route(route, monkeypatch)
    params = [nn.Parameter(torch.randn(64, 48, generator=torch.Generator().manual_seed(i))) for i in range(2)]
    opt = make(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    scratch = opt.__dict__["_scratch"]
    assert scratch.nbytes == ((64 * 48 + 64) * 4 if numba_route else 2 * 64 * 48 * 4)
    opt.step()
    assert opt.__dict__["_scratch"] is scratch
    assert set(opt.state_dict()) == {"state", "param_groups"}
    twin = copy.deepcopy({"params": params, "opt": opt})
    assert "_scratch" not in twin["opt"].__dict__
    for p, q in zip(params, twin["params"]):
        q.grad = p.grad.clone()
    opt.step()
    twin["opt"].step()  # makes its own
    for p, q in zip(params, twin["params"]):
        assert torch.equal(p, q)


# --- Numba's loops over a group of tensors (lars_plugins.cpu_kernels) --------------------------------------


@pytest.fixture
def numba():
    return pytest.importorskip("numba")


@pytest.fixture
def rechecked(numba):
    """:func:`cpu_kernels.available` decides afresh (its once-per-dtype check forgotten) in the test
    and again after it."""
    cpu_kernels._checked.cache_clear()
    yield
    cpu_kernels._checked.cache_clear()


def lamb_reference_ratio(w_norm, d_norm, bounds, clip):
    """LAMB's ratio written out: φ(‖w‖)/‖d‖, 1 where either norm is 0, at most 1 where clipped."""
    phi = min(max(w_norm, bounds[0]), bounds[1]) if bounds else w_norm
    ratio = phi / d_norm if w_norm > 0 and d_norm > 0 else 1.0
    return min(ratio, 1.0) if clip else ratio


def trust_reference_ratio(w_norm, d_norm, coefficient, eps, lr, clip):
    """LARS's ratio without decay written out: η‖w‖/(‖d‖+ε), η where ‖w‖ is 0, clipped as r/lr ≤ 1."""
    ratio = coefficient * w_norm / (d_norm + eps) if w_norm > 0 else coefficient
    return min(ratio / lr, 1.0) if clip else ratio


LR = 0.3
RULES = {  # the rule as the loops take it, the same rule written out in the test
    "LAMB": (cpu_kernels.LambRatio(None, False), lambda w, d: lamb_reference_ratio(w, d, None, False)),
    "LAMB bounded, clipped": (cpu_kernels.LambRatio((0.5, 20.0), True),
                              lambda w, d: lamb_reference_ratio(w, d, (0.5, 20.0), True)),
    "trust ratio": (cpu_kernels.TrustRatio(0.02, 0.0, 1e-8, LR, False),
                    lambda w, d: trust_reference_ratio(w, d, 0.02, 1e-8, LR, False)),
    "trust ratio, clipped": (cpu_kernels.TrustRatio(2.0, 0.0, 1e-8, LR, True),
                             lambda w, d: trust_reference_ratio(w, d, 2.0, 1e-8, LR, True)),
}


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("scratch_limit", [cpu_kernels.SCRATCH_LIMIT, 100], ids=["buffer", "d twice"])
@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "amsgrad", "maximize", "float64"])
def test_the_batch_matches_adamw_with_a_ratio_tensor_by_tensor(layout, weight_decay, bias_correction, scratch_limit,
                                                                rule, numba):
    """Three tensors of different shapes and step counts in one call: the moments, both norms, the
    ratio and the update of each, against AdamW's rule and the ratio written here in float64; with
    ``scratch_limit=100`` the two large tensors compute ``d`` twice, the small one through the buffer."""
    dtype = torch.float64 if layout == "float64" else torch.float32
    shapes, steps = [(16, 8, 5, 3), (7,), (33, 65)], [3.0, 1.0, 10.0]
    states = [state(shape, seed, dtype) for seed, shape in enumerate(shapes)]
    if layout == "channels_last":
        states = [tuple(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in s)
                  for s in states]
    w, g, m, v = (list(x) for x in zip(*states))
    max_v = [x * 1.5 for x in v] if layout == "amsgrad" else None
    maximize = layout == "maximize"

    def expected(i):
        gi = -g[i].double() if maximize else g[i].double()
        mi = BETAS[0] * m[i].double() + (1 - BETAS[0]) * gi
        vi = BETAS[1] * v[i].double() + (1 - BETAS[1]) * gi * gi
        if max_v is not None:
            vi = torch.maximum(max_v[i].double(), vi)
        t = steps[i]
        c1, c2 = (1 - BETAS[0] ** t, 1 - BETAS[1] ** t) if bias_correction else (1.0, 1.0)
        return mi, (mi / c1) / ((vi / c2).sqrt() + EPS) + weight_decay * w[i].double()

    expected_m, expected_d = zip(*[expected(i) for i in range(3)])
    w0 = [x.double().clone() for x in w]
    ratio, reference = RULES[rule]
    batch = cpu_kernels.AdamWBatch(w, g, m, v, max_v, steps, beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                                   weight_decay=weight_decay, maximize=maximize, bias_correction=bias_correction,
                                   scratch_limit=scratch_limit)
    scratch = cpu_directions.Scratch()
    stepped = batch.step(LR, ratio, scratch)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert scratch.nbytes == dtype.itemsize * (64 + (7 if scratch_limit == 100 else 33 * 65))
    for i in range(3):
        torch.testing.assert_close(m[i].double(), expected_m[i], rtol=tol, atol=tol)
        w_norm, d_norm = w0[i].norm().item(), expected_d[i].norm().item()
        r = reference(w_norm, d_norm)
        assert stepped[i] == pytest.approx((w_norm, d_norm, r), rel=tol)
        torch.testing.assert_close(w[i].double(), w0[i] - LR * r * expected_d[i], rtol=tol, atol=tol)
    assert w[0].stride() == states[0][0].stride()


@pytest.mark.parametrize("rule", list(RULES))
def test_zero_and_non_finite_norms_take_the_same_ratio_as_the_python_rule(rule, numba):
    """A zero tensor (‖w‖ = 0), a zero direction (‖d‖ = 0 where g, m and wd are 0) and a NaN
    gradient: the loops' ratios are those of the rule the other routes call, and the written-out
    one's where the norms are finite; a NaN reaches only its own tensor."""
    ratio, reference = RULES[rule]
    w, g, m, v = (list(x) for x in zip(*[state((6, 5), seed) for seed in range(3)]))
    w[0].zero_()
    g[1].zero_()
    m[1].zero_()
    g[2][1, 1] = math.nan
    w0 = [x.clone() for x in w]
    stepped = cpu_kernels.AdamWBatch(w, g, m, v, None, [2.0] * 3, beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                                     weight_decay=0.0, maximize=False).step(LR, ratio, cpu_directions.Scratch())
    assert stepped[0][0] == 0.0 and stepped[1][1] == 0.0 and math.isnan(stepped[2][1])
    for w_norm, d_norm, r in stepped:
        assert r == ratio(w_norm, d_norm) or (math.isnan(r) and math.isnan(ratio(w_norm, d_norm)))
    assert stepped[0][2] == reference(0.0, stepped[0][1]) and stepped[1][2] == reference(stepped[1][0], 0.0)
    assert torch.equal(w[1], w0[1])  # d = 0: nothing moves
    assert torch.isnan(w[2]).all() and not torch.isnan(w[0]).any()


def test_amsgrads_maximum_keeps_a_nan_as_torch_does(numba):
    """torch.maximum propagates NaN; a max written as a comparison would drop it from the state."""
    w, g, m, v = state((4, 4), 0)
    g[1, 2] = math.nan
    max_v = v.clone()
    max_v[3, 3] = math.nan  # an earlier NaN stays too
    expected = torch.maximum(max_v.double(), BETAS[1] * v.double() + (1 - BETAS[1]) * g.double() ** 2)
    stepped = cpu_kernels.AdamWBatch([w], [g], [m], [v], [max_v], [1.0], beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                                     weight_decay=0.0, maximize=False).step(LR, RULES["LAMB"][0],
                                                                            cpu_directions.Scratch())
    torch.testing.assert_close(max_v.double(), expected, rtol=1e-6, atol=0, equal_nan=True)
    assert torch.isnan(max_v).sum() == 2 and math.isnan(stepped[0][1]) and not math.isnan(stepped[0][0])


def test_only_tensors_the_loops_can_read_by_address_are_taken():
    w = torch.zeros(4, 6)
    assert cpu_kernels.takes(w, torch.zeros(4, 6), torch.zeros(4, 6), None)
    assert not cpu_kernels.takes(w, torch.zeros(4, 6, dtype=torch.float64))  # another dtype
    assert not cpu_kernels.takes(w, torch.zeros(6, 4).t())  # another layout
    assert not cpu_kernels.takes(w.t(), torch.zeros(4, 6).t())  # not dense in memory order
    assert not cpu_kernels.takes(w, torch.zeros(24))  # another shape
    assert not cpu_kernels.takes(w, torch.zeros(4, 6, device="meta"))
    assert not cpu_kernels.takes(w, torch.zeros(4, 6)._neg_view())  # a lazy negation
    assert not cpu_kernels.takes(torch.zeros(4, 6, dtype=torch.bfloat16), torch.zeros(4, 6, dtype=torch.bfloat16))
    z = torch.zeros(4, 6, dtype=torch.complex64)
    assert not cpu_kernels.takes(z, z.clone())  # a dtype the loops do not serve


def test_the_batch_writes_each_ratio_into_its_slot(numba):
    """A slot of the tensors' dtype receives its ratio inside the call, as fill_ would write it; one
    of another dtype is filled after it; a tensor without a slot is stepped all the same. Each
    ratio is LAMB's, written out here in float64 from AdamW's direction."""
    w, g, m, v = (list(x) for x in zip(*[state((6, 5), seed) for seed in range(3)]))
    expected = [lamb_reference_ratio(wi.double().norm().item(),
                                     reference_direction(wi, gi, mi, vi, 2, 0.01).norm().item(), None, False)
                for wi, gi, mi, vi in zip(w, g, m, v)]
    slots = [torch.full((), -1.0), torch.full((), -1.0, dtype=torch.float64), None]
    stepped = cpu_kernels.AdamWBatch(w, g, m, v, None, [2.0] * 3, beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                                     weight_decay=0.01, maximize=False, ratio_slots=slots).step(
        LR, RULES["LAMB"][0], cpu_directions.Scratch())
    ratios = [r for _, _, r in stepped]
    assert ratios == pytest.approx(expected, rel=2e-6) and len(set(ratios)) == 3
    assert slots[0].item() == pytest.approx(expected[0], rel=2e-6) and slots[1].item() == pytest.approx(expected[1])
    assert slots[0].item() == torch.tensor(ratios[0], dtype=torch.float32).item()  # rounded as fill_ rounds
    assert slots[1].item() == ratios[1] and slots[1].dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_counts_advance_by_one_as_foreach_add_advances_them(dtype, numba):
    """Float32 counts in one compiled call (2**24 stays 2**24 in float32, as with torch's add); a
    list holding a count of another dtype goes to torch whole; an empty list is nothing to do."""
    values = [0.0, 1.0, 41.0, 2.0 ** 24]
    counts = [torch.tensor(x, dtype=dtype) for x in values]
    expected = [c.clone() for c in counts]
    torch._foreach_add_(expected, 1.0)
    cpu_kernels.advance_counts(counts)
    assert [c.item() for c in counts] == [c.item() for c in expected]
    assert counts[-1].item() == (2.0 ** 24 if dtype == torch.float32 else 2.0 ** 24 + 1)
    mixed = [torch.tensor(1.0), torch.tensor(1.0, dtype=torch.float64)]
    cpu_kernels.advance_counts(mixed)
    assert [c.item() for c in mixed] == [2.0, 2.0]
    cpu_kernels.advance_counts([])


def test_numba_is_imported_only_when_a_cpu_step_needs_it():
    code = ("import sys, torch, lars_plugins; assert 'numba' not in sys.modules; "
            "opt = lars_plugins.LARS([torch.nn.Parameter(torch.ones(4, 4))], lr=0.1); "
            "opt.param_groups[0]['params'][0].grad = torch.ones(4, 4); opt.step(); "
            "assert 'numba' not in sys.modules, 'LARS imported numba'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_slow_threading_layer_is_refused_with_a_warning(rechecked, monkeypatch, numba):
    monkeypatch.setattr(numba, "threading_layer", lambda: "workqueue")
    with pytest.warns(RuntimeWarning, match="threading layer here is 'workqueue'"):
        assert not cpu_kernels.available(torch.float32)
    batches = []
    monkeypatch.setattr(cpu_kernels, "AdamWBatch", lambda *a, **k: batches.append(1))
    params = [torch.randn(8, 8)]
    lamb(params, [torch.randn(8, 8)], [torch.zeros(8, 8)], [torch.zeros(8, 8)], [torch.zeros(())], excluded=[False],
         step=torch.tensor(1.0), lr=0.1, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=0.01)
    assert not batches  # torch's kernels served


def test_loops_that_disagree_with_torch_are_refused_with_a_warning(rechecked, monkeypatch):
    loops = cpu_kernels._loops()
    real = loops.step_table

    def off_by_a_little(*args):  # every update 0.1% too large
        real(*args[:14], args[14] * 1.001, *args[15:])

    monkeypatch.setattr(loops, "step_table", off_by_a_little)
    with pytest.warns(RuntimeWarning, match="disagree with torch's arithmetic"):
        assert not cpu_kernels.available(torch.float64)


def test_bfloat16_and_a_switched_off_module_take_torchs_kernels(monkeypatch, numba):
    assert cpu_kernels.available(torch.float32) and not cpu_kernels.available(torch.bfloat16)
    monkeypatch.setattr(cpu_kernels, "enabled", False)
    assert not cpu_kernels.available(torch.float32)


def test_the_loops_run_on_as_many_threads_as_torch(numba):
    threads = torch.get_num_threads()
    w, g, m, v = state((64, 64), 0)
    try:
        for wanted in (1, 2):
            torch.set_num_threads(wanted)
            cpu_kernels.AdamWBatch([w], [g], [m], [v], None, [1.0], beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                                   weight_decay=0.0, maximize=False).step(LR, RULES["LAMB"][0],
                                                                          cpu_directions.Scratch())
            assert numba.get_num_threads() == min(wanted, numba.config.NUMBA_NUM_THREADS)
    finally:
        torch.set_num_threads(threads)


def float64_run(name, model, x, y, steps):
    """``steps`` steps of a float64 copy of ``model`` by the rules written out: LAMB's Algorithm 2
    (test_lamb's reference), or torch's AdamW followed by the wrapper's documented rescaling of each
    matrix's update Δ to r·Δ, r = ‖w‖/(‖Δ‖/lr + 1e-8) at η = 1."""
    from test_lamb import ReferenceLAMB

    net = copy.deepcopy(model).double()
    params = list(net.parameters())
    adapted = [p.ndim > 1 for p in params]
    lr = 1e-2
    if name == "LAMB":
        rule = ReferenceLAMB(params, adapted, lr=lr, weight_decay=0.01)
    else:
        base = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, amsgrad=True)
    for _ in range(steps):
        net.zero_grad()
        nn.functional.cross_entropy(net(x.double()), y).backward()
        with torch.no_grad():
            if name == "LAMB":
                rule.step([p.grad for p in params])
                for p, w in zip(params, rule.w):
                    p.copy_(w)
                continue
            old = [p.detach().clone() for p in params]
            base.step()
            for p, w, adapt in zip(params, old, adapted):
                if adapt:
                    delta = p - w
                    p.copy_(w + w.norm() / (delta.norm() / lr + 1e-8) * delta)
    return params


@pytest.mark.parametrize("name", ["LAMB", "Layerwise(AdamW amsgrad)"])
def test_both_routes_train_alike(name, monkeypatch, numba):
    """Ten steps of a small float32 model through Numba's loops and through torch's kernels agree
    with each other to float32 rounding, state included, and both follow the float64 rules written
    out in float64_run."""
    def make(ps):
        if name == "LAMB":
            return LAMB(ps, lr=1e-2, weight_decay=0.01)
        return Layerwise(torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01, amsgrad=True), trust_coefficient=1.0)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    twin = copy.deepcopy(model)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    expected = float64_run(name, model, x, y, steps=10)
    assert cpu_kernels.available(torch.float32)  # (its once-per-dtype check builds batches of its own)
    batches = []
    real = cpu_kernels.AdamWBatch
    monkeypatch.setattr(cpu_kernels, "AdamWBatch", lambda *a, **k: batches.append(1) or real(*a, **k))
    opts = []
    for net, numba_on in ((model, True), (twin, False)):
        monkeypatch.setattr(cpu_kernels, "enabled", numba_on)
        opts.append(make(net.parameters()))
        for _ in range(10):
            opts[-1].zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opts[-1].step()
    assert len(batches) == 10  # the first model's steps took the loops, the twin's did not
    for a, b, c in zip(model.parameters(), twin.parameters(), expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.double(), c, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.double(), c, rtol=1e-4, atol=1e-5)
        for key, value in opts[0].state[a].items():
            torch.testing.assert_close(value, opts[1].state[b][key], rtol=1e-4, atol=1e-6)


def test_a_process_forked_after_the_loops_ran_takes_torchs_kernels(tmp_path, numba):
    """GNU OpenMP's threads do not survive fork, and Numba ends a child that starts a parallel loop
    its parent already ran: such a child steps through torch's kernels (and lives). The child runs
    torch on one thread, as DataLoader workers do: torch's own OpenMP would hang there otherwise."""
    script = tmp_path / "fork.py"
    script.write_text(
        "import multiprocessing as mp, torch, lars_plugins\n"
        "from lars_plugins import cpu_kernels\n"
        "def step(seed, threads):\n"
        "    torch.set_num_threads(threads)  # (a forked child must, as DataLoader workers do: torch's OpenMP)\n"
        "    p = torch.nn.Parameter(torch.randn(64, 64, generator=torch.Generator().manual_seed(seed)))\n"
        "    p.grad = torch.ones(64, 64)\n"
        "    lars_plugins.LAMB([p], lr=0.1).step()\n"
        "    return cpu_kernels.available(torch.float32), p.detach()\n"
        "if __name__ == '__main__':\n"
        "    parent_route, parent = step(0, torch.get_num_threads())\n"
        "    with mp.get_context('fork').Pool(1) as pool:\n"
        "        child_route, child = pool.apply(step, (0, 1))\n"
        "    assert parent_route and not child_route, (parent_route, child_route)\n"
        "    torch.testing.assert_close(child, parent, rtol=1e-6, atol=1e-7)\n"
        "    print('ok')\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_without_a_writable_cache_the_loops_compile_in_each_process(monkeypatch, numba):
    import importlib

    from lars_plugins import _numba_loops

    njit = numba.njit

    def no_cache(*args, cache=False, **kwargs):
        if cache:
            raise RuntimeError("cannot cache function: no locator available")
        return njit(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", no_cache)
    try:
        importlib.reload(_numba_loops)
        w, g, m, v = state((8, 8), 0)
        stepped = cpu_kernels.AdamWBatch([w], [g], [m], [v], None, [2.0], beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                                         weight_decay=0.1, maximize=False).step(LR, RULES["LAMB"][0],
                                                                                cpu_directions.Scratch())
        assert stepped[0][1] == pytest.approx(reference_direction(*state((8, 8), 0), 2, 0.1).norm().item(), rel=1e-5)
    finally:
        monkeypatch.undo()
        importlib.reload(_numba_loops)


def test_other_python_threads_run_while_the_loops_do(numba):
    """A step's loops do not hold the GIL (they touch no Python object; Numba's parallel loops let go
    of it and ``nogil`` covers the walk over the table): a Python thread stamping the time meanwhile
    gets many stamps in while one long call runs. Loops holding it would give none (checked)."""
    import threading
    import time

    w, g, m, v = state((2048, 2048), 0)
    batch = cpu_kernels.AdamWBatch([w], [g], [m], [v], None, [1.0], beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                                   weight_decay=0.0, maximize=False)
    scratch = cpu_directions.Scratch()
    batch.step(1e-9, RULES["LAMB"][0], scratch)  # compiled and warm
    stamps, running = [], threading.Event()

    def stamp():
        running.set()
        while running.is_set():
            stamps.append(time.perf_counter())

    repeat = 100  # the same tensor 100 times in one call: long enough to see
    args = (np.repeat(batch._table, repeat, axis=0), np.repeat(batch._sizes, repeat), batch._like,
            scratch.flat(torch.float32, batch.scratch_elements).numpy(), *batch._constants,
            np.repeat(batch._corrections1, repeat), np.repeat(batch._root_corrections2, repeat), batch._eps,
            batch._weight_decay, False, False, cpu_kernels.SCRATCH_LIMIT, 1e-9, *RULES["LAMB"][0]._compiled(),
            np.empty(repeat, dtype=np.float32), np.empty((repeat, 3)))
    thread = threading.Thread(target=stamp)
    thread.start()
    running.wait()
    start = time.perf_counter()
    cpu_kernels._loops().step_table(*args)
    end = time.perf_counter()
    running.clear()
    thread.join()
    inside = [s for s in stamps if start + 0.1 * (end - start) < s < end - 0.1 * (end - start)]
    assert end - start > 0.05 and len(inside) > 1000, (end - start, len(inside))
