"""Evidence on real images: test accuracy against batch size for SGD and LARS, with and without warm-up,
and LARS's sensitivity to the trust coefficient η.

    python benchmarks/large_batch.py --quick            # minutes: 2 batch sizes, 1 seed, 3 η values
    python benchmarks/large_batch.py                     # the numbers in docs/results.md (16 min, 2 cores)

Data: scikit-learn's bundled digits (1,347 train / 450 test, as in `lars-plugins demo`); model: the
demo's small CNN with BatchNorm; a fixed budget of epochs (15) for every batch size (so larger batches get
fewer steps, the large-batch regime of the paper). Each method has one rule for every batch size, no
per-batch tuning:

* SGD: momentum 0.9, lr = 0.05 x B/32 (linear scaling), poly(2) decay;
* SGD + warm-up: the same with a linear warm-up over the first 10% of steps;
* LARS: momentum 0.9, η = 0.001, γ = 16 x B/1024 (linear scaling of the demo's setting), poly(2) decay,
  biases and BatchNorm excluded;
* LARS + warm-up: the same with the same warm-up.

Weight decay 5e-4 for all. Writes results.csv (one row per run), summary.csv (mean and std), eta.csv,
accuracy_vs_batch.png, accuracy_vs_eta.png and trust_ratio_heatmap.png (LARS, largest batch, seed 0).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

import lars_plugins
from lars_plugins.demo import accuracy, load_digits, small_cnn

METHODS = ("SGD", "SGD + warm-up", "LARS", "LARS + warm-up")
WARMUP_FRACTION = 0.1


def train(method: str, batch_size: int, seed: int, epochs: int, trust_coefficient: float = 1e-3,
          monitor_out: Optional[Path] = None) -> float:
    """Train once from seed ``seed``; return the test accuracy at the end."""
    data = load_digits(seed=0)  # one split for every run; the seed varies the init and the batch order
    torch.manual_seed(seed)
    model = small_cnn()
    groups = lars_plugins.param_groups(model, weight_decay=5e-4)
    if method.startswith("LARS"):
        optimizer: torch.optim.Optimizer = lars_plugins.LARS(
            groups, lr=16.0 * batch_size / 1024, momentum=0.9, trust_coefficient=trust_coefficient)
    else:
        plain = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups]
        optimizer = torch.optim.SGD(plain, lr=0.05 * batch_size / 32, momentum=0.9)
    n = len(data.y_train)
    total = epochs * -(-n // batch_size)
    warmup = max(1, round(WARMUP_FRACTION * total)) if method.endswith("warm-up") else 0
    scheduler = lars_plugins.WarmupDecayLR(optimizer, total_steps=total, warmup_steps=warmup, decay="poly")
    monitor = lars_plugins.TrustRatioMonitor(model, optimizer, every_n_steps=1, metrics=["trust_ratio"]) \
        if monitor_out is not None else None
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=generator).split(batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            optimizer.step()
            scheduler.step()
    if monitor is not None and monitor_out is not None:
        from lars_plugins.plot import save_plot

        save_plot(monitor.history, monitor_out, kind="heatmap",
                  title=f"{method}, batch {batch_size}, seed {seed}: trust ratio per layer and step")
    acc = accuracy(model, data.x_test, data.y_test)
    return acc if acc == acc else 0.0  # a diverged run (NaN) counts as 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 batch sizes, 1 seed, 3 η values, 5 epochs")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    args = parser.parse_args()
    epochs = args.epochs or (5 if args.quick else 15)
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    batches = [64, 1347] if args.quick else [32, 64, 128, 256, 512, 1024, 1347]
    etas = [1e-3, 1e-2, 1e-1] if args.quick else [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    eta_batch = batches[-2] if not args.quick else batches[-1]
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()

    rows = []
    for batch in batches:
        for method in METHODS:
            for seed in seeds:
                acc = train(method, batch, seed, epochs)
                rows.append({"method": method, "batch_size": batch, "seed": seed, "epochs": epochs, "test_acc": acc})
                print(f"{method:<15} batch {batch:>5} seed {seed}: {acc:.1%}  [{time.perf_counter() - start:.0f} s]",
                      flush=True)
    write_csv(args.out / "results.csv", rows)
    summary = []
    for batch in batches:
        for method in METHODS:
            accs = [r["test_acc"] for r in rows if r["method"] == method and r["batch_size"] == batch]
            summary.append({"method": method, "batch_size": batch, "runs": len(accs), "mean": statistics.mean(accs),
                            "std": statistics.stdev(accs) if len(accs) > 1 else 0.0})
    write_csv(args.out / "summary.csv", summary)

    eta_rows = []
    for eta in etas:
        accs = [train("LARS", eta_batch, seed, epochs, trust_coefficient=eta) for seed in seeds]
        eta_rows.append({"eta": eta, "batch_size": eta_batch, "runs": len(accs), "mean": statistics.mean(accs),
                         "std": statistics.stdev(accs) if len(accs) > 1 else 0.0})
        print(f"LARS η={eta:g} batch {eta_batch}: {statistics.mean(accs):.1%}", flush=True)
    write_csv(args.out / "eta.csv", eta_rows)
    train("LARS", batches[-1], 0, epochs, monitor_out=args.out / "trust_ratio_heatmap.png")
    plot(summary, eta_rows, args.out, epochs, len(seeds))
    print_table(summary, batches)
    print(f"wrote {args.out}/results.csv, summary.csv, eta.csv and three PNGs [{time.perf_counter() - start:.0f} s]")


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def print_table(summary: list[dict], batches: list[int]) -> None:
    print("\n| batch | " + " | ".join(METHODS) + " |")
    print("|---:|" + "---:|" * len(METHODS))
    for batch in batches:
        cells = [next(s for s in summary if s["method"] == m and s["batch_size"] == batch) for m in METHODS]
        print(f"| {batch} | " + " | ".join(f"{c['mean']:.1%} ± {c['std']:.1%}" for c in cells) + " |")


def plot(summary: list[dict], eta_rows: list[dict], out: Path, epochs: int, seeds: int) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for method, style in zip(METHODS, ("o--", "s--", "o-", "s-")):
        pts = [s for s in summary if s["method"] == method]
        ax.errorbar([p["batch_size"] for p in pts], [p["mean"] for p in pts], yerr=[p["std"] for p in pts],
                    fmt=style, capsize=3, label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (1,347 = full batch)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"digits, small CNN, {epochs} epochs, mean ± std of {seeds} seeds")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(out / "accuracy_vs_batch.png", dpi=110)

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    ax.errorbar([r["eta"] for r in eta_rows], [r["mean"] for r in eta_rows], yerr=[r["std"] for r in eta_rows],
                fmt="o-", capsize=3)
    ax.set_xscale("log")
    ax.set_xlabel("trust coefficient η")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"LARS at batch {eta_rows[0]['batch_size']}, γ = 16 x B/1024, {epochs} epochs")
    ax.grid(True, alpha=0.3)
    fig.savefig(out / "accuracy_vs_eta.png", dpi=110)


if __name__ == "__main__":
    main()
