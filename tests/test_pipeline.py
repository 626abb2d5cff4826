"""Pipeline parallelism (``torch.distributed.pipelining``, 2 stages, GPipe, 2 CPU processes): each
stage holds whole layers and steps its own optimizer, so the layer-wise norms are local and need no
collective; each stage's optimizer equals one process on the same global batch.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import lars_plugins
from optim_db import DISTRIBUTED
from test_distributed import CollectiveCounter, finish, reference, spawned
from test_tensor_parallel import make_model  # the same six layers, split here into two stages

pytestmark = pytest.mark.slow  # processes of their own

STAGES = 2
MICROBATCHES = 2


def batches():
    gen = torch.Generator().manual_seed(4)
    return [(torch.randn(16, 8, generator=gen), torch.randint(0, 5, (16,), generator=gen)) for _ in range(3)]


def stage_of(model, rank):
    """Stage 0: layers 0-1; stage 1: layers 2-5 (names keep the whole model's indices)."""
    keep = {"0", "1"} if rank == 0 else {"2", "3", "4", "5"}
    for name in [n for n, _ in model.named_children() if n not in keep]:
        setattr(model, name, nn.Identity())
    return model


def worker(rank, port, out):
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=STAGES)
    results = {}
    for kind in DISTRIBUTED:
        module = stage_of(make_model(), rank)
        opt = DISTRIBUTED[kind](lars_plugins.param_groups(module, weight_decay=1e-4))
        stage = PipelineStage(module, rank, STAGES, torch.device("cpu"))
        schedule = ScheduleGPipe(stage, n_microbatches=MICROBATCHES, loss_fn=nn.functional.cross_entropy)
        calls = []
        with CollectiveCounter() as counter:
            for x, y in batches():
                opt.zero_grad(set_to_none=True)
                if rank == 0:
                    schedule.step(x)
                else:
                    schedule.step(target=y)
                counter.calls, counter.counting = 0, True
                opt.step()
                counter.counting = False
                calls.append(counter.calls)
        params = {n: p.detach().clone() for n, p in module.named_parameters()}
        gathered = [None] * STAGES
        dist.all_gather_object(gathered, {"params": params, "calls": calls})
        results[kind] = gathered
    finish(results, out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return spawned(worker, STAGES, tmp_path_factory.mktemp("pipeline"))


@pytest.mark.parametrize("kind", list(DISTRIBUTED))
def test_each_stage_s_optimizer_equals_one_process_without_collectives(kind, runs):
    expected, _ = reference(kind, make_model, batches)
    stages = runs[kind]
    found = {}
    for stage in stages:
        found.update(stage["params"])
        assert stage["calls"] == [0] * len(batches())  # whole layers on each stage: local norms
    assert sorted(found) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(found[name], value, rtol=1e-5, atol=1e-6, msg=name)
