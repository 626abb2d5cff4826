"""Whole-layer norms on 2-D meshes: tensor parallelism alone, FSDP2 over tensor parallelism
(torchtitan's layout: ``parallelize_module`` on ``mesh["tp"]``, then ``fully_shard`` on
``mesh["dp"]``, which records ``_StridedShard``) and HSDP, in 4 CPU processes (gloo), each against
one process on the same global batch, with the collectives of each step counted.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import lars_plugins
from optim_db import DISTRIBUTED
from test_distributed import finish, reference, spawned, train_counting_collectives

pytestmark = pytest.mark.slow  # 4 processes

WORLD = 4
STEPS = 4
SETUPS = ["tp", "fsdp2_tp", "hsdp"]


def make_model():
    torch.manual_seed(0)
    # 0: column-parallel, 2: row-parallel (their output is replicated), then replicated layers.
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.LayerNorm(16), nn.ReLU(),
                         nn.Linear(16, 5))


def batches():
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(16, 8, generator=gen), torch.randint(0, 5, (16,), generator=gen)) for _ in range(STEPS)]


def parallelize(model, setup, rank):
    """The model laid out for ``setup``; returns it and this rank's slice of each global batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {"0": ColwiseParallel(), "2": RowwiseParallel()}
    if setup == "tp":  # every rank sees the whole batch
        parallelize_module(model, init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",)), plan)
        return model, slice(None)
    if setup == "fsdp2_tp":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], plan)
        for layer in (model[0], model[2], model):
            fully_shard(layer, mesh=mesh["dp"])
        dp = mesh["dp"].get_local_rank()
    else:  # hsdp: replicate over the first dimension, shard over the second
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        for layer in (model[0], model[2], model):
            fully_shard(layer, mesh=mesh)
        dp = rank  # every rank its own quarter of the batch
        return model, slice(dp * 4, (dp + 1) * 4)
    return model, slice(dp * 8, (dp + 1) * 8)


HALF = STEPS // 2  # checkpoints are taken after this many steps


def save(model, opt, path):
    """torch's recipe: get_state_dict, then dcp.save (one process or many)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)


def load(model, opt, path):
    """torch's recipe: get_state_dict for the layout at hand, dcp.load into it, set_state_dict."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, opt)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def one_process(kind, steps, resume_from=None):
    """A plain model and optimizer: ``steps`` of the batches, after resuming from a checkpoint if given."""
    model = make_model()
    opt = DISTRIBUTED[kind](lars_plugins.param_groups(model, weight_decay=1e-4))
    if resume_from is not None:
        load(model, opt, resume_from)
    for x, y in steps:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def across_mesh_shapes(kind, rank, where):
    """Checkpoints between FSDP2 over tensor parallelism (4 processes) and one process, both ways:
    save here after HALF steps (for the test to resume in one process), and resume here from the
    one-process checkpoint the fixture saved; returns the parameters after the remaining steps."""
    model, part = parallelize(make_model(), "fsdp2_tp", rank)
    opt = DISTRIBUTED[kind](lars_plugins.param_groups(model, weight_decay=1e-4))
    train_counting_collectives(model, opt, part, lambda: batches()[:HALF])
    save(model, opt, f"{where}/{kind}.fsdp2_tp.dcp")
    model, part = parallelize(make_model(), "fsdp2_tp", rank)
    opt = DISTRIBUTED[kind](lars_plugins.param_groups(model, weight_decay=1e-4))
    load(model, opt, f"{where}/{kind}.one_process.dcp")
    train_counting_collectives(model, opt, part, lambda: batches()[HALF:])
    resumed = {"resumed": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}}
    model, part = parallelize(make_model(), "fsdp2_tp", rank)  # and from 2 processes of FSDP2 alone
    opt = DISTRIBUTED[kind](lars_plugins.param_groups(model, weight_decay=1e-4))
    load(model, opt, f"{where}/{kind}.fsdp2.dcp")
    train_counting_collectives(model, opt, part, lambda: batches()[HALF:])
    return {**resumed, "from_fsdp2": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}}


def fsdp2_worker(rank, port, where, mode, out):
    """FSDP2 alone on 2 processes: ``save`` after HALF steps, or ``resume`` from the checkpoint of
    FSDP2 over tensor parallelism and take the remaining steps."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results = {}
    for kind in DISTRIBUTED:
        model = make_model()
        mesh = init_device_mesh("cpu", (2,))
        for layer in (model[0], model[2], model):
            fully_shard(layer, mesh=mesh)
        opt = DISTRIBUTED[kind](lars_plugins.param_groups(model, weight_decay=1e-4))
        half = slice(rank * 8, (rank + 1) * 8)
        if mode == "save":
            train_counting_collectives(model, opt, half, lambda: batches()[:HALF])
            save(model, opt, f"{where}/{kind}.fsdp2.dcp")
        else:
            load(model, opt, f"{where}/{kind}.fsdp2_tp.dcp")
            train_counting_collectives(model, opt, half, lambda: batches()[HALF:])
            results[kind] = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
        dist.barrier()
    finish(results, out)


def worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results = {}
    for kind in DISTRIBUTED:
        for key, params in across_mesh_shapes(kind, rank, os.path.dirname(out)).items():
            results[f"{key}/{kind}"] = params
        dist.barrier()
    for setup in SETUPS:
        for kind in DISTRIBUTED:
            model, part = parallelize(make_model(), setup, rank)
            opt = DISTRIBUTED[kind](lars_plugins.param_groups(model, weight_decay=1e-4))
            monitor = lars_plugins.TrustRatioMonitor(model, opt, every_n_steps=1)
            placements = sorted({str(pl) for p in model.parameters() for pl in getattr(p, "placements", ())})
            calls = train_counting_collectives(model, opt, part, batches)
            params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                      for n, p in model.named_parameters()}
            results[f"{setup}/{kind}"] = {"params": params, "calls": calls, "placements": placements,
                                          "monitor": monitor.latest}
            monitor.remove()
            dist.barrier()
    results["partial"] = refusal_of_a_partial_placement()
    results["int8_beyond_rows"] = int8_state_sharded_beyond_rows()
    finish(results, out)


def refusal_of_a_partial_placement():
    """A parameter whose placement does not partition its elements (Partial: each rank holds a
    summand) is refused by name, before any update."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    mesh = init_device_mesh("cpu", (WORLD,))
    weight = nn.Parameter(DTensor.from_local(torch.ones(4, 4), mesh, [Partial()], run_check=False))
    weight.grad = DTensor.from_local(torch.ones(4, 4), mesh, [Partial()], run_check=False)
    opt = lars_plugins.LARS([weight], lr=0.1)
    before = weight.to_local().clone()
    try:
        opt.step()
    except ValueError as error:
        return {"message": str(error), "unchanged": bool(torch.equal(weight.to_local(), before))}
    return {"message": "", "unchanged": bool(torch.equal(weight.to_local(), before))}


def int8_state_sharded_beyond_rows():
    """8-bit blocks lie within rows; a parameter sharded along its second dimension (tensor
    parallelism's row-wise layers) would split them: refused before any update. bfloat16 state,
    elementwise, steps there."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (WORLD,))
    out = {}
    for precision in ("int8", "bfloat16"):
        weight = nn.Parameter(DTensor.from_local(torch.ones(8, 1024), mesh, [Shard(1)], run_check=False))
        weight.grad = DTensor.from_local(torch.ones(8, 1024), mesh, [Shard(1)], run_check=False)
        opt = lars_plugins.LARS([weight], lr=0.1, state_precision=precision)
        before = weight.to_local().clone()
        try:
            opt.step()
            message = ""
        except ValueError as error:
            message = str(error)
        out[precision] = {"message": message, "unchanged": bool(torch.equal(weight.to_local(), before)),
                          "stored": str(opt.state[weight].get("momentum_buffer", torch.empty(0)).dtype)}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    where = tmp_path_factory.mktemp("tp")
    for kind in DISTRIBUTED:  # one-process checkpoints for the 4 processes to resume from
        save(*one_process(kind, batches()[:HALF]), str(where / f"{kind}.one_process.dcp"))
    (where / "fsdp2").mkdir()
    spawned(fsdp2_worker, 2, where / "fsdp2", str(where), "save")  # and 2-process ones
    results = spawned(worker, WORLD, where)
    (where / "resume").mkdir()
    from_fsdp2_tp = spawned(fsdp2_worker, 2, where / "resume", str(where), "resume")
    return {**results, **{f"fsdp2_from_tp/{kind}": params for kind, params in from_fsdp2_tp.items()}, "dir": where}


@pytest.mark.parametrize("kind", list(DISTRIBUTED))
@pytest.mark.parametrize("setup", SETUPS)
def test_parameters_equal_one_process(setup, kind, runs):
    result = runs[f"{setup}/{kind}"]
    expected, weight_norms = reference(kind, make_model, batches)
    assert sorted(result["params"]) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(result["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    # The monitor saw whole layers (rank 0's record of the last step; every rank ran its collectives).
    assert result["monitor"]["weight_norm/0.weight"] == pytest.approx(weight_norms[-1], rel=1e-5)
    assert result["monitor"]["trust_ratio/2.weight"] > 0 and "trust_ratio/3.weight" not in result["monitor"]


@pytest.mark.parametrize("kind", list(DISTRIBUTED))
def test_checkpoints_move_between_fsdp2_over_tensor_parallel_fsdp2_alone_and_one_process(kind, runs):
    """Saved by 4 processes (dp 2 x tp 2, _StridedShard state) and resumed by one and by FSDP2 alone
    on 2, and the reverse of both: every one ends where the uninterrupted one-process run does."""
    expected, _ = reference(kind, make_model, batches)
    model, _ = one_process(kind, batches()[HALF:], resume_from=str(runs["dir"] / f"{kind}.fsdp2_tp.dcp"))
    resumed = {"one process from 4": {n: p.detach() for n, p in model.named_parameters()},
               "4 processes from one": runs[f"resumed/{kind}"],
               "4 processes from FSDP2 on 2": runs[f"from_fsdp2/{kind}"],
               "FSDP2 on 2 from 4": runs[f"fsdp2_from_tp/{kind}"]}
    for how, params in resumed.items():
        for name, value in expected.items():
            torch.testing.assert_close(params[name], value, rtol=1e-5, atol=1e-6, msg=f"{how}: {name}")


def hsdp_tp_worker(rank, port, out):
    """HSDP over tensor parallelism: a 3-D mesh (replicate 2 x shard 2 x tp 2) of 8 processes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=8)
    results = {}
    for kind in DISTRIBUTED:
        mesh = init_device_mesh("cpu", (2, 2, 2), mesh_dim_names=("replicate", "shard", "tp"))
        model = make_model()
        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        for layer in (model[0], model[2], model):
            fully_shard(layer, mesh=mesh["replicate", "shard"])
        dp = mesh["replicate"].get_local_rank() * 2 + mesh["shard"].get_local_rank()
        opt = DISTRIBUTED[kind](lars_plugins.param_groups(model, weight_decay=1e-4))
        calls = train_counting_collectives(model, opt, slice(dp * 4, (dp + 1) * 4), batches)
        results[kind] = {"params": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()},
                         "calls": calls}
        dist.barrier()
    finish(results, out)


@pytest.fixture(scope="module")
def hsdp_tp_runs(tmp_path_factory):
    return spawned(hsdp_tp_worker, 8, tmp_path_factory.mktemp("hsdp_tp"))


@pytest.mark.parametrize("kind", list(DISTRIBUTED))
def test_hsdp_over_tensor_parallel_on_eight_processes_equals_one_process(kind, hsdp_tp_runs):
    expected, _ = reference(kind, make_model, batches)
    result = hsdp_tp_runs[kind]
    for name, value in expected.items():
        torch.testing.assert_close(result["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    if kind == "lars":  # the 3-D mesh (3 dimensions) and the 2-D one of the layers outside tensor parallelism
        assert set(result["calls"]) == {3 + 2}


def test_a_placement_that_does_not_partition_elements_is_refused_by_name(runs):
    refusal = runs["partial"]
    assert "placement Partial(sum)" in refusal["message"] and "_StridedShard" in refusal["message"], refusal
    assert refusal["unchanged"]


def test_int8_state_of_a_parameter_sharded_beyond_its_rows_is_refused_and_bfloat16_steps(runs):
    refusal, bf16 = runs["int8_beyond_rows"]["int8"], runs["int8_beyond_rows"]["bfloat16"]
    assert "state_precision='int8' for a parameter sharded along a dimension other than its first" in \
        refusal["message"] and "bfloat16" in refusal["message"]
    assert refusal["unchanged"]
    assert bf16["message"] == "" and not bf16["unchanged"] and bf16["stored"] == "torch.bfloat16"


def test_fsdp2_over_tensor_parallel_is_the_strided_layout_and_takes_one_collective_per_mesh_dimension(runs):
    """The case that was refused: FSDP2 shards the dimension tensor parallelism split, which torch
    records as _StridedShard. Norms of a bucket take one all_reduce per mesh dimension."""
    result = runs["fsdp2_tp/lars"]
    assert any(p.startswith("_S(") for p in result["placements"]), result["placements"]
    # One bucket: the adapted DTensors on one 2-D mesh (dp x tp) and on the 1-D dp mesh (the
    # replicated layers fully_shard alone): 2 + 1 collectives per step, never one per tensor; and on
    # each (recorded) step the monitor's two reductions (weights before, gradients after) as many.
    assert set(result["calls"]) == {3 + 2 * 3}
    assert set(runs["tp/lars"]["calls"]) == {1 + 2 * 1}  # the 1-D tp mesh
