"""Checks every layer-wise optimizer must pass, generated from the table in tests/optim_db.py.

Each expectation comes from outside the code under test: the same optimizer run another way (an
uninterrupted run against a resumed one, eager against compiled, dense gradients against sparse
ones, a model without an empty tensor against one with it), or the documented contract (what is
refused, and with which words).
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import lars_plugins
from lars_plugins.base import LayerwiseOptimizer
from optim_db import ROWS

SHAPES = [(6, 5), (5,), (3, 2, 2), (4, 6)]

rows = pytest.mark.parametrize("row", ROWS, ids=str)


def make_params(shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def gradients(shapes=SHAPES, steps=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]


def run(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = None if g is None else g.clone()
        opt.step()
    return [p.detach().clone() for p in params]


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@rows
def test_is_a_layerwise_optimizer_that_adapts_matrices_and_not_vectors(row):
    params = make_params()
    opt = row.build(params)
    assert isinstance(opt, LayerwiseOptimizer) and isinstance(opt, torch.optim.Optimizer)
    run(opt, params, gradients(steps=1))
    assert [("trust_ratio" in opt.state[p]) for p in params] == [p.ndim > 1 for p in params]


@rows
def test_an_abbreviated_group_key_is_refused_with_the_full_one(row):
    short, full = row.abbreviation
    with pytest.raises(TypeError, match=f"unknown \\w+ key '{short}'; did you mean '{full}'"):
        row.build([{"params": make_params(), short: 0.5}])
    with pytest.raises(TypeError, match="did you mean 'weight_decay'|'wd'"):
        row.build([{"params": make_params(), "wd": 0.5}])


@rows
def test_numpy_scalars_are_taken_as_the_python_numbers_they_hold(row):
    np = pytest.importorskip("numpy")
    as_numpy = {key: np.float64(value) for key, value in row.numbers.items()}
    a_params, b_params = make_params(), make_params()
    a, b = row.build(a_params, **as_numpy), row.build(b_params, **row.numbers)
    for key in row.numbers:
        assert all(type(group[key]) is float for group in a.param_groups), key
    grads = gradients()
    assert_same(run(a, a_params, grads), run(b, b_params, grads))
    buffer = io.BytesIO()  # a NumPy scalar kept in a group would make this load fail
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=True))


@rows
def test_a_checkpoint_may_not_bring_in_what_the_constructor_refuses(row):
    key, value = row.bad_load
    params = make_params()
    opt = row.build(params)
    run(opt, params, gradients(steps=1))
    saved = opt.state_dict()
    before = opt.param_groups[0][key]
    saved["param_groups"][0][key] = value
    with pytest.raises((ValueError, TypeError), match=f"loaded param group 0: {key}"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0][key] == before


@rows
def test_sparse_gradients_are_refused_or_stepped_as_their_dense_equivalents(row):
    def embedding(sparse):
        torch.manual_seed(0)
        return nn.Embedding(10, 4, sparse=sparse)

    sparse, dense = embedding(True), embedding(False)
    sparse_opt, dense_opt = row.build(sparse.parameters()), row.build(dense.parameters())
    for module in (sparse, dense):
        module(torch.tensor([1, 2, 2])).pow(2).sum().backward()
    if row.sparse == "refused":
        with pytest.raises(RuntimeError, match="sparse"):
            sparse_opt.step()
        return
    sparse_opt.step()
    dense_opt.step()
    torch.testing.assert_close(sparse.weight.detach(), dense.weight.detach())
    assert not torch.equal(sparse.weight.detach(), embedding(False).weight.detach())  # it moved


@rows
def test_zero_size_tensors_change_nothing_for_the_others(row):
    shapes = [(6, 5), (0, 5), (5,), (0,)]
    with_empty, without = make_params(shapes), make_params([(6, 5), (5,)])
    with torch.no_grad():
        for p, q in zip([with_empty[0], with_empty[2]], without):
            p.copy_(q)
    grads = gradients(shapes)
    a = run(row.build(with_empty), with_empty, grads)
    b = run(row.build(without), without, [[g[0], g[2]] for g in grads])
    assert_same([a[0], a[2]], b)
    assert a[1].shape == (0, 5) and a[3].shape == (0,)


@rows
def test_resuming_from_a_weights_only_checkpoint_equals_the_uninterrupted_run(row):
    grads = gradients(steps=4)
    straight_params = make_params()
    straight = run(row.build(straight_params), straight_params, grads)
    params = make_params()
    opt = row.build(params)
    run(opt, params, grads[:2])
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_params = [nn.Parameter(t.clone()) for t in saved["params"]]
    resumed = row.build(resumed_params)
    resumed.load_state_dict(saved["optim"])
    assert_same(run(resumed, resumed_params, grads[2:]), straight)


@rows
def test_the_accelerator_path_reads_no_tensor_on_the_host(row, monkeypatch):
    """No .item(), bool(tensor), float(tensor) or .tolist() inside step(), except of the CPU step
    counts torch's own Adam keeps there; lr as a tensor."""
    row.accelerator_path(monkeypatch)
    params = make_params()
    lr_key = "lr" if "lr" in row.build(make_params()).param_groups[0] else None
    opt = row.build(params, **({"lr": torch.tensor(row.build(make_params()).param_groups[0]["lr"])}
                               if lr_key and not row.wraps else {}))
    real = {name: getattr(torch.Tensor, name) for name in ("item", "__bool__", "__float__", "__int__", "tolist",
                                                           "__index__")}

    def guarded(name):
        def read(self, *args, **kwargs):
            if not any(self is state.get("step") for state in opt.state.values()):
                raise AssertionError(f"host read ({name}) of a tensor inside {row.name}'s step()")
            return real[name](self, *args, **kwargs)
        return read

    grads = gradients(steps=2)
    for name in real:
        monkeypatch.setattr(torch.Tensor, name, guarded(name))
    run(opt, params, grads)


@rows
def test_the_monitor_records_the_ratios_the_step_used(row):
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    opt = row.build(model.parameters())
    monitor = lars_plugins.TrustRatioMonitor(model, opt, every_n_steps=1)
    model(torch.randn(8, 5)).pow(2).mean().backward()
    opt.step()
    record = monitor.latest
    for name, p in model.named_parameters():
        if p.ndim > 1:
            assert record[f"trust_ratio/{name}"] == pytest.approx(opt.state[p]["trust_ratio"].item(), rel=1e-6)
            assert record[f"weight_norm/{name}"] > 0
        else:
            assert f"trust_ratio/{name}" not in record and f"grad_norm/{name}" in record


@pytest.mark.slow  # torch.compile takes seconds per optimizer on the CPU
@rows
def test_a_compiled_step_equals_the_eager_step(row):
    torch._dynamo.reset()
    grads = gradients(steps=3)
    eager_params, compiled_params = make_params(), make_params()
    eager = row.build(eager_params)
    compiled = row.build(compiled_params)
    step = torch.compile(compiled.step)
    run(eager, eager_params, grads[:1])
    run(compiled, compiled_params, grads[:1])  # the state exists before the compiled steps
    for step_grads in grads[1:]:
        for p, q, g in zip(eager_params, compiled_params, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        eager.step()
        step()
    for p, q in zip(eager_params, compiled_params):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-6, atol=1e-7)


@rows
def test_the_signature_is_the_declaration(row):
    """Each option is declared once (its check and default, which checkpoints without it also get);
    the constructor's typed signature, which Python needs written out, states the same defaults."""
    import inspect

    opt = row.build(make_params())
    signature = inspect.signature(type(opt).__init__).parameters
    for key, option in type(opt).OPTIONS.items():
        if option.keyword:
            assert signature[key].default == option.default, key
        else:
            assert key not in signature, key
    assert set(type(opt).OPTIONS) <= set(opt.defaults)


@rows
def test_an_option_a_pickle_lacks_is_read_with_its_declared_default(row):
    """A pickled optimizer from before an option existed (its groups lack the key) comes back with
    the option's declared default in every group."""
    import copy

    for key, option in type(row.build(make_params())).OPTIONS.items():
        opt = row.build(make_params())
        for group in opt.param_groups:
            del group[key]
        restored = copy.deepcopy(opt)  # through __getstate__/__setstate__, as pickle goes
        assert all(group[key] == option.default for group in restored.param_groups), key
