"""Why LARS's CPU step takes norms with BLAS's dot: speed and accuracy against torch.linalg.vector_norm.

    python benchmarks/norm_paths.py               # 20M-element float32 tensor, and accuracy at 3 sizes

Times are medians of interleaved calls on one tensor; accuracy is the relative error against a
float64 norm of the same float32 values (randn·3 + 1, so every square is positive).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=20_000_000)
    parser.add_argument("--reps", type=int, default=11)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.numel)
    paths = {"vector_norm": lambda t: torch.linalg.vector_norm(t).item(),
             "sqrt(dot)": lambda t: math.sqrt(torch.dot(t, t).item())}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.reps):
        for name, norm in paths.items():
            start = time.perf_counter()
            norm(x)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.numel:,} float32 elements")
    for name, ms in medians.items():
        print(f"  {name:<12} {ms:7.2f} ms  ({ms / medians['sqrt(dot)']:.2f}x dot)")
    print("relative error against a float64 norm:")
    for n in (1_000, 2_400_000, 20_000_000):
        t = torch.randn(n) * 3 + 1
        exact = t.double().norm().item()
        errors = ", ".join(f"{name} {abs(norm(t) - exact) / exact:.1e}" for name, norm in paths.items())
        print(f"  {n:>10,} elements: {errors}")


if __name__ == "__main__":
    main()
