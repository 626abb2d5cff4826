"""LARS under every sharding engine against DDP: optimizer-step time, collectives, iteration time.

    python benchmarks/sharded_step.py                      # 2 CPU processes (gloo), 12 blocks of width 256
    python benchmarks/sharded_step.py --blocks 24 --width 512 --reps 20
    python benchmarks/sharded_step.py --engines ddp fsdp1-flat zero3 --csv out.csv

For each engine (DDP, FSDP2 ``fully_shard`` per Linear, FSDP1 per Linear with and without
``use_orig_params``, DeepSpeed ZeRO-1/2/3 on DeepSpeed's CPU accelerator) the same model and data
are trained with lars_plugins.LARS and with torch's SGD (momentum, foreach) as the baseline of the
same engine. Per optimizer step it measures, with medians over ``--reps`` steps after ``--warmup``:

* ``opt ms``: time inside the optimizer's ``step()`` calls (DeepSpeed makes one call per partition
  group; they are summed), each entered by all ranks together (a barrier in a step pre-hook), so
  that no rank's wait for the other is counted;
* ``all_reduce``: the collectives issued inside those calls (LARS's whole-parameter norms);
* ``iter ms``: one whole training iteration (forward, backward, engine step), to put the step in
  proportion;
* ``max |dw|``: after all steps, the largest difference between LARS's parameters under the engine
  and those of one process trained on the same global batch (both ranks' batches together).

Rank 0 prints one table; ``x SGD`` is LARS's step time over SGD's under the same engine, ``x DDP``
LARS's step time over LARS's under DDP. All numbers come from one run, side by side.
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lars_plugins.distributed import remove_deepspeed_shm_buffers

ENGINES = ["ddp", "fsdp2", "fsdp1-orig", "fsdp1-flat", "zero1", "zero2", "zero3"]


def model(blocks: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def optimizer(kind: str, net: nn.Module) -> torch.optim.Optimizer:
    import lars_plugins

    groups = lars_plugins.param_groups(net, weight_decay=1e-4)
    if kind == "LARS":
        return lars_plugins.LARS(groups, lr=0.1, momentum=0.9, trust_coefficient=0.001)  # stable on this batch
    return torch.optim.SGD([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups], lr=0.01,
                           momentum=0.9, foreach=True)


def build(engine: str, kind: str, args: argparse.Namespace):
    """(module to call, the optimizer whose step() is timed, a function running one engine step)."""
    net = model(args.blocks, args.width)
    if engine.startswith("zero"):
        import deepspeed

        opt = optimizer(kind, net)
        config = {"train_micro_batch_size_per_gpu": args.batch, "gradient_clipping": 0.0,
                  "zero_optimization": {"stage": int(engine[-1])}, "zero_allow_untested_optimizer": True,
                  "steps_per_print": 10**9}
        engine_, _, _, _ = deepspeed.initialize(model=net, optimizer=opt, config=config)
        return engine_, opt, lambda loss: (engine_.backward(loss), engine_.step())
    if engine == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(net)
    elif engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        wrapped = fully_shard(net)
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        wrapped = FSDP(net, device_id=torch.device("cpu"), use_orig_params=engine == "fsdp1-orig",
                       auto_wrap_policy=ModuleWrapPolicy({nn.Linear}))
    opt = optimizer(kind, wrapped if engine.startswith("fsdp1") else net)

    def step(loss: torch.Tensor) -> None:
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return wrapped, opt, step


def batch(rank: int, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(rank)
    return torch.randn(args.batch, args.width, generator=gen), torch.randint(0, 10, (args.batch,), generator=gen)


def full_parameters(engine: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """Whole parameters by their name in the unwrapped model, on every rank."""
    import contextlib

    if engine.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        context = FSDP.summon_full_params(module)
    elif engine == "zero3":
        import deepspeed

        context = deepspeed.zero.GatheredParameters(list(module.parameters()))
    else:
        context = contextlib.nullcontext()
    with context:
        return {name.replace("_fsdp_wrapped_module.", "").replace("module.", "", 1 if engine != "fsdp2" else 0):
                (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                for name, p in module.named_parameters()}


def one_process(args: argparse.Namespace, steps: int) -> dict[str, torch.Tensor]:
    """LARS on one process with both ranks' batches as one."""
    net = model(args.blocks, args.width)
    opt = optimizer("LARS", net)
    (x0, y0), (x1, y1) = batch(0, args), batch(1, args)
    x, y = torch.cat([x0, x1]), torch.cat([y0, y1])
    for _ in range(steps):
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {name: p.detach() for name, p in net.named_parameters()}


def measure(engine: str, kind: str, rank: int, args: argparse.Namespace) -> dict[str, float]:
    module, opt, step = build(engine, kind, args)
    x, y = batch(rank, args)
    state = {"start": 0.0, "elapsed": 0.0, "calls": 0, "counting": False}
    real_all_reduce = dist.all_reduce

    def counted(*a, **k):
        state["calls"] += state["counting"]
        return real_all_reduce(*a, **k)

    def before(*_):
        dist.barrier()  # every rank enters the step together: no rank's wait for the other is timed
        state["counting"], state["start"] = True, time.perf_counter()

    def after(*_):
        state["elapsed"] += time.perf_counter() - state["start"]
        state["counting"] = False

    opt.register_step_pre_hook(before)
    opt.register_step_post_hook(after)
    opt_ms, iter_ms, calls = [], [], []
    dist.all_reduce = counted
    try:
        for rep in range(args.warmup + args.reps):
            state.update(elapsed=0.0, calls=0)
            dist.barrier()
            start = time.perf_counter()
            step(nn.functional.cross_entropy(module(x), y))
            iteration = time.perf_counter() - start
            if rep >= args.warmup:
                opt_ms.append(state["elapsed"] * 1e3)
                iter_ms.append(iteration * 1e3)
                calls.append(state["calls"])
    finally:
        dist.all_reduce = real_all_reduce
    result = {"opt_ms": statistics.median(opt_ms), "iter_ms": statistics.median(iter_ms),
              "all_reduce": statistics.median(calls)}
    if kind == "LARS":
        got = full_parameters(engine, module)
        expected = one_process(args, args.warmup + args.reps)
        diffs = {name: (got[name].float() - value).abs().max().item() for name, value in expected.items()}
        if os.environ.get("LARS_BENCH_DEBUG"):
            print(engine, sorted(diffs.items(), key=lambda kv: -kv[1])[:3], sorted(got)[:3])
        result["max_dw"] = max(diffs.values())
    return result


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    torch.set_num_threads(1)
    if any(e.startswith("zero") for e in args.engines):
        os.environ["DS_ACCELERATOR"] = "cpu"
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    for engine in args.engines:
        result = {kind: measure(engine, kind, rank, args) for kind in ("LARS", "SGD")}
        rows.append((engine, result))
    if rank == 0:
        n = sum(1 for _ in model(args.blocks, args.width).parameters())
        print(f"torch {torch.__version__}, {world} processes (gloo, CPU, 1 thread each), {args.blocks} blocks of width "
              f"{args.width}: {n} parameter tensors, batch {args.batch} per process; medians of {args.reps} steps")
        print("| engine | LARS opt ms | SGD opt ms | x SGD | x DDP | LARS all_reduce/step | LARS iter ms | SGD iter ms "
              "| LARS max abs dw vs 1 process |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        ddp = next((r["LARS"]["opt_ms"] for e, r in rows if e == "ddp"), None)
        table = []
        for engine, r in rows:
            lars, sgd = r["LARS"], r["SGD"]
            vs_ddp = f"{lars['opt_ms'] / ddp:.2f}" if ddp else "-"
            print(f"| {engine} | {lars['opt_ms']:.2f} | {sgd['opt_ms']:.2f} | {lars['opt_ms'] / sgd['opt_ms']:.2f} | "
                  f"{vs_ddp} | {lars['all_reduce']:g} | {lars['iter_ms']:.2f} | {sgd['iter_ms']:.2f} | "
                  f"{lars['max_dw']:.1e} |")
            table.append({"engine": engine, **{f"lars_{k}": v for k, v in lars.items()},
                          **{f"sgd_{k}": v for k, v in sgd.items()}})
        if args.csv:
            with open(args.csv, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(table[0]))
                writer.writeheader()
                writer.writerows(table)
    dist.barrier()
    dist.destroy_process_group()
    # Leave without interpreter teardown: a communication thread still joinable then (gloo, DeepSpeed's
    # shared-memory op) makes the C++ runtime abort an otherwise finished process.
    sys.stdout.flush()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", default=ENGINES, choices=ENGINES)
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32, help="samples per process")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--csv", help="also write the numbers to this CSV file")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, args), nprocs=2)
    remove_deepspeed_shm_buffers(port)  # DeepSpeed's CPU all-reduce leaves them in /dev/shm


if __name__ == "__main__":
    main()
