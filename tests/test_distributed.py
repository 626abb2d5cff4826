"""Sharded and replicated training on CPU (gloo, 2 processes): DDP and FSDP2 equal one process;
FSDP2 takes one collective per bucket and step; setups that hide the layers are refused."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lars_plugins
from lars_plugins import LARS

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
STEPS = 4


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 5))


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 8, generator=gen), torch.randint(0, 5, (16,), generator=gen)) for _ in range(STEPS)]


def make_opt(params):
    return LARS(params, lr=2.0, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.01)


def reference():
    """One process, the whole batch: final parameters, and ‖w‖ of 0.weight before each step."""
    model = make_model()
    opt = make_opt(lars_plugins.param_groups(model, weight_decay=1e-4))
    norms = []
    for x, y in batches():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        norms.append(model[0].weight.detach().norm().item())
        opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}, norms


def worker(rank, port, mode, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = make_model()
        if mode == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (WORLD,))
            for layer in (model[0], model[3]):
                fully_shard(layer, mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
        opt = make_opt(lars_plugins.param_groups(model, weight_decay=1e-4))
        monitor = lars_plugins.TrustRatioMonitor(model, opt, every_n_steps=2)
        calls = []
        real_all_reduce = dist.all_reduce

        def counting(*a, **k):
            calls[-1] += 1
            return real_all_reduce(*a, **k)

        for x, y in batches():
            half = slice(rank * 8, (rank + 1) * 8)  # this rank's half of the global batch
            opt.zero_grad()
            nn.functional.cross_entropy(wrapped(x[half]), y[half]).backward()
            calls.append(0)
            dist.all_reduce = counting
            try:
                opt.step()
            finally:
                dist.all_reduce = real_all_reduce
        params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
                  for n, p in model.named_parameters()}
        if rank == 0:
            torch.save({"params": params, "calls": calls, "monitor": monitor.latest}, out)
    finally:
        dist.destroy_process_group()


def run(mode, tmp_path):
    out = str(tmp_path / f"{mode}.pt")
    mp.spawn(worker, args=(free_port(), mode, out), nprocs=WORLD)
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_parameters_equal_one_process(mode, tmp_path):
    result = run(mode, tmp_path)
    expected, weight_norms = reference()
    for name, value in expected.items():
        torch.testing.assert_close(result["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    if mode == "fsdp2":
        # The adapted bucket (the two Linear weights) needs its norms: one all_reduce a step (1-D mesh),
        # for weights and gradients together -- not one per parameter; excluded tensors need none. On
        # the monitor's recording steps (every 2nd) it adds two: weight norms before, grad norms after.
        assert result["calls"] == [1 + (2 if step % 2 == 0 else 0) for step in range(STEPS)]
    else:
        assert result["calls"] == [0] * STEPS  # DDP: gradients arrive reduced; nothing to add
    # The monitor saw whole parameters on every rank (rank 0's record; all ranks ran the same collectives).
    last_recorded = (STEPS - 1) // 2 * 2
    assert result["monitor"]["weight_norm/0.weight"] == pytest.approx(weight_norms[last_recorded], rel=1e-5)
    assert "trust_ratio/3.weight" in result["monitor"]


def test_fsdp1_and_zero3_parameters_are_refused():
    flat = nn.Parameter(torch.randn(10))
    flat._fsdp_flattened = True  # what FSDP1 marks its FlatParameter and use_orig_params views with
    with pytest.raises(ValueError, match="FSDP1 flattens parameters.*FSDP2"):
        LARS([flat])
    zero3 = nn.Parameter(torch.randn(10))
    zero3.ds_id = 3  # DeepSpeed ZeRO-3's partitioned parameters carry it
    with pytest.raises(ValueError, match="DeepSpeed ZeRO"):
        LARS([{"params": [zero3]}])


def test_lightning_model_parallel_strategy_fsdp2(tmp_path):
    """Through Lightning's ModelParallelStrategy (FSDP2, 2 CPU processes, its own script launcher)."""
    import csv
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("lightning")
    script = Path(__file__).parent / "scripts" / "lightning_fsdp2.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    params = torch.load(tmp_path / "params.pt", weights_only=True)
    expected, weight_norms = reference()
    for name, value in expected.items():
        torch.testing.assert_close(params[name], value, rtol=1e-5, atol=1e-6, msg=name)
    (metrics,) = tmp_path.glob("logs/version_*/metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("weight_norm/model.0.weight")]
    assert [int(r["step"]) for r in rows] == [1, 3]  # Lightning's logging steps (log_every_n_steps=2)
    for row in rows:  # whole-parameter norms, logged from rank 0
        assert float(row["weight_norm/model.0.weight"]) == pytest.approx(weight_norms[int(row["step"])], rel=1e-5)


def accelerate_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)  # 2 CPU processes: Accelerate's MULTI_CPU (DDP over gloo)
    model = make_model()
    opt = make_opt(lars_plugins.param_groups(model, weight_decay=1e-4))
    wrapped, opt = accelerator.prepare(model, opt)
    monitor = lars_plugins.TrustRatioMonitor(model, opt, every_n_steps=1)  # through AcceleratedOptimizer
    for x, y in batches():
        half = slice(rank * 8, (rank + 1) * 8)
        opt.zero_grad()
        accelerator.backward(nn.functional.cross_entropy(wrapped(x[half]), y[half]))
        opt.step()
    if rank == 0:
        torch.save({"params": {n: p.detach() for n, p in model.named_parameters()},
                    "ratio": monitor.latest["trust_ratio/0.weight"]}, out)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def test_hf_accelerate_multi_cpu_equals_one_process(tmp_path):
    pytest.importorskip("accelerate")
    out = str(tmp_path / "accelerate.pt")
    mp.spawn(accelerate_worker, args=(free_port(), out), nprocs=WORLD)
    result = torch.load(out, weights_only=True)
    expected, _ = reference()
    for name, value in expected.items():
        torch.testing.assert_close(result["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert result["ratio"] > 0  # the monitor found LARS inside Accelerate's AcceleratedOptimizer


def fsdp1_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        messages = []
        for use_orig_params in (False, True):
            wrapped = FSDP(make_model(), device_id=torch.device("cpu"), use_orig_params=use_orig_params)
            try:
                LARS(wrapped.parameters())
                messages.append("accepted")
            except ValueError as err:
                messages.append(str(err))
        if rank == 0:
            torch.save(messages, out)
    finally:
        dist.destroy_process_group()


def test_real_fsdp1_is_refused_in_both_modes(tmp_path):
    out = str(tmp_path / "fsdp1.pt")
    mp.spawn(fsdp1_worker, args=(free_port(), out), nprocs=WORLD)
    for message in torch.load(out, weights_only=True):  # flat parameters, then use_orig_params=True views
        assert "FSDP1 flattens parameters" in message and "FSDP2" in message


def test_deepspeed_style_flat_partition_swap_is_refused_at_step():
    """DeepSpeed ZeRO-1/2 replace each group's parameters with one flat fp32 partition after the
    optimizer is built; LARS must not take per-layer norms of it."""
    model = make_model()
    opt = make_opt(lars_plugins.param_groups(model, weight_decay=1e-4))
    flat = torch.cat([p.detach().flatten() for p in opt.param_groups[0]["params"]]).requires_grad_()
    flat.grad = torch.ones_like(flat)
    opt.param_groups[0]["params"] = [flat]  # what DeepSpeed's ZeRO optimizer does to the client optimizer
    with pytest.raises(ValueError, match="not built with.*DeepSpeed ZeRO"):
        opt.step()
