"""LARS at a large global batch under a sharding engine: DDP, FSDP1, FSDP2, FSDP2 over tensor
parallelism or DeepSpeed ZeRO-1/2/3.

    python examples/sharded_large_batch.py --engine zero3             # 2 CPU processes, batch 1024
    python examples/sharded_large_batch.py --engine fsdp1 --processes 4 --epochs 10
    python examples/sharded_large_batch.py --engine fsdp2 --out-dir run   # trust ratios -> run/
    python examples/sharded_large_batch.py --engine fsdp2-tp --processes 4  # dp 2 x tp 2

scikit-learn's bundled digits (real scans, nothing downloaded) and the demo's small CNN. Every
process takes its share of each global batch; the optimizer is ``lars_plugins.LARS`` built as for one
process and handed to the engine, which is all the engines need. Rank 0 prints the test accuracy per
epoch and the whole-parameter trust ratios that ``TrustRatioMonitor`` recorded on every rank, and
writes them to ``trust_ratios.csv``. On GPUs use ``--backend nccl`` and a launcher such as
``torchrun`` or ``deepspeed`` instead of this script's own processes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lars_plugins
from lars_plugins.demo import load_digits, small_cnn
from lars_plugins.distributed import remove_deepspeed_shm_buffers

ENGINES = ["ddp", "fsdp1", "fsdp1-flat", "fsdp2", "fsdp2-tp", "zero1", "zero2", "zero3"]
TP = 2  # fsdp2-tp: tensor-parallel degree (the data-parallel degree is --processes / TP)


def wrap(model: nn.Module, args: argparse.Namespace):
    """(module to call, optimizer, step function taking the loss)."""
    groups = lambda m: lars_plugins.param_groups(m, weight_decay=args.weight_decay)  # noqa: E731
    lars = dict(lr=args.lr, momentum=0.9, trust_coefficient=args.eta)
    if args.engine.startswith("zero"):
        import deepspeed

        config = {"train_micro_batch_size_per_gpu": args.batch // args.processes, "gradient_clipping": 0.0,
                  "zero_optimization": {"stage": int(args.engine[-1])}, "zero_allow_untested_optimizer": True,
                  "steps_per_print": 10**9}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=lars_plugins.LARS(groups(model), **lars),
                                               config=config)
        return engine, engine.optimizer, lambda loss: (engine.backward(loss), engine.step())
    if args.engine == "ddp":
        module = nn.parallel.DistributedDataParallel(model)
    elif args.engine.startswith("fsdp2"):
        from torch.distributed.fsdp import fully_shard

        mesh = None
        if args.engine == "fsdp2-tp":  # torchtitan's layout: tensor parallelism, then FSDP2 over "dp"
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.tensor import Replicate
            from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

            mesh = init_device_mesh("cpu" if args.backend == "gloo" else "cuda", (args.processes // TP, TP),
                                    mesh_dim_names=("dp", "tp"))
            head = str(len(model) - 1)  # the linear head, split by rows over "tp", its output gathered
            parallelize_module(model, mesh["tp"], {head: ColwiseParallel(output_layouts=Replicate())})
            mesh = mesh["dp"]
        for layer in model:
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                fully_shard(layer, mesh=mesh)
        module = fully_shard(model, mesh=mesh)
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        device = {"device_id": torch.device("cpu")} if args.backend == "gloo" else {}
        module = FSDP(model, use_orig_params=args.engine == "fsdp1", **device)
        model = module  # FSDP1: build the optimizer from the wrapped module's parameters
    optimizer = lars_plugins.LARS(groups(model), **lars)

    def step(loss: torch.Tensor) -> None:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return module, optimizer, step


def worker(rank: int, args: argparse.Namespace, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(args.processes), LOCAL_RANK=str(rank), LOCAL_SIZE=str(args.processes))
    torch.set_num_threads(1)
    if args.engine.startswith("zero"):
        import deepspeed

        deepspeed.init_distributed(dist_backend=args.backend, verbose=False)
    else:
        dist.init_process_group(args.backend, rank=rank, world_size=args.processes)
    data = load_digits()
    torch.manual_seed(0)  # the same initial weights on every process
    model = small_cnn()
    module, optimizer, step = wrap(model, args)
    # Names as in the model; the monitor runs on every rank (its norms are collectives).
    monitor = lars_plugins.TrustRatioMonitor(module if args.engine.startswith("fsdp1") else model, optimizer,
                                             every_n_steps=args.record_every)
    tp = TP if args.engine == "fsdp2-tp" else 1
    order = torch.Generator().manual_seed(1)  # the same shuffle on every process
    for epoch in range(1, args.epochs + 1):
        module.train()
        for batch in torch.randperm(len(data.y_train), generator=order).split(args.batch):
            # Every rank steps, the last batch too; the ranks of one tensor-parallel group share a share.
            mine = batch.tensor_split(args.processes // tp)[rank // tp]
            step(nn.functional.cross_entropy(module(data.x_train[mine]), data.y_train[mine]))
        module.eval()
        with torch.no_grad():  # every rank evaluates: sharded forwards are collective
            correct = (module(data.x_test).argmax(1) == data.y_test).float().mean().item()
        if rank == 0:
            print(f"epoch {epoch:2d}  test accuracy {correct:.3f}", flush=True)
    if rank == 0:
        ratios = monitor.history.latest("trust_ratio")
        print(f"{args.engine}: trust ratios of {len(ratios)} adapted layers at step {monitor.history.steps[-1]} "
              "(whole parameters, gathered over all ranks):")
        for name, value in ratios.items():
            print(f"  {name:<12} {value:.3e}")
        if args.out_dir:
            Path(args.out_dir).mkdir(parents=True, exist_ok=True)
            print("history:", monitor.history.to_csv(Path(args.out_dir) / "trust_ratios.csv"))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown, where a still-joinable comm thread can abort the process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=ENGINES, default="zero2")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--backend", default="gloo", help="gloo (CPU) or nccl (GPUs)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1024, help="global batch (all processes together)")
    parser.add_argument("--lr", type=float, default=2.0)
    parser.add_argument("--eta", type=float, default=0.01, help="trust coefficient")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--record-every", type=int, default=2, help="record trust ratios every n steps")
    parser.add_argument("--out-dir", help="write trust_ratios.csv here")
    args = parser.parse_args()
    if args.batch % args.processes:
        parser.error(f"--batch {args.batch} must be a multiple of --processes {args.processes}")
    if args.engine == "fsdp2-tp" and args.processes % TP:
        parser.error(f"--engine fsdp2-tp needs --processes a multiple of {TP} (the tensor-parallel degree)")
    if args.engine.startswith("zero"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if args.backend == "gloo" else "cuda")
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args, port), nprocs=args.processes)
    remove_deepspeed_shm_buffers(port)  # DeepSpeed's CPU all-reduce leaves them in /dev/shm


if __name__ == "__main__":
    main()
