"""Narrow optimizer state (``state_precision``): the rounding, the 8-bit codes, and LARS and LAMB
stepping, saving and converting with them, against expectations written here (float64 arithmetic,
bfloat16 neighbours found by hand, the float32 optimizers)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from lars_plugins import LAMB, LARS
from lars_plugins.state_precision import (INT8_BLOCK, INT8_MIN_NUMEL, decode_int8, encode_int8, int8_blocks,
                                          stochastic_bfloat16)

OPTIMIZERS = {"LARS": lambda params, **kw: LARS(params, lr=0.5, momentum=0.9, weight_decay=1e-4, **kw),
              "LAMB": lambda params, **kw: LAMB(params, lr=1e-2, weight_decay=1e-2, **kw)}


def bf16_neighbours(x: float) -> tuple[float, float]:
    """The two bfloat16 values around ``x`` (> 0), by walking bfloat16's grid in float64."""
    exponent = math.floor(math.log2(x))
    spacing = 2.0 ** (exponent - 7)  # 8 significant bits
    low = math.floor(x / spacing) * spacing
    return low, low + spacing


# --- the rounding -----------------------------------------------------------------------------

@pytest.mark.parametrize("x", [1.0 + 1e-3, 3.14159, 0.1, 1e-20, 7e30])
def test_stochastic_bfloat16_lands_on_a_neighbour_and_is_unbiased(x):
    low, high = bf16_neighbours(x)
    values = torch.full((200_000,), x, dtype=torch.float32)
    rounded = stochastic_bfloat16(values, torch.Generator().manual_seed(1)).double()
    assert set(rounded.unique().tolist()) <= {low, high}
    x32 = float(torch.tensor(x, dtype=torch.float32))  # what was rounded
    share_up = (x32 - low) / (high - low)
    assert rounded.eq(high).double().mean().item() == pytest.approx(share_up, abs=0.005)
    assert abs(rounded.mean().item() - x32) <= 0.005 * (high - low)  # 4.5 standard errors
    negative = stochastic_bfloat16(-values[:1000], torch.Generator().manual_seed(1)).double()
    assert set(negative.unique().tolist()) <= {-low, -high}


def test_stochastic_bfloat16_keeps_infinities_nan_and_exact_values():
    x = torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0, 1.5, 2.0 ** -130])
    out = stochastic_bfloat16(x, torch.Generator().manual_seed(0))
    assert out[0].item() == math.inf and out[1].item() == -math.inf and math.isnan(out[2].item())
    assert out[3:6].tolist() == [0.0, -0.0, 1.5]


def test_nearest_rounding_freezes_adams_second_moment_and_stochastic_rounding_does_not():
    """The reason for stochastic rounding: v ← 0.999·v moves v by less than half a bfloat16 step."""
    v_nearest = torch.ones(20_000, dtype=torch.bfloat16)
    v_stochastic = torch.ones(20_000, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    for _ in range(1000):
        v_nearest = (v_nearest.float() * 0.999).to(torch.bfloat16)
        v_stochastic = stochastic_bfloat16(v_stochastic.float() * 0.999, generator)
    assert v_nearest.float().unique().tolist() == [1.0]
    assert v_stochastic.double().mean().item() == pytest.approx(0.999 ** 1000, rel=0.01)


# --- the 8-bit codes --------------------------------------------------------------------------

def roundtrip(x: torch.Tensor, wide_range: bool = False) -> torch.Tensor:
    """Encode and decode; 1-D ``x`` as one row."""
    x = x.reshape(1, -1) if x.ndim == 1 else x
    codes = torch.empty(x.shape, dtype=torch.uint8)
    absmax = torch.empty(int8_blocks(x.shape))
    encode_int8(x, codes, absmax, wide_range=wide_range)
    return decode_int8(codes, absmax, wide_range=wide_range)


def test_linear_int8_code_is_within_half_a_step_of_its_blocks_absmax():
    x = torch.randn(5 * INT8_BLOCK + 3, dtype=torch.float64).float()
    got = roundtrip(x).double().reshape(-1)
    blocks = x.double().split(INT8_BLOCK)
    bound = torch.cat([torch.full((len(b),), b.abs().max().item() / 254) for b in blocks])
    assert ((got - x.double()).abs() <= bound * (1 + 1e-6)).all()
    assert torch.equal(got.abs().max(), x.abs().max().double())  # the absmax itself is exact


def test_wide_range_code_keeps_relative_precision_across_decades_within_a_block():
    # One block: its largest element and others down to 10^4 times smaller (√v of a quiet feature).
    magnitudes = torch.logspace(0, -4, INT8_BLOCK, dtype=torch.float64)
    x = magnitudes.float()
    got = roundtrip(x, wide_range=True).double().reshape(-1)
    relative = ((got - x.double()) / x.double()).abs()
    assert relative.max().item() <= 2 ** -4 + 1e-6  # E4M3 to nearest: half of a 2^-3 step
    # The linear code with the same block rounds everything below absmax/254 to zero.
    linear = roundtrip(x).double().reshape(-1)
    assert (linear[x < 1 / 254 * 0.99] == 0).all() and (x < 1 / 254 * 0.99).sum() > 100


@pytest.mark.parametrize("wide_range", [False, True])
def test_int8_blocks_are_independent_and_the_partial_last_block_counts(wide_range):
    n = 3 * INT8_BLOCK + 17
    x = torch.randn(n).abs()
    base = roundtrip(x, wide_range).reshape(-1)
    y = x.clone()
    y[INT8_BLOCK:2 * INT8_BLOCK] *= 1e6  # only the second block's scale changes
    got = roundtrip(y, wide_range).reshape(-1)
    assert torch.equal(got[:INT8_BLOCK], base[:INT8_BLOCK])
    assert torch.equal(got[2 * INT8_BLOCK:], base[2 * INT8_BLOCK:])
    assert int8_blocks((1, n)) == (1, 4)
    tail = torch.zeros(n)
    tail[-1] = 3.0
    assert roundtrip(tail, wide_range).reshape(-1)[-1].item() == 3.0
    assert roundtrip(tail, wide_range).reshape(-1)[:-1].abs().max().item() == 0.0


@pytest.mark.parametrize("wide_range", [False, True])
def test_int8_blocks_lie_within_rows(wide_range):
    """A row's blocks never reach into the next row: rows sharded apart (FSDP2) keep their blocks."""
    x = torch.rand(6, 3, 100) + 0.5  # rows of 300 elements: a block of 256 and one of 44
    assert int8_blocks(x.shape) == (6, 2)
    whole = roundtrip(x, wide_range)
    halves = torch.cat([roundtrip(x[:3], wide_range), roundtrip(x[3:], wide_range)])
    assert torch.equal(whole, halves)
    y = x.clone()
    y[2] *= 1e4  # a large row changes its own scales only
    assert torch.equal(roundtrip(y, wide_range)[3:], whole[3:])


# --- the optimizers ---------------------------------------------------------------------------

def model_and_batches(seed: int = 0) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 80), nn.ReLU(), nn.Linear(80, 4))
    return model, [torch.randn(32, 64) for _ in range(30)]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor]) -> None:
    for x in batches:
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_first_step_is_the_float32_step_exactly(name, precision):
    """On the first step the state starts at zero, so the ratio and the update are float32's own."""
    reference, batches = model_and_batches()
    narrow = copy.deepcopy(reference)
    opt_ref = OPTIMIZERS[name](reference.parameters())
    opt = OPTIMIZERS[name](narrow.parameters(), state_precision=precision)
    train(reference, opt_ref, batches[:1])
    train(narrow, opt, batches[:1])
    for p, q in zip(reference.parameters(), narrow.parameters()):
        assert torch.equal(p, q)
        if "trust_ratio" in opt_ref.state[p]:
            assert torch.equal(opt_ref.state[p]["trust_ratio"], opt.state[q]["trust_ratio"])


def deviations(a: nn.Module, b: nn.Module, start: list[torch.Tensor]) -> list[float]:
    """‖b − a‖ / ‖a − start‖ for each weight matrix: how far two runs ended apart, per distance moved."""
    return [((q - p).norm() / (p - w0).norm()).item() for w0, p, q in zip(start, a.parameters(), b.parameters())
            if p.ndim == 2]


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("precision,factor", [("bfloat16", 2.0), ("int8", 2.5)])
def test_narrow_state_stays_within_the_float32_runs_own_sensitivity(name, precision, factor):
    """Narrow state perturbs a run; so does float32 itself when its initial weights move by 1e-4
    (relative). After 90 steps the narrow run must end no further from the float32 run than a small
    multiple of that floor (LAMB's floor is large: its trajectory amplifies tiny differences)."""
    reference, batches = model_and_batches()
    batches = batches * 3
    start = [p.detach().clone() for p in reference.parameters()]
    perturbed, narrow = copy.deepcopy(reference), copy.deepcopy(reference)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for p in perturbed.parameters():
            p.mul_(1 + 1e-4 * torch.randn(p.shape, generator=generator))
    train(reference, OPTIMIZERS[name](reference.parameters()), batches)
    train(perturbed, OPTIMIZERS[name](perturbed.parameters()), batches)
    opt = OPTIMIZERS[name](narrow.parameters(), state_precision=precision)
    train(narrow, opt, batches[:-1])
    before_last = [q.detach().double().clone() for q in narrow.parameters()]
    train(narrow, opt, batches[-1:])
    floor = deviations(reference, perturbed, start)
    got = deviations(reference, narrow, start)
    assert all(g <= factor * f for g, f in zip(got, floor)), (got, floor)
    # LARS's ratio never reads the state: it is the float32 rule's on the run's own weights.
    if name == "LARS":
        for w, q in zip(before_last, narrow.parameters()):
            if "trust_ratio" in opt.state[q]:
                w_norm, grad_norm = w.norm(), q.grad.double().norm()
                expected = 1e-3 * w_norm / (grad_norm + 1e-4 * w_norm + 1e-8)
                torch.testing.assert_close(opt.state[q]["trust_ratio"].double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_stored_bytes_per_element(name):
    model, batches = model_and_batches()
    sizes = {}
    for precision in ("float32", "bfloat16", "int8"):
        m = copy.deepcopy(model)
        opt = OPTIMIZERS[name](m.parameters(), state_precision=precision)
        train(m, opt, batches[:2])
        big = m[0].weight  # 8,192 elements: 8-bit codes
        entry = opt.state[big]
        sizes[precision] = sum(v.numel() * v.element_size() for k, v in entry.items()
                               if k not in ("step", "trust_ratio")) / big.numel()
        small = m[4].weight  # 320 elements, under INT8_MIN_NUMEL: float32 state
        assert small.numel() < INT8_MIN_NUMEL <= big.numel()
        if precision == "int8":  # small and 1-D tensors keep float32 state
            for tensor in (small, m[0].bias):
                assert all(v.dtype == torch.float32 for k, v in opt.state[tensor].items())
    per_state = {"LARS": 1, "LAMB": 2}[name]
    assert sizes["float32"] == 4 * per_state
    assert sizes["bfloat16"] == 2 * per_state
    rows, blocks = int8_blocks(big.shape)  # 128 rows of 64: one (partial) block per row
    assert (rows, blocks) == (128, 1)
    assert sizes["int8"] == pytest.approx(per_state * (1 + 4 * rows * blocks / big.numel()))


def save_and_load(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_a_resumed_run_continues_exactly(name, precision):
    model, batches = model_and_batches()
    opt = OPTIMIZERS[name](model.parameters(), state_precision=precision)
    train(model, opt, batches[:10])
    twin = copy.deepcopy(model)
    twin_opt = OPTIMIZERS[name](twin.parameters(), state_precision=precision)
    twin_opt.load_state_dict(save_and_load(opt.state_dict()))
    for key, value in opt.state[model[0].weight].items():
        if key != "trust_ratio":  # a statistic of the last step, not saved
            assert torch.equal(value, twin_opt.state[twin[0].weight][key]), key
    train(model, opt, batches[10:])
    train(twin, twin_opt, batches[10:])
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def decoded(optimizer: torch.optim.Optimizer, p: torch.Tensor, key: str) -> torch.Tensor:
    entry = optimizer.state[p]
    value = entry[key]
    if value.dtype == torch.uint8:
        squared = key == "exp_avg_sq"
        out = decode_int8(value, entry[key + "_absmax"], wide_range=squared)
        return out.square() if squared else out
    return value.double()


@pytest.mark.parametrize("source,target", [("float32", "int8"), ("int8", "float32"), ("float32", "bfloat16"),
                                           ("bfloat16", "float32"), ("bfloat16", "int8"), ("int8", "bfloat16")])
def test_a_checkpoint_converts_between_precisions(source, target):
    model, batches = model_and_batches()
    opt = LAMB(model.parameters(), state_precision=source)
    train(model, opt, batches[:5])
    loaded = LAMB(model.parameters(), state_precision=target)
    loaded.load_state_dict(save_and_load(opt.state_dict()))
    assert loaded.param_groups[0]["state_precision"] == target  # the loading optimizer's, not the checkpoint's
    w = model[0].weight
    expected_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.uint8}[target]
    for key in ("exp_avg", "exp_avg_sq"):
        assert loaded.state[w][key].dtype == expected_dtype
        before, after = decoded(opt, w, key).double(), decoded(loaded, w, key).double()
        error = (after - before).abs()
        if target == "int8" and key == "exp_avg":  # linear: half a step of the block's absmax (rows of 64)
            bound = before.abs().amax(dim=1, keepdim=True) / 254
            assert (error <= bound * (1 + 1e-5) + 1e-12).all()
        elif target == "int8":  # √v to nearest in E4M3: 2^-4 relative on √v, 2^-3 + 2^-8 on v
            assert (error <= (2 ** -3 + 2 ** -8) * before + 1e-20).all()
        else:  # bfloat16 to nearest, or exact (float32 and the 8-bit values already in a bfloat16's reach)
            assert (error <= 2 ** -8 * before.abs() + 1e-30).all()
    train(model, loaded, batches[5:8])  # and it steps


def test_bad_values_are_refused_with_the_allowed_ones():
    params = [nn.Parameter(torch.randn(4, 4))]
    with pytest.raises(ValueError, match=r"state_precision must be one of 'float32', 'bfloat16', 'int8', got 'fp8'"):
        LARS(params, state_precision="fp8")
    with pytest.raises(ValueError, match="state_precision"):
        LAMB(params, state_precision=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fused=True with state_precision='int8'"):
        LAMB(params, fused=True, state_precision="int8")
    with pytest.raises(ValueError, match="state_precision='bfloat16' with a torch.bfloat16 parameter"):
        LARS([nn.Parameter(torch.randn(4, 4, dtype=torch.bfloat16))], state_precision="bfloat16")
    opt = LARS(params)
    with pytest.raises(ValueError, match="param group 1: state_precision must be one of"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2))], "state_precision": "int4"})


def test_int8_state_for_bfloat16_parameters_decodes_into_their_dtype():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(64, 128, dtype=torch.bfloat16))
    opt = LAMB([w], state_precision="int8")
    for _ in range(3):
        w.grad = torch.randn_like(w)
        opt.step()
    assert opt.state[w]["exp_avg"].dtype == torch.uint8 and w.dtype == torch.bfloat16
    assert torch.isfinite(w).all()


def test_state_precision_by_name_in_the_hf_trainer_and_timm():
    pytest.importorskip("transformers")
    timm = pytest.importorskip("timm")
    from lars_plugins.hf import parse_optim_args
    import lars_plugins.timm  # noqa: F401  (registers the names)

    assert parse_optim_args("state_precision=int8,momentum=0.9", "lars") == {"state_precision": "int8",
                                                                              "momentum": 0.9}
    model = nn.Linear(64, 128)
    opt = timm.optim.create_optimizer_v2(model, "lplamb", lr=1e-3, state_precision="bfloat16")
    assert isinstance(opt, LAMB) and opt.param_groups[0]["state_precision"] == "bfloat16"
    with pytest.raises(ValueError, match="state_precision must be one of"):
        LARS(model.parameters(), **parse_optim_args("state_precision=int4", "lars"))


def step_peak_bytes(step) -> int:
    """Peak bytes one call of ``step`` allocates above where it started (torch.profiler, CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_a_step_decodes_a_part_of_the_state_at_a_time(name, precision, monkeypatch):
    """The float32 working copies of narrow state exist for one part (here one 1M-element tensor) at a
    time, not for the whole group: the step's peak stays below what decoding 8 tensors would take."""
    monkeypatch.setattr(OPTIMIZERS[name]([nn.Parameter(torch.ones(1))]).__class__, "NARROW_PART_NUMEL", 1 << 20)
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(1024, 1024)) for _ in range(8)]
    opt = OPTIMIZERS[name](params, state_precision=precision)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    states = 2 if name == "LAMB" else 1
    one_tensor = 1024 * 1024 * 4
    peak = step_peak_bytes(opt.step)
    assert peak < 6 * one_tensor < 8 * states * one_tensor, peak / one_tensor
