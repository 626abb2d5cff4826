"""Time one optimizer step: lars_plugins.LARS against torch.optim.SGD(foreach) and timm's Lars.

Builds the parameter sets of ResNet-50 and ViT-B/16 (random init, real shapes), gives every optimizer
its own copy with identical gradients, and interleaves the optimizers step by step (so drift in
machine load hits all of them alike). Prints median step times and ratios to SGD(foreach).

    python benchmarks/step_time.py                      # CPU, both models
    python benchmarks/step_time.py --device cuda        # on a GPU
    python benchmarks/step_time.py --models resnet50 --reps 30

Every optimizer gets the same two groups (weights with weight decay; biases and norm parameters
without, excluded from adaptation for LARS) and momentum 0.9, as a real training run would.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch import nn

import lars_plugins

MODELS = {"resnet50": "resnet50", "vit_b16": "vit_base_patch16_224"}


def build_model(name: str) -> nn.Module:
    import timm

    return timm.create_model(MODELS[name], pretrained=False)


def two_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The decay / no-decay split as [(weights), (biases and norms)] with LARS's exclusion flags."""
    return lars_plugins.param_groups(model, weight_decay=weight_decay)


def optimizers(weight_decay: float) -> dict[str, Callable[[list[dict]], torch.optim.Optimizer]]:
    import timm.optim

    def plain(groups: list[dict]) -> list[dict]:
        # torch SGD / timm Lars do not know lars_exclude; timm adapts groups with weight_decay != 0.
        return [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups]

    return {
        "SGD(foreach)": lambda g: torch.optim.SGD(plain(g), lr=0.1, momentum=0.9, foreach=True),
        "LARS(auto)": lambda g: lars_plugins.LARS(g, lr=0.1, momentum=0.9),
        "LARS(single)": lambda g: lars_plugins.LARS(g, lr=0.1, momentum=0.9, foreach=False),
        "LARS(foreach)": lambda g: lars_plugins.LARS(g, lr=0.1, momentum=0.9, foreach=True),
        "timm Lars(loop)": lambda g: timm.optim.Lars(plain(g), lr=0.1, momentum=0.9, foreach=False),
        "timm Lars(foreach)": lambda g: timm.optim.Lars(plain(g), lr=0.1, momentum=0.9, foreach=True),
    }


def bench_model(name: str, device: torch.device, reps: int, warmup: int, weight_decay: float) -> dict[str, float]:
    torch.manual_seed(0)
    reference = build_model(name).to(device)
    grads = {n: torch.randn_like(p) * 1e-2 for n, p in reference.named_parameters()}
    runners = {}
    for label, make in optimizers(weight_decay).items():
        model = build_model(name).to(device)
        model.load_state_dict(reference.state_dict())
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        runners[label] = make(two_groups(model, weight_decay))
    n_params = sum(p.numel() for p in reference.parameters())
    n_tensors = len(list(reference.parameters()))
    print(f"\n{name}: {n_tensors} tensors, {n_params / 1e6:.1f}M parameters, device {device}")

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {label: [] for label in runners}
    for rep in range(warmup + reps):
        for label, opt in runners.items():
            sync()
            start = time.perf_counter()
            opt.step()
            sync()
            if rep >= warmup:
                times[label].append(time.perf_counter() - start)
    medians = {label: statistics.median(t) for label, t in times.items()}
    base = medians["SGD(foreach)"]
    best_timm = min(medians["timm Lars(loop)"], medians["timm Lars(foreach)"])
    print(f"{'optimizer':<20}{'median ms':>12}{'x SGD(foreach)':>16}{'x best timm':>14}")
    for label, median in medians.items():
        print(f"{label:<20}{median * 1e3:>12.2f}{median / base:>16.2f}{median / best_timm:>14.2f}")
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, reps {args.reps} (median)")
    results = {m: bench_model(m, device, args.reps, args.warmup, args.weight_decay) for m in args.models}
    print("\nTargets: LARS(auto) <= 1.2x SGD(foreach), and faster than timm's best path.")
    for model, medians in results.items():
        ratio = medians["LARS(auto)"] / medians["SGD(foreach)"]
        vs_timm = medians["LARS(auto)"] / min(medians["timm Lars(loop)"], medians["timm Lars(foreach)"])
        verdict = "met" if ratio <= 1.2 and vs_timm < 1.0 else "NOT met"
        print(f"  {model}: {ratio:.2f}x SGD(foreach), {vs_timm:.2f}x best timm -> {verdict}")


if __name__ == "__main__":
    main()
