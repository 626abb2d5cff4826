"""torch.compile(fullgraph=True) traces step() whole (a host read would break the graph), and a
tensor lr changed by a schedule does not recompile it."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch import nn

import lars_plugins


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="inductor needs a C compiler")
@pytest.mark.parametrize("foreach", [False, True])
def test_compiled_step_matches_eager_without_recompiling(foreach):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 2))
    eager_model = copy.deepcopy(model)
    opt = lars_plugins.LARS(model.parameters(), lr=torch.tensor(1.0), weight_decay=1e-4, foreach=foreach)
    eager = lars_plugins.LARS(eager_model.parameters(), lr=torch.tensor(1.0), weight_decay=1e-4, foreach=foreach)

    @torch.compile(fullgraph=True)
    def compiled_step():
        opt.step()

    x = torch.randn(4, 8)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for i in range(5):
        # No zero_grad: gradients accumulate in place, so a momentum buffer that aliased p.grad
        # (inductor folds g*1.0 into g) would silently change with it.
        for m, step in ((model, compiled_step), (eager_model, eager.step)):
            m(x).pow(2).sum().backward()
            step()
        for p in model.parameters():
            buf = opt.state[p]["momentum_buffer"]
            assert buf.untyped_storage().data_ptr() != p.grad.untyped_storage().data_ptr()
        for o in (opt, eager):
            o.param_groups[0]["lr"].fill_(1.0 / (i + 2))  # what a scheduler does to a tensor lr
    for a, b in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # One graph for the first step (buffers created), one for all later steps, whatever the lr.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="inductor needs a C compiler")
@pytest.mark.parametrize("shapes", [[(6, 5), (6, 5)], [(6, 5), (3, 7), (4,)]], ids=["equal shapes", "other shapes"])
@pytest.mark.parametrize("kind", ["lamb", "layerwise"])
def test_compiled_step_after_an_eager_one_equals_eager_steps(kind, shapes):
    """A compiled step must not read a step count on the host: after one eager step the counts are
    CPU tensors holding 1, and each parameter must advance once per step, as eagerly."""
    def build(params):
        if kind == "lamb":
            return lars_plugins.LAMB(params, lr=1e-2, weight_decay=0.01, exclude_bias_and_norm=False)
        return lars_plugins.Layerwise(torch.optim.AdamW(params, lr=1e-2), trust_coefficient=0.5)

    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen) for s in shapes]
    params = [nn.Parameter(t.clone()) for t in start]
    twins = [nn.Parameter(t.clone()) for t in start]
    opt, eager = build(params), build(twins)
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    torch._dynamo.reset()
    compiled = torch.compile(opt.step)
    for i, step_grads in enumerate(grads):
        for p, q, g in zip(params, twins, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        (opt.step if i == 0 else compiled)()
        eager.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert opt.state[p]["step"].item() == eager.state[q]["step"].item() == 3
