"""LARS and LAMB under every sharding engine against DDP: optimizer-step time, collectives, iteration time.

    python benchmarks/sharded_step.py                      # 2 CPU processes (gloo), 12 blocks of width 256
    python benchmarks/sharded_step.py --blocks 24 --width 512 --reps 20
    python benchmarks/sharded_step.py --engines ddp fsdp1-flat zero3 --optimizers lars --csv out.csv
    python benchmarks/sharded_step.py --processes 4 --engines ddp fsdp2 fsdp2-tp   # dp 2 x tp 2

For each engine (DDP, FSDP2 ``fully_shard`` per Linear, FSDP2 over tensor parallelism on a dp x tp
mesh of 2 x ``--processes``/2, FSDP1 per Linear with and without ``use_orig_params``, DeepSpeed
ZeRO-1/2/3 on DeepSpeed's CPU accelerator) the same model and data are trained with
lars_plugins.LARS against torch's SGD (momentum, foreach) and with lars_plugins.LAMB against torch's
AdamW (foreach), each baseline under the same engine. ``fsdp2-tp`` is torchtitan's layout: every
Linear column-parallel over ``tp`` (its output gathered, so the LayerNorms see whole features), then
``fully_shard`` over ``dp``, which records ``_StridedShard``; both ranks of a tp pair see the same
batch. Per optimizer step it measures, with medians over ``--reps`` steps after ``--warmup``:

* ``opt ms``: time inside the optimizer's ``step()`` calls (DeepSpeed makes one call per partition
  group; they are summed), each entered by all ranks together (a barrier in a step pre-hook), so
  that no rank's wait for the other is counted;
* ``all_reduce``: the collectives issued inside those calls (LARS's whole-parameter norms);
* ``iter ms``: one whole training iteration (forward, backward, engine step), to put the step in
  proportion;
* ``max |dw|``: after all steps, the largest difference between the parameters under the engine
  and those of one process trained on the same global batch (every data-parallel rank's batch together).

Rank 0 prints one table; ``x base`` is the step time over the baseline's (SGD for LARS, AdamW for
LAMB) under the same engine, ``x DDP`` over the same optimizer's under DDP. All numbers come from
one run, side by side.
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

ENGINES = ["ddp", "fsdp2", "fsdp2-tp", "fsdp1-orig", "fsdp1-flat", "zero1", "zero2", "zero3"]
TP = 2  # fsdp2-tp: the tensor-parallel degree (the data-parallel degree is --processes / TP)
# Each optimizer of ours, and the torch optimizer it is timed against.
BASELINES = {"LARS": "SGD", "LAMB": "AdamW"}


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
    if kind == "LAMB":
        return lars_plugins.LAMB(groups, lr=1e-3)
    plain = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups]
    if kind == "AdamW":
        return torch.optim.AdamW(plain, lr=1e-3, foreach=True)
    return torch.optim.SGD(plain, lr=0.01, momentum=0.9, foreach=True)


def data_parallel(engine: str, rank: int, world: int) -> tuple[int, int]:
    """(this rank's data-parallel index, the data-parallel degree): under fsdp2-tp the tp pairs
    (ranks 2k, 2k+1: tp is the inner mesh dimension) share a batch."""
    return (rank // TP, world // TP) if engine == "fsdp2-tp" else (rank, world)


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
    elif engine == "fsdp2-tp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (dist.get_world_size() // TP, TP), mesh_dim_names=("dp", "tp"))
        plan = {str(i): ColwiseParallel(output_layouts=Replicate()) for i, layer in enumerate(net)
                if isinstance(layer, nn.Linear)}
        parallelize_module(net, mesh["tp"], plan)
        for layer in net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh["dp"])
        wrapped = fully_shard(net, mesh=mesh["dp"])
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


def one_process(kind: str, data_parallel_degree: int, args: argparse.Namespace, steps: int) -> dict[str, torch.Tensor]:
    """``kind`` on one process with every data-parallel rank's batch as one."""
    net = model(args.blocks, args.width)
    opt = optimizer(kind, net)
    batches = [batch(r, args) for r in range(data_parallel_degree)]
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    for _ in range(steps):
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {name: p.detach() for name, p in net.named_parameters()}


def measure(engine: str, kind: str, rank: int, args: argparse.Namespace) -> dict[str, float]:
    module, opt, step = build(engine, kind, args)
    dp_rank, dp_degree = data_parallel(engine, rank, dist.get_world_size())
    x, y = batch(dp_rank, args)
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
    if kind in BASELINES:
        got = full_parameters(engine, module)
        expected = one_process(kind, dp_degree, args, args.warmup + args.reps)
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
        for ours in args.optimizers:
            result = {kind: measure(engine, kind, rank, args) for kind in (ours, BASELINES[ours])}
            rows.append((engine, ours, result))
    if rank == 0:
        n = sum(1 for _ in model(args.blocks, args.width).parameters())
        print(f"torch {torch.__version__}, {world} processes (gloo, CPU, 1 thread each), {args.blocks} blocks of width "
              f"{args.width}: {n} parameter tensors, batch {args.batch} per data-parallel rank; medians of "
              f"{args.reps} steps")
        print("| engine | optimizer | opt ms | baseline | baseline opt ms | x base | x DDP | all_reduce/step | iter ms "
              "| baseline iter ms | max abs dw vs 1 process |")
        print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
        ddp = {ours: r[ours]["opt_ms"] for e, ours, r in rows if e == "ddp"}
        table = []
        for engine, ours, r in rows:
            mine, base = r[ours], r[BASELINES[ours]]
            vs_ddp = f"{mine['opt_ms'] / ddp[ours]:.2f}" if ours in ddp else "-"
            print(f"| {engine} | {ours} | {mine['opt_ms']:.2f} | {BASELINES[ours]} | {base['opt_ms']:.2f} | "
                  f"{mine['opt_ms'] / base['opt_ms']:.2f} | {vs_ddp} | {mine['all_reduce']:g} | "
                  f"{mine['iter_ms']:.2f} | {base['iter_ms']:.2f} | {mine['max_dw']:.1e} |")
            table.append({"engine": engine, "optimizer": ours, "baseline": BASELINES[ours],
                          **{k: v for k, v in mine.items()}, **{f"baseline_{k}": v for k, v in base.items()}})
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
    parser.add_argument("--engines", nargs="+", default=[e for e in ENGINES if e != "fsdp2-tp"], choices=ENGINES,
                        help="fsdp2-tp needs --processes 4 (or another multiple of 2 above 2)")
    parser.add_argument("--optimizers", nargs="+", default=list(BASELINES), type=str.upper, choices=list(BASELINES))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32, help="samples per process")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--csv", help="also write the numbers to this CSV file")
    args = parser.parse_args()
    if "fsdp2-tp" in args.engines and (args.processes < 2 * TP or args.processes % TP):
        parser.error(f"--engines fsdp2-tp needs a dp x tp mesh with tp = {TP} and dp >= 2: --processes 4 (a multiple "
                     f"of {TP} from {2 * TP}), got --processes {args.processes}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args.processes, port, args), nprocs=args.processes)
    remove_deepspeed_shm_buffers(port)  # DeepSpeed's CPU all-reduce leaves them in /dev/shm


if __name__ == "__main__":
    main()
