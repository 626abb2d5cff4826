"""Collectives and step time of one optimizer step under FSDP2, lars_plugins.LARS vs per-parameter norms.

    python benchmarks/fsdp2_step.py                 # 2 CPU processes (gloo), a 12-block MLP stack
    python benchmarks/fsdp2_step.py --blocks 24 --width 512 --reps 20

Both optimizers see the same fully_shard'ed model and gradients. LARS reduces the squared shard
norms of a whole bucket in one all_reduce; timm's Lars (per-parameter loop) takes each parameter's
norm through DTensor, one implicit all_reduce per norm. Collectives are counted with torch.profiler
(c10d::allreduce_ events, which explicit and DTensor reductions both reach), times are medians, printed by rank 0
side by side.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def model(blocks: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def count_all_reduce(step) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    names = [e.name for e in prof.events()]
    if os.environ.get("LARS_BENCH_DEBUG"):
        print(sorted({n for n in names if "reduce" in n}))
    # Every all_reduce, explicit (dist.all_reduce) or DTensor's (_c10d_functional), reaches c10d::allreduce_ once.
    return sum(1 for n in names if n == "c10d::allreduce_")


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import lars_plugins

    mesh = init_device_mesh("cpu", (world,))
    runners = {}
    for label in ("LARS (bucketed)", "timm Lars (per parameter)"):
        m = model(args.blocks, args.width)
        for layer in m:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
        m(torch.randn(8, args.width)).sum().backward()
        groups = lars_plugins.param_groups(m, weight_decay=1e-4)
        if label.startswith("LARS"):
            opt = lars_plugins.LARS(groups, lr=1.0, momentum=0.9)
        else:
            import timm.optim

            opt = timm.optim.Lars([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
                                  lr=1.0, momentum=0.9)
        runners[label] = opt
    counts = {label: count_all_reduce(opt.step) for label, opt in runners.items()}
    times: dict[str, list[float]] = {label: [] for label in runners}
    for rep in range(args.warmup + args.reps):
        for label, opt in runners.items():
            dist.barrier()
            start = time.perf_counter()
            opt.step()
            dist.barrier()
            if rep >= args.warmup:
                times[label].append(time.perf_counter() - start)
    if rank == 0:
        n = sum(1 for g in groups for p in g["params"])
        print(f"torch {torch.__version__}, {world} processes (gloo, CPU), {args.blocks} blocks of width {args.width}: "
              f"{n} parameter tensors, fully_shard per Linear")
        print(f"{'optimizer':<28}{'all_reduce/step':>16}{'median ms':>12}{'x LARS':>8}")
        base = statistics.median(times["LARS (bucketed)"])
        for label in runners:
            med = statistics.median(times[label])
            print(f"{label:<28}{counts[label]:>16}{med * 1e3:>12.2f}{med / base:>8.2f}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, args), nprocs=2)


if __name__ == "__main__":
    main()
