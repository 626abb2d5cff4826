"""LAMB's CPU step against fused AdamW, and the routes tried to bring it closer.

On ResNet-50's or ViT-B/16's parameter set (random gradients and moments), interleaved, medians:

* ``AdamW(fused)``: ``torch._fused_adamw_`` over every tensor, the target's denominator;
* ``LAMB, Numba's loops`` (where Numba is installed: the shipped route then): lars_plugins' CPU path
  with :mod:`lars_plugins.cpu_kernels`: one compiled call over all the tensors; per tensor, one
  parallel loop for the moments, ``u`` (into a buffer) and both squared norms, the ratio, a second
  loop for ``w −= lr·r·u``;
* ``Numba's loops alone``: the same call on a table of the tensors made once before the timing, with
  no optimizer bookkeeping (the table, ratio slots): the floor of that route;
* ``LAMB optimizer, one pass``: ``lars_plugins.LAMB``'s ``step()`` on its own copy of the tensors,
  every one adapted, as a training loop calls it: the group gathered in one pass over its tensors,
  then the counts, then Numba's call (:meth:`lars_plugins.LAMB._step_on_host`);
* ``LAMB, torch kernels``: the same path with Numba's loops off (:mod:`lars_plugins.cpu_directions`):
  per tensor, the fused AdamW kernel at ``lr = wd = 1`` on a scratch buffer (which leaves
  ``−m̂/(√v̂+ε)``), three dot products for ``‖w‖`` and ``‖u‖``, and ``w −= lr·r·u`` through the fused
  SGD kernel; in both, the scratch views advance through a ring of the largest tensor plus 32 MiB;
* ``LAMB, torch kernels, one buffer reused from its start``: the same with one buffer of the largest
  tensor, every tensor's view starting at its first element;
* ``LAMB, copy route``: the route before it: per tensor, a fresh copy of ``w``, the fused AdamW
  kernel on the copy at ``lr = 1`` (which leaves ``w − u``), ``‖w‖``, ``‖u‖``, and
  ``w += lr·r·(copy − w)``;
* ``LAMB, chunked``: the copy route per block of ``--chunk`` elements of a tensor (``‖u‖``
  accumulated over the blocks, the update after the last), so that the copy, the kernel, the
  subtraction and the norms of a block run while it is in cache;
* ``LAMB, compiled`` (``--compile``): one ``torch.compile``'d function per tensor computing the
  moments, ``u`` into a scratch and both squared norms in one loop, then ``w -= lr·r·u``;

then where the torch-kernels step spends its time (torch.profiler, by operator).

    python benchmarks/lamb_cpu_routes.py --model resnet50
    python benchmarks/lamb_cpu_routes.py --model vit_b16 --compile
    NUMBA_THREADING_LAYER=workqueue python benchmarks/lamb_cpu_routes.py   # Numba's call on its fallback layer
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from typing import Callable

import torch

import lars_plugins
from lars_plugins import cpu_kernels
from lars_plugins.cpu_directions import Scratch
from lars_plugins.lamb_rule import _host_lamb
from lars_plugins.tensor_lists import host_norm
from step_time import build_model, without_numba

BETAS, EPS, DECAY = (0.9, 0.999), 1e-6, 0.01


def loops_alone(params: list[torch.Tensor], grads: list[torch.Tensor], m: list[torch.Tensor],
                v: list[torch.Tensor], step: torch.Tensor) -> Callable[[], None]:
    """Numba's call over every tensor, its table made once, without the optimizer's bookkeeping."""
    batch = cpu_kernels.AdamWBatch(params, grads, m, v, None, [step.item()] * len(params), beta1=BETAS[0],
                                   beta2=BETAS[1], eps=EPS, weight_decay=DECAY, maximize=False)
    scratch, ratio = Scratch(), cpu_kernels.LambRatio(None, False)
    return lambda: batch.step(1e-9, ratio, scratch) and None


def optimizer_step(params: list[torch.Tensor], grads: list[torch.Tensor]) -> Callable[[], None]:
    """``lars_plugins.LAMB.step`` over a copy of the tensors (every one adapted), the gradients given."""
    copies = [p.clone() for p in params]
    for p, g in zip(copies, grads):
        p.grad = g
    opt = lars_plugins.LAMB(copies, lr=1e-9, betas=BETAS, eps=EPS, weight_decay=DECAY, exclude_bias_and_norm=False)
    return lambda: opt.step() and None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", choices=["resnet50", "vit_b16"])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--chunk", type=int, default=1 << 18)
    parser.add_argument("--compile", action="store_true", help="add the torch.compile'd route (needs a C++ compiler)")
    args = parser.parse_args()
    torch.manual_seed(0)
    params = [p.detach().clone() for p in build_model(args.model).parameters()]
    grads = [torch.randn_like(p) * 1e-2 for p in params]
    step = torch.tensor(5.0)
    c1, r2 = 1 - BETAS[0] ** 5, math.sqrt(1 - BETAS[1] ** 5)

    def moments() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [torch.randn_like(p) * 1e-3 for p in params], [torch.rand_like(p) * 1e-5 for p in params]

    m1, v1 = moments()
    m2, v2 = moments()
    m3, v3 = moments()
    m5, v5 = moments()
    m6, v6 = moments()
    m7, v7 = moments()
    ring, one_buffer = Scratch(), Scratch(reuse_distance=0)  # kept from step to step, as an optimizer keeps it
    numba_ring = Scratch()
    slots = [torch.zeros(()) for _ in params]
    scratch = torch.empty(max(p.numel() for p in params))

    def adamw() -> None:
        torch._fused_adamw_(params, grads, m1, v1, [], [step] * len(params), lr=1e-9, beta1=BETAS[0], beta2=BETAS[1],
                            weight_decay=DECAY, eps=EPS, amsgrad=False, maximize=False)

    def torch_kernels(scratch: Scratch = ring, m: list[torch.Tensor] = m2, v: list[torch.Tensor] = v2) -> None:
        without_numba(lambda: lamb_step(scratch, m, v))()

    def numba_loops() -> None:
        lamb_step(numba_ring, m7, v7)

    def lamb_step(scratch: Scratch, m: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        _host_lamb([(w, g, mi, vi, s, step) for w, g, mi, vi, s in zip(params, grads, m, v, slots)], lr=1e-9,
                   beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=DECAY, bias_correction=True,
                   weight_norm_bounds=None, trust_clip=False, maximize=False, scratch=scratch)

    def one_buffer_route() -> None:
        torch_kernels(one_buffer, m6, v6)

    def copy_route() -> None:
        for w, g, m, v in zip(params, grads, m5, v5):
            w_norm = host_norm(w)
            s = torch.empty_like(w)
            s.copy_(w)
            torch._fused_adamw_([s], [g], [m], [v], [], [step], lr=1.0, beta1=BETAS[0], beta2=BETAS[1],
                                weight_decay=DECAY, eps=EPS, amsgrad=False, maximize=False)
            s.sub_(w)
            w.add_(s, alpha=1e-9 * w_norm / host_norm(s))
            del s

    def chunked() -> None:
        for w, g, m, v in zip(params, grads, m3, v3):
            flat = [t.view(-1) for t in (w, g, m, v)]
            s = scratch[:w.numel()]
            w_sq = u_sq = 0.0
            for a in range(0, w.numel(), args.chunk):
                b = min(w.numel(), a + args.chunk)
                wc, gc, mc, vc = (t[a:b] for t in flat)
                sc = s[a:b]
                sc.copy_(wc)
                torch._fused_adamw_([sc], [gc], [mc], [vc], [], [step], lr=1.0, beta1=BETAS[0], beta2=BETAS[1],
                                    weight_decay=DECAY, eps=EPS, amsgrad=False, maximize=False)
                w_sq += host_norm(wc) ** 2
                sc.sub_(wc)
                u_sq += host_norm(sc) ** 2
            flat[0].add_(s, alpha=1e-9 * math.sqrt(w_sq) / math.sqrt(u_sq))

    routes = {"AdamW(fused)": adamw}
    if cpu_kernels.available(torch.float32):
        routes["LAMB, Numba's loops"] = numba_loops
        routes["Numba's loops alone"] = loops_alone(params, grads, *moments(), step)
        routes["LAMB optimizer, one pass"] = optimizer_step(params, grads)
    elif os.environ.get("NUMBA_THREADING_LAYER") == "workqueue":
        # The layer the product refuses (cpu_kernels.available warned above): its call alone, to show why.
        routes["Numba's loops alone, workqueue layer"] = loops_alone(params, grads, *moments(), step)
    else:
        print("Numba's loops: not available here (pip install 'lars_plugins[numba]'); their row is left out")
    routes.update({"LAMB, torch kernels": torch_kernels,
                   "LAMB, torch kernels, one buffer reused from its start": one_buffer_route,
                   "LAMB, copy route": copy_route, f"LAMB, chunked ({args.chunk})": chunked})
    if args.compile:
        def moments_and_norms(w, g, m, v, u):  # type: ignore[no-untyped-def]
            m.lerp_(g, 1 - BETAS[0])
            v.mul_(BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])
            d = (m / c1) / (v.sqrt() / r2 + EPS) + DECAY * w
            u.copy_(d)
            return (d * d).sum(), (w * w).sum()

        kernel = torch.compile(moments_and_norms, dynamic=True)
        m4, v4 = moments()

        def compiled() -> None:
            for w, g, m, v in zip(params, grads, m4, v4):
                u = scratch[:w.numel()].view_as(w)
                u_sq, w_sq = kernel(w, g, m, v, u)
                w.add_(u, alpha=-1e-9 * math.sqrt(w_sq.item()) / math.sqrt(u_sq.item()))

        start = time.perf_counter()
        compiled()
        print(f"torch.compile: first call {time.perf_counter() - start:.1f} s")
        routes["LAMB, compiled per tensor"] = compiled
    for route in routes.values():
        for _ in range(3):
            route()
    times: dict[str, list[float]] = {name: [] for name in routes}
    for _ in range(args.reps):
        for name, route in routes.items():
            start = time.perf_counter()
            route()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["AdamW(fused)"])
    try:
        import numba

        layer = f", Numba's {numba.threading_layer()} threading layer"
    except (ImportError, ValueError):  # (ValueError: no parallel loop ran, so no layer was chosen)
        layer = ""
    print(f"\n{args.model}, {sum(p.numel() for p in params) / 1e6:.1f}M parameters, {torch.get_num_threads()} threads, "
          f"{args.reps} interleaved steps{layer}")
    print("| route | median ms | × fused AdamW |\n|---|---:|---:|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts) * 1e3:.2f} | {statistics.median(ts) / base:.2f} |")
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(5):
            torch_kernels()
    print("\nThe torch-kernels step by operator (5 steps):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
