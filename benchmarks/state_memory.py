"""Optimizer state in bytes per parameter, and step time, for each ``state_precision`` of LARS and
LAMB against float32 and against the low-bit optimizers of bitsandbytes and torchao.

Builds the parameter sets of ResNet-50 and ViT-B/16 (random init, real shapes, the usual two groups),
gives every optimizer its own copy with identical random gradients, takes two steps, then counts the
bytes of every tensor in the optimizer's state (the step counts and our last trust ratios, a few
bytes per tensor, are left out; bitsandbytes' 256-entry code tables and torchao's are counted) and
times further steps interleaved (medians), with the peak memory one step allocates beyond the state.

    python benchmarks/state_memory.py                       # CPU, both models
    python benchmarks/state_memory.py --models resnet50 --reps 10
    python benchmarks/state_memory.py --device cuda         # on a GPU

bitsandbytes and torchao are optional (``pip install bitsandbytes torchao``): their rows are skipped,
with the reason printed, where they are missing or refuse the device.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Optional

import torch
from torch import Tensor

import lars_plugins
from step_time import build_model, step_peak_mb, two_groups

Factory = Callable[[list[dict]], torch.optim.Optimizer]
LEFT_OUT = ("step", "trust_ratio")


def plain(groups: list[dict]) -> list[dict]:
    return [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups]


def rows() -> dict[str, tuple[str, Optional[Factory]]]:
    """name -> (the float32 row it is timed against, factory or None where unavailable)."""
    out: dict[str, tuple[str, Optional[Factory]]] = {
        "SGD(fused), momentum": ("SGD(fused), momentum", lambda g: torch.optim.SGD(plain(g), lr=0.1, momentum=0.9,
                                                                                   fused=True)),
        "AdamW(fused)": ("AdamW(fused)", lambda g: torch.optim.AdamW(plain(g), lr=1e-3, fused=True)),
    }
    for precision in ("float32", "bfloat16", "int8"):
        out[f"LARS, {precision}"] = ("LARS, float32", lambda g, p=precision: lars_plugins.LARS(
            g, lr=0.1, momentum=0.9, state_precision=p))
    for precision in ("float32", "bfloat16", "int8"):
        out[f"LAMB, {precision}"] = ("LAMB, float32", lambda g, p=precision: lars_plugins.LAMB(
            g, lr=1e-3, state_precision=p))
    try:
        import bitsandbytes as bnb

        out["bnb LARS8bit"] = ("LARS, float32", lambda g: bnb.optim.LARS8bit(plain(g), lr=0.1, momentum=0.9))
        out["bnb LAMB8bit"] = ("LAMB, float32", lambda g: bnb.optim.LAMB8bit(plain(g), lr=1e-3))
        out["bnb AdamW8bit"] = ("AdamW(fused)", lambda g: bnb.optim.AdamW8bit(plain(g), lr=1e-3))
    except ImportError as err:
        print(f"bitsandbytes rows skipped: {err}")
    try:
        from torchao.optim import AdamW4bit, AdamW8bit, AdamWFp8

        out["torchao AdamW8bit"] = ("AdamW(fused)", lambda g: AdamW8bit(plain(g), lr=1e-3))
        out["torchao AdamW4bit"] = ("AdamW(fused)", lambda g: AdamW4bit(plain(g), lr=1e-3))
        out["torchao AdamWFp8"] = ("AdamW(fused)", lambda g: AdamWFp8(plain(g), lr=1e-3))
    except ImportError as err:
        print(f"torchao rows skipped: {err}")
    return out


def tensor_bytes(value: object) -> int:
    """Bytes of a state value: a tensor, or a tensor subclass (torchao's) by its inner tensors."""
    if not isinstance(value, Tensor):
        return 0
    if type(value) is not Tensor and hasattr(value, "__tensor_flatten__"):
        names, _ = value.__tensor_flatten__()
        return sum(tensor_bytes(getattr(value, name)) for name in names)
    return value.numel() * value.element_size()


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(tensor_bytes(v) for entry in optimizer.state.values() for k, v in entry.items() if k not in LEFT_OUT)


def bench(model_name: str, device: torch.device, reps: int) -> None:
    model = build_model(model_name).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    torch.manual_seed(0)
    grads = [torch.randn_like(p) * 1e-2 for p in model.parameters()]
    runners: dict[str, Callable[[], object]] = {}
    reference: dict[str, str] = {}
    sizes: dict[str, float] = {}
    peaks: dict[str, float] = {}
    for name, (against, factory) in rows().items():
        copy = build_model(model_name).to(device)
        copy.load_state_dict(model.state_dict())
        for p, g in zip(copy.parameters(), grads):
            p.grad = g.clone()
        try:
            optimizer = factory(two_groups(copy, 1e-4))  # type: ignore[misc]
            optimizer.step()
            optimizer.step()
        except Exception as err:  # another library refusing this device: say so, keep the others
            print(f"{name}: skipped ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
            continue
        sizes[name] = state_bytes(optimizer) / n_params
        peaks[name] = step_peak_mb(optimizer.step, device)
        runners[name], reference[name] = optimizer.step, against
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(reps):
        for name, step in runners.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    print(f"\n{model_name}: {n_params / 1e6:.1f}M parameters on {device}, {reps} interleaved steps; state bytes per "
          "parameter (float32 weights take 4), median step, ratio to its float32 counterpart, peak MB a step allocates")
    print("| optimizer | state bytes / param | step ms | × float32 counterpart | peak MB in step |")
    print("|---|---:|---:|---:|---:|")
    for name in runners:
        ms = statistics.median(times[name]) * 1e3
        base = statistics.median(times[reference[name]]) * 1e3 if reference[name] in times else float("nan")
        print(f"| {name} | {sizes[name]:.3f} | {ms:.1f} | {ms / base:.2f} | {peaks[name]:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_b16"], choices=["resnet50", "vit_b16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.models:
        bench(name, device, args.reps)


if __name__ == "__main__":
    main()
