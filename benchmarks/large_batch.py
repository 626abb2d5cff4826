"""Evidence in the large-batch regime on Fashion-MNIST: where linear scaling breaks, what LARS does
about it, how it compares with a tuned Nesterov baseline, and how sensitive it is to η and γ·η.

    python benchmarks/large_batch.py batch     # table 1 (accuracy vs batch, 5 methods) and table 3 + heatmaps
    python benchmarks/large_batch.py eta       # table 2 (η and γ·η sweeps at two batch sizes)
    python benchmarks/large_batch.py ranger    # table 7 (LARS + Ranger vs LARS vs Ranger, tuned baselines)
    python benchmarks/large_batch.py all       # all three
    python benchmarks/large_batch.py pilot     # the pilot LARS's γ rule was anchored on (table 0)
    python benchmarks/large_batch.py lamb      # table 9: LAMB, AdamW and LARS, each tuned alike, 1K-32K
    python benchmarks/large_batch.py precision # table 13: LARS and LAMB with bfloat16 and int8 state, 8K
    python benchmarks/large_batch.py protocol  # table 10: LARS vs Nesterov, one search budget, 1K-32K
    python benchmarks/large_batch.py protocol --epochs 20 --trials 12 --batches 8192 16384 32768
                                               # table 11: the same with a 4x longer budget
    python benchmarks/large_batch.py figures --out docs/images
                                               # the figures again from the committed CSVs in docs/data
    add --quick for a smoke run (minutes; what the tests run)

Data: Fashion-MNIST from a local copy (Debian's dataset-fashion-mnist, or torchvision's layout under
--data-dir); --download lets torchvision fetch it into --data-dir. Model: an MLP 784-512-512-10 with
BatchNorm (lars_plugins.recipes.mlp_bn). Budget: 5 epochs at every batch size, so a batch of 8,192
is 40 steps. Momentum 0.9, weight decay 5e-4 on weight matrices only, the paper's poly(2) decay per
step; warm-up, where used, is linear over the first epoch (20% of the budget).

The LR rule of every method (B = batch size):

* SGD: lr = 0.05 · B/128 (linear scaling; 0.05 is a good LR at B = 128), no warm-up;
* SGD + warm-up: the same with warm-up;
* Nesterov + warm-up, tuned: lr picked per batch size from 0.0125 · 2^k (k = 0..8) by accuracy on a
  held-out split (50,000 train / 10,000 validation images of the training set, seed 0);
* LARS: η = 0.001, γ = 2 · √(B/128) (square-root scaling), no warm-up;
* LARS + warm-up: the same with warm-up.

Table 7 (the Ranger lineage), without warm-up, at two large batch sizes:

* Ranger: Lookahead(RAdam) with Gradient Centralization, RAdam's LR tuned per B on held-out data;
* LARS + Ranger: Lookahead(Layerwise(RAdam)) with Gradient Centralization, η = 0.001, γ·η tuned the same way;
* LARS: the rule above (η = 0.001, γ = 2·√(B/128));
* Nesterov + warm-up, tuned: as in table 1 (the tuned baseline of the regime).

Tuning, the pilot and the η sweeps use the held-out split only; the test set is used for tables 1, 7 and 9
alone.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from lars_plugins import TrustRatioHistory, TrustRatioMonitor
from lars_plugins.demo.datasets import find_fashion_mnist, load_fashion_mnist
from lars_plugins.recipes import Recipe, RunResult, lars_sqrt_lr, mlp_bn, sgd_linear_lr, train

EPOCHS = 5
WARMUP_EPOCHS = 1.0
TUNING_GRID = [0.0125 * 2**k for k in range(9)]
ETAS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
PRODUCTS = [1e-3 * 2**k for k in range(-2, 6)]  # γ·η from 2.5e-4 to 3.2e-2
RANGER_LRS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]  # RAdam's LR
LARS_RANGER_PRODUCTS = [2.5e-3, 5e-3, 1e-2, 2e-2, 4e-2, 8e-2]  # γ·η of LARS + Ranger
# The pilot: γ per batch size at η = 0.001, one seed, held-out split. The rule γ = 2·√(B/128) was
# anchored on its large-batch end.
PILOT = {128: [1.0, 2.0, 4.0, 8.0], 8192: [4.0, 8.0, 16.0, 32.0]}
# Table 9: each method tuned over its own 7-point grid (steps of 2-2.5x) times warm-up {none, 1 epoch},
# 14 runs of seed 0 on the held-out split; weight decay 0.01 on weight matrices for all three.
ADAM_FAMILY_GRIDS = {
    "AdamW": ("adamw", [1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1]),  # the LR
    "LAMB": ("lamb", [1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1]),  # the LR: a layer's relative step
    "LARS": ("lars", [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]),  # γ at η = 0.001
}
LAMB_STUDY_BATCHES = [1024, 8192, 16384, 32768]
LAMB_STUDY_DECAY = 0.01
# Tables 10-11: Nesterov and LARS searched alike, by the same quasi-random points over the peak LR (log-
# uniform over each method's range), warm-up length, its starting LR and momentum, on the held-out split.
PROTOCOL_BATCHES = [1024, 4096, 8192, 16384, 32768]
PROTOCOL_TRIALS = 24
PROTOCOL_RANGES = {"Nesterov": ("nesterov", (0.0125, 3.2)),  # the LR (TUNING_GRID's range)
                   "LARS": ("lars", (1.0, 100.0))}  # γ at η = 0.001 (table 9's range)
WARMUPS = (0.0, 0.25, 1.0)  # epochs
WARMUP_STARTS = (0.01, 0.1, 0.3)  # the first LR, as a fraction of the peak
MOMENTA = (0.8, 0.9, 0.95)


@dataclass(frozen=True)
class Method:
    name: str
    rule: str
    recipe: Callable[[int], Recipe]  # batch size -> recipe (the tuned method gets its LR later)


METHODS = [
    Method("SGD", "lr = 0.05·B/128, no warm-up", lambda b: Recipe("sgd", sgd_linear_lr(b))),
    Method("SGD + warm-up", "lr = 0.05·B/128, 1 epoch warm-up",
           lambda b: Recipe("sgd", sgd_linear_lr(b), WARMUP_EPOCHS)),
    Method("Nesterov + warm-up, tuned", "lr tuned per B on held-out data, 1 epoch warm-up",
           lambda b: Recipe("nesterov", TUNING_GRID[0], WARMUP_EPOCHS)),
    Method("LARS", "η = 0.001, γ = 2·√(B/128), no warm-up", lambda b: Recipe("lars", lars_sqrt_lr(b))),
    Method("LARS + warm-up", "η = 0.001, γ = 2·√(B/128), 1 epoch warm-up",
           lambda b: Recipe("lars", lars_sqrt_lr(b), WARMUP_EPOCHS)),
]
TUNED = METHODS[2].name


@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor  # held out of the training set, for tuning and sweeps
    y_val: torch.Tensor
    x_fit: torch.Tensor  # the rest of the training set
    y_fit: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    source: Path


def load(data_dir: Optional[Path], download: bool, subset: Optional[int]) -> Data:
    split = load_fashion_mnist(data_dir, download=download)
    x, y = split.x_train, split.y_train
    if subset is not None:  # quick mode: a smaller but still real training set
        x, y = x[:subset], y[:subset]
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_val = len(y) // 6  # 10,000 of 60,000
    val, fit = perm[:n_val], perm[n_val:]
    return Data(x, y, x[val], y[val], x[fit], y[fit], split.x_test, split.y_test, split.source)


def run(recipe: Recipe, x: torch.Tensor, y: torch.Tensor, eval_set: tuple, batch: int, seed: int, epochs: int) -> float:
    return run_result(recipe, x, y, eval_set, batch, seed, epochs).accuracy


def run_result(recipe: Recipe, x: torch.Tensor, y: torch.Tensor, eval_set: tuple, batch: int, seed: int,
               epochs: int) -> RunResult:
    torch.manual_seed(seed)  # the same initial weights for every method at a seed
    model = mlp_bn()
    return train(model, recipe, x, y, batch_size=batch, epochs=epochs, seed=seed, eval_set=eval_set)


def recorded_run(recipe: Recipe, x: torch.Tensor, y: torch.Tensor, batch: int, seed: int,
                 epochs: int) -> TrustRatioHistory:
    """One run like :func:`run`, with the effective LR and both norms of every layer at every step."""
    torch.manual_seed(seed)
    model = mlp_bn()
    monitors: list[TrustRatioMonitor] = []
    train(model, recipe, x, y, batch_size=batch, epochs=epochs, seed=seed,
          on_start=lambda optimizer: monitors.append(TrustRatioMonitor(
              model, optimizer, every_n_steps=1, metrics=("effective_lr", "weight_norm", "grad_norm"))))
    return monitors[0].history


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


# Student's t at 97.5% for n - 1 degrees of freedom (n = 2..10): the half-width of a 95% interval of a
# mean of n runs is T975[n]·s/√n.
T975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


def interval95(values: list[float]) -> float:
    """Half-width of the 95% t-interval of the mean of ``values`` (NaN for fewer than 2)."""
    n = len(values)
    return T975[n] * statistics.stdev(values) / math.sqrt(n) if n in T975 else math.nan


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


class Clock:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __str__(self) -> str:
        return f"[{time.perf_counter() - self.start:.0f} s]"


def machine() -> str:
    return (f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads, Python {platform.python_version()}")


# --- table 1: accuracy against batch size; table 3: LARS vs warm-up -----------------------------

def batch_study(data: Data, batches: list[int], seeds: list[int], epochs: int, grid: list[float], out: Path,
                clock: Clock) -> None:
    tuned_lr: dict[int, float] = {}
    tuning_rows = []
    for batch in batches:
        scores = {}
        for lr in grid:
            scores[lr] = run(Recipe("nesterov", lr, WARMUP_EPOCHS), data.x_fit, data.y_fit, (data.x_val, data.y_val),
                             batch, 0, epochs)
            tuning_rows.append({"batch_size": batch, "lr": lr, "val_acc": scores[lr]})
        tuned_lr[batch] = max(scores, key=lambda lr: scores[lr])
        print(f"tuning Nesterov at batch {batch}: " + ", ".join(f"{lr:g}: {a:.1%}" for lr, a in scores.items())
              + f" -> lr {tuned_lr[batch]:g} {clock}", flush=True)
    write_csv(out / "tuning.csv", tuning_rows)

    rows = []
    for batch in batches:
        for method in METHODS:
            recipe = method.recipe(batch)
            if method.name == TUNED:
                recipe = recipe.with_lr(tuned_lr[batch])
            for seed in seeds:
                acc = run(recipe, data.x_train, data.y_train, (data.x_test, data.y_test), batch, seed, epochs)
                rows.append({"method": method.name, "batch_size": batch, "seed": seed, "epochs": epochs,
                             "lr": recipe.lr, "test_acc": acc})
                print(f"{method.name:<26} batch {batch:>5} seed {seed} lr {recipe.lr:<7.4g}: {acc:.1%} {clock}",
                      flush=True)
    write_csv(out / "batch.csv", rows)

    summary = {(m.name, b): mean_std([r["test_acc"] for r in rows if r["method"] == m.name and r["batch_size"] == b])
               for m in METHODS for b in batches}
    print(f"\nTable 1: test accuracy, mean ± std of {len(seeds)} seeds, {epochs} epochs at every batch size")
    print("\n| batch | " + " | ".join(m.name for m in METHODS) + " | tuned lr |")
    print("|---:|" + "---:|" * (len(METHODS) + 1))
    for b in batches:
        print(f"| {b} | " + " | ".join(f"{summary[m.name, b][0]:.1%} ± {summary[m.name, b][1]:.1%}" for m in METHODS)
              + f" | {tuned_lr[b]:g} |")
    print("\nLR rules: " + "; ".join(f"{m.name}: {m.rule}" for m in METHODS))

    # Table 3: where SGD without warm-up loses >= 5 points against its own smallest-batch result.
    reference = summary["SGD", batches[0]][0]
    broken = [b for b in batches if reference - summary["SGD", b][0] >= 0.05]
    print(f"\nTable 3: batch sizes where SGD without warm-up loses >= 5 points (vs {reference:.1%} at "
          f"batch {batches[0]}): {broken or 'none'}")
    if broken:
        cols = ["SGD", "SGD + warm-up", "LARS", "LARS + warm-up"]
        print("\n| batch | neither (SGD) | warm-up alone | LARS alone | both |\n|---:|---:|---:|---:|---:|")
        for b in broken:
            print(f"| {b} | " + " | ".join(f"{summary[c, b][0]:.1%} ± {summary[c, b][1]:.1%}" for c in cols) + " |")
    heatmap_batch = broken[-1] if broken else batches[-1]
    heatmaps(data, heatmap_batch, epochs, out, clock)
    plot_batch(rows, out)


def heatmaps(data: Data, batch: int, epochs: int, out: Path, clock: Clock) -> None:
    """The four runs of table 3 at one batch size, seed 0, every step recorded: effective LR and
    relative step per layer, side by side on shared colour scales."""
    histories = {method.name: relative_steps(recorded_run(method.recipe(batch), data.x_train, data.y_train, batch,
                                                          0, epochs))
                 for method in METHODS if method.name != TUNED}
    heatmap_rows = [{"method": name, "batch_size": batch, "seed": 0, "step": step, "layer": layer, "effective_lr": lr,
                     "relative_step": rel} for name, h in histories.items() for step, layer, lr, rel in h.rows()]
    write_csv(out / "heatmap_runs.csv", heatmap_rows)
    plot_heatmaps(heatmap_rows, out)
    first_epoch = -(-len(data.y_train) // batch)
    print(f"\nTable 3b: first epoch ({first_epoch} steps) at batch {batch}, seed 0, per weight matrix: mean effective "
          "LR, and mean / max relative step lr_eff·‖g‖/‖w‖")
    layers = [name for name in next(iter(histories.values())).layers if name.endswith("weight") and "fc" in name]
    print("\n| run | " + " | ".join(layers) + " |\n|---|" + "---|" * len(layers))
    for name, h in histories.items():
        cells = []
        for layer in layers:
            j = h.layers.index(layer)
            lr, rel = h.effective_lr[j][:first_epoch], h.relative_step[j][:first_epoch]
            cells.append(f"lr {statistics.mean(lr):.3g}; step {statistics.mean(rel):.3g} / {max(rel):.3g}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"heatmaps of the four runs at batch {batch}: {out / 'warmup_vs_lars_heatmaps.png'} {clock}")


@dataclass
class LayerSteps:
    steps: list[int]
    layers: list[str]
    effective_lr: list[list[float]]  # [layer][step]
    relative_step: list[list[float]]  # effective LR · ‖g‖ / ‖w‖: how far one step moves the layer

    def rows(self):
        for i, step in enumerate(self.steps):
            for j, layer in enumerate(self.layers):
                yield step, layer, self.effective_lr[j][i], self.relative_step[j][i]

    @classmethod
    def from_rows(cls, rows: list[dict]) -> "LayerSteps":
        """The inverse of :meth:`rows`, from one run's rows of heatmap_runs.csv (strings or numbers)."""
        steps = list(dict.fromkeys(int(r["step"]) for r in rows))
        layers = list(dict.fromkeys(r["layer"] for r in rows))
        cell = {(int(r["step"]), r["layer"]): (float(r["effective_lr"]), float(r["relative_step"])) for r in rows}
        return cls(steps, layers, [[cell[s, name][0] for s in steps] for name in layers],
                   [[cell[s, name][1] for s in steps] for name in layers])


def relative_steps(history: TrustRatioHistory) -> LayerSteps:
    steps, layers, lr = history.matrix("effective_lr")
    _, _, w = history.matrix("weight_norm")
    _, _, g = history.matrix("grad_norm")
    rel = [[a * gn / wn if wn > 0 else math.nan for a, gn, wn in zip(*layer)] for layer in zip(lr, g, w)]
    return LayerSteps(steps, layers, lr, rel)


def plot_heatmaps(rows: list[dict], out: Path) -> None:
    """warmup_vs_lars_heatmaps.png from the rows of heatmap_runs.csv (as written, or read back)."""
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    names = list(dict.fromkeys(r["method"] for r in rows))
    histories = {name: LayerSteps.from_rows([r for r in rows if r["method"] == name]) for name in names}
    batch = int(rows[0]["batch_size"])
    fig = Figure(figsize=(4.2 * len(names), 6.5), layout="constrained")
    axes = fig.subplots(2, len(names), sharey=True)
    for row, (field, label) in enumerate((("effective_lr", "effective LR (lr · trust ratio)"),
                                          ("relative_step", "relative step  lr_eff · ‖g‖ / ‖w‖"))):
        values = [np.array(getattr(histories[n], field), dtype=float) for n in names]
        positive = np.concatenate([v[v > 0].ravel() for v in values])
        # 1st to 99th percentile: a few first-step outliers (a zero bias's infinite relative step)
        # would otherwise flatten the contrast where the runs differ.
        norm = LogNorm(vmin=np.percentile(positive, 1), vmax=np.percentile(positive, 99), clip=True)
        for col, (name, data) in enumerate(zip(names, values)):
            ax = axes[row, col]
            h = histories[name]
            mesh = ax.pcolormesh(np.arange(len(h.steps) + 1) - 0.5, np.arange(len(h.layers) + 1), data, norm=norm,
                                 cmap="viridis", shading="flat")
            ax.set_title(name if row == 0 else "", fontsize=10)
            ax.set_xlabel("step")
            if col == 0:
                ax.set_yticks(np.arange(len(h.layers)) + 0.5, h.layers, fontsize=7)
        fig.colorbar(mesh, ax=list(axes[row]), label=label)
    axes[0, 0].invert_yaxis()  # input layer at the top (the y axis is shared by all panels)
    fig.suptitle(f"Fashion-MNIST, batch {batch}, seed 0: per-layer effective LR and relative step of each run")
    fig.savefig(out / "warmup_vs_lars_heatmaps.png", dpi=100)


def plot_batch(rows: list[dict], out: Path) -> None:
    """accuracy_vs_batch.png from the per-run rows of batch.csv (as written, or read back)."""
    from matplotlib.figure import Figure

    batches = sorted({int(r["batch_size"]) for r in rows})
    seeds = len({int(r["seed"]) for r in rows})
    epochs = int(rows[0]["epochs"])
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    for method, style in zip(METHODS, ("o--", "s--", "^-.", "o-", "s-")):
        cells = [mean_std([float(r["test_acc"]) for r in rows if r["method"] == method.name
                           and int(r["batch_size"]) == b]) for b in batches]
        ax.errorbar(batches, [m for m, _ in cells], yerr=[s for _, s in cells], fmt=style, capsize=3,
                    label=method.name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Fashion-MNIST, MLP with BatchNorm, {epochs} epochs, mean ± std of {seeds} seeds")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(out / "accuracy_vs_batch.png", dpi=110)


# --- table 2: η and γ·η ---------------------------------------------------------------------------

def eta_study(data: Data, batches: list[int], seeds: list[int], epochs: int, etas: list[float],
              products: list[float], out: Path, clock: Clock) -> None:
    """Two sweeps per batch size, on the held-out split: η at the rule's γ (so γ·η moves with η and
    the excluded biases and BatchNorm keep their LR γ), and γ·η at η = 0.001 (γ moves, and the
    excluded parameters' LR with it). Where the curves agree, γ·η is the only knob that matters."""
    runs: list[dict] = []
    for batch in batches:
        gamma = lars_sqrt_lr(batch)
        settings = [("eta", eta, gamma) for eta in etas] + [("gamma", 1e-3, p / 1e-3) for p in products]
        for sweep, eta, g in settings:
            accs = [run(Recipe("lars", g, trust_coefficient=eta), data.x_fit, data.y_fit, (data.x_val, data.y_val),
                        batch, seed, epochs) for seed in seeds]
            runs += [{"batch_size": batch, "epochs": epochs, "sweep": sweep, "eta": eta, "gamma": g,
                      "gamma_eta": g * eta, "seed": seed, "val_acc": acc} for seed, acc in zip(seeds, accs)]
            mean, std = mean_std(accs)
            print(f"batch {batch:>5} η {eta:<7g} γ {g:<8.4g} γ·η {g * eta:<9.3g}: {mean:.1%} ± {std:.1%} {clock}",
                  flush=True)
    write_csv(out / "eta.csv", runs)
    rows = eta_points(runs)
    print(f"\nTable 2: LARS validation accuracy (held-out 10,000), mean ± std of {len(seeds)} seeds, {epochs} epochs")
    for batch in batches:
        for sweep, label in (("eta", f"η at γ = {lars_sqrt_lr(batch):.3g}"), ("gamma", "γ·η at η = 0.001")):
            pts = [r for r in rows if r["batch_size"] == batch and r["sweep"] == sweep]
            best = max(r["mean"] for r in pts)
            inside = [r for r in pts if r["mean"] >= best - 0.01]
            key = "eta" if sweep == "eta" else "gamma_eta"
            print(f"\nbatch {batch}, {label}: best {best:.1%}; within 1 point of it: "
                  f"{key.replace('gamma_eta', 'γ·η').replace('eta', 'η')} from {min(r[key] for r in inside):g} "
                  f"to {max(r[key] for r in inside):g} ({len(inside)} of {len(pts)} points; grid steps x2 to x3)")
            print("| " + " | ".join(f"{r[key]:g}" for r in pts) + " |")
            print("|" + "---:|" * len(pts))
            print("| " + " | ".join(f"{r['mean']:.1%} ± {r['std']:.1%}" for r in pts) + " |")
    plot_eta(runs, out)


# --- table 7: the Ranger lineage -------------------------------------------------------------------

def ranger_study(data: Data, batches: list[int], seeds: list[int], epochs: int, grids: dict[str, list[float]],
                 out: Path, clock: Clock) -> None:
    """Ranger, LARS + Ranger and Nesterov + warm-up each tuned per batch size on the held-out split
    (seed 0), LARS by its rule; then every method on the test set over ``seeds``."""
    tuned = {  # name -> batch -> recipe of a given LR
        "Ranger": lambda lr: Recipe("ranger", lr),
        "LARS + Ranger": lambda product: Recipe("lars_ranger", product / 1e-3, trust_coefficient=1e-3),
        TUNED: lambda lr: Recipe("nesterov", lr, WARMUP_EPOCHS),
    }
    tuning_rows, rows = [], []
    for batch in batches:
        recipes = {"LARS": Recipe("lars", lars_sqrt_lr(batch))}
        for name, make in tuned.items():
            scores = {value: run(make(value), data.x_fit, data.y_fit, (data.x_val, data.y_val), batch, 0, epochs)
                      for value in grids[name]}
            tuning_rows += [{"method": name, "batch_size": batch, "value": v, "val_acc": a} for v, a in scores.items()]
            best = max(scores, key=lambda v: scores[v])
            recipes[name] = make(best)
            edge = " (at the edge of the grid: widen it)" if best in (min(scores), max(scores)) else ""
            print(f"tuning {name} at batch {batch}: " + ", ".join(f"{v:g}: {a:.1%}" for v, a in scores.items())
                  + f" -> {best:g}{edge} {clock}", flush=True)
        for name, recipe in recipes.items():
            for seed in seeds:
                acc = run(recipe, data.x_train, data.y_train, (data.x_test, data.y_test), batch, seed, epochs)
                rows.append({"method": name, "batch_size": batch, "seed": seed, "epochs": epochs, "lr": recipe.lr,
                             "trust_coefficient": recipe.trust_coefficient, "test_acc": acc})
                print(f"{name:<26} batch {batch:>5} seed {seed} lr {recipe.lr:<7.4g}: {acc:.1%} {clock}", flush=True)
    write_csv(out / "ranger_tuning.csv", tuning_rows)
    write_csv(out / "ranger.csv", rows)
    names = ["Ranger", "LARS + Ranger", "LARS", TUNED]
    print(f"\nTable 7: test accuracy, mean ± std of {len(seeds)} seeds, {epochs} epochs, no warm-up but for {TUNED}")
    print("\n| batch | " + " | ".join(names) + " |\n|---:|" + "---:|" * len(names))
    for batch in batches:
        cells = []
        for name in names:
            picked = [r for r in rows if r["method"] == name and r["batch_size"] == batch]
            mean, std = mean_std([r["test_acc"] for r in picked])
            setting = (f"γ·η {picked[0]['lr'] * picked[0]['trust_coefficient']:g}" if name == "LARS + Ranger"
                       else f"lr {picked[0]['lr']:g}")
            cells.append(f"{mean:.1%} ± {std:.1%} ({setting})")
        print(f"| {batch} | " + " | ".join(cells) + " |")
    print("\nTuning grids (held-out accuracy, seed 0): " + "; ".join(f"{n}: {', '.join(f'{v:g}' for v in g)}"
                                                                  for n, g in grids.items()))


def eta_points(runs: list[dict]) -> list[dict]:
    """eta.csv's per-run rows (strings or numbers) -> one row per sweep point with the seeds' mean and std."""
    points: dict[tuple, list[float]] = {}
    for r in runs:
        key = (int(r["batch_size"]), r["sweep"], float(r["eta"]), float(r["gamma"]), float(r["gamma_eta"]))
        points.setdefault(key, []).append(float(r["val_acc"]))
    return [{"batch_size": b, "sweep": sweep, "eta": eta, "gamma": g, "gamma_eta": p, "runs": len(accs),
             "mean": mean_std(accs)[0], "std": mean_std(accs)[1]} for (b, sweep, eta, g, p), accs in points.items()]


def plot_eta(runs: list[dict], out: Path) -> None:
    """accuracy_vs_eta.png from the per-run rows of eta.csv (as written, or read back)."""
    from matplotlib.figure import Figure

    rows = eta_points(runs)
    batches = list(dict.fromkeys(r["batch_size"] for r in rows))
    seeds, epochs = rows[0]["runs"], int(runs[0]["epochs"])
    fig = Figure(figsize=(6.5 * len(batches), 4.5), layout="constrained")
    for ax, batch in zip(fig.subplots(1, len(batches), squeeze=False)[0], batches):
        for sweep, style, label in (("eta", "o-", f"η varied, γ = {lars_sqrt_lr(batch):.3g}"),
                                    ("gamma", "s--", "γ varied, η = 0.001")):
            pts = [r for r in rows if r["batch_size"] == batch and r["sweep"] == sweep]
            ax.errorbar([r["gamma_eta"] for r in pts], [r["mean"] for r in pts], yerr=[r["std"] for r in pts],
                        fmt=style, capsize=3, label=label)
        best = max(r["mean"] for r in rows if r["batch_size"] == batch)
        ax.axhspan(best - 0.01, best, color="grey", alpha=0.15, label="within 1 point of the best")
        ax.set_xscale("log")
        ax.set_xlabel("γ·η (relative step of an adapted layer)")
        ax.set_ylabel("validation accuracy")
        ax.set_title(f"LARS at batch {batch}, {epochs} epochs, {seeds} seeds")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(out / "accuracy_vs_eta.png", dpi=110)


def pilot_study(data: Data, grids: dict[int, list[float]], seeds: list[int], epochs: int, out: Path,
                clock: Clock) -> None:
    """LARS's γ at η = 0.001 per batch size on the held-out split: where the square-root rule for γ
    came from (anchored at the large batch, the rule's γ = 16 at 8,192 gives γ = 2 at 128)."""
    rows = []
    for batch, gammas in grids.items():
        for gamma in gammas:
            accs = [run(Recipe("lars", gamma), data.x_fit, data.y_fit, (data.x_val, data.y_val), batch, seed, epochs)
                    for seed in seeds]
            mean, std = mean_std(accs)
            rows.append({"batch_size": batch, "gamma": gamma, "rule_gamma": lars_sqrt_lr(batch), "runs": len(accs),
                         "mean": mean, "std": std})
            print(f"batch {batch:>5} γ {gamma:<6g}: {mean:.1%} ± {std:.1%} {clock}", flush=True)
    write_csv(out / "pilot.csv", rows)
    print(f"\nTable 0: LARS validation accuracy (held-out 10,000), η = 0.001, no warm-up, {len(seeds)} seed(s), "
          f"{epochs} epochs; the rule γ = 2·√(B/128)")
    for batch in grids:
        pts = [r for r in rows if r["batch_size"] == batch]
        print(f"\nbatch {batch} (rule: γ = {lars_sqrt_lr(batch):g})")
        print("| γ | " + " | ".join(f"{r['gamma']:g}" for r in pts) + " |")
        print("|---|" + "---:|" * len(pts))
        print("| accuracy | " + " | ".join(f"{r['mean']:.1%}" for r in pts) + " |")


def lamb_study(data: Data, batches: list[int], seeds: list[int], epochs: int,
               grids: dict[str, tuple[str, list[float]]], out: Path, clock: Clock) -> None:
    """LAMB against AdamW and LARS, each tuned with the same budget: its LR grid times warm-up
    {none, 1 epoch}, one seed, on the held-out split. The picked setting then trains with every seed
    on the same 50,000 images (so tuning and final runs take the same number of steps) and is scored
    once on the test set. Diverged runs are counted, not averaged in as zeros."""
    tuning, final = [], []
    for batch in batches:
        for method, (optimizer, grid) in grids.items():
            scores = {}
            for warmup in (0.0, WARMUP_EPOCHS):
                for lr in grid:
                    recipe = Recipe(optimizer, lr, warmup, weight_decay=LAMB_STUDY_DECAY)
                    result = run_result(recipe, data.x_fit, data.y_fit, (data.x_val, data.y_val), batch, 0, epochs)
                    scores[lr, warmup] = result.accuracy
                    tuning.append({"batch_size": batch, "method": method, "lr": lr, "warmup_epochs": warmup,
                                   "val_acc": result.accuracy, "diverged": result.diverged, "steps": result.steps})
            lr, warmup = max(scores, key=lambda key: scores[key])
            results = []
            for seed in seeds:
                result = run_result(Recipe(optimizer, lr, warmup, weight_decay=LAMB_STUDY_DECAY), data.x_fit,
                                    data.y_fit, (data.x_test, data.y_test), batch, seed, epochs)
                results.append(result)
                final.append({"batch_size": batch, "method": method, "lr": lr, "warmup_epochs": warmup, "seed": seed,
                              "test_acc": result.accuracy, "diverged": result.diverged, "steps": result.steps})
            print(f"batch {batch:>5} {method:<6} picked lr {lr:g}, warm-up {warmup:g} (val {scores[lr, warmup]:.1%}); "
                  f"test {[f'{r.accuracy:.1%}' for r in results]} {clock}", flush=True)
    write_csv(out / "lamb_tuning.csv", tuning)
    write_csv(out / "lamb.csv", final)
    runs = len(next(iter(grids.values()))[1]) * 2
    print(f"\nTable 9: test accuracy, mean ± std of the {len(seeds)} seeds that did not diverge, {epochs} epochs on "
          f"{len(data.y_fit):,} images; each method tuned over {runs} runs (its grid x warm-up none / 1 epoch), "
          "seed 0, held out")
    print("| batch | steps | " + " | ".join(grids) + " |")
    print("|---:|---:|" + "---|" * len(grids))
    for batch in batches:
        cells = []
        for method in grids:
            rows = [r for r in final if r["batch_size"] == batch and r["method"] == method]
            kept = [r["test_acc"] for r in rows if not r["diverged"]]
            mean, std = mean_std(kept) if kept else (math.nan, math.nan)
            diverged = len(rows) - len(kept)
            cells.append(f"{mean:.1%} ± {std:.1%} [95%: ± {interval95(kept):.1%}] "
                         f"(lr {rows[0]['lr']:g}, warm-up {rows[0]['warmup_epochs']:g}"
                         + (f", {diverged} of {len(rows)} diverged" if diverged else "") + ")")
        steps = next(r["steps"] for r in final if r["batch_size"] == batch)
        print(f"| {batch} | {steps} | " + " | ".join(cells) + " |")


# --- table 13: narrow optimizer state -------------------------------------------------------------

# Table 9's picked settings at batch 8,192 (docs/data/lamb_final.csv): no warm-up, weight decay 0.01.
PRECISION_SETTINGS = {"LARS": ("lars", 20.0), "LAMB": ("lamb", 0.05)}
PRECISION_BATCH = 8192


def precision_study(data: Data, batch: int, seeds: list[int], epochs: int, out: Path, clock: Clock) -> None:
    """LARS and LAMB at table 9's settings with float32, bfloat16 and int8 state, the same seeds and
    steps: test accuracy (the float32 rows repeat table 9's runs exactly)."""
    rows = []
    for method, (optimizer, lr) in PRECISION_SETTINGS.items():
        for precision in ("float32", "bfloat16", "int8"):
            recipe = Recipe(optimizer, lr, weight_decay=LAMB_STUDY_DECAY, state_precision=precision)
            for seed in seeds:
                result = run_result(recipe, data.x_fit, data.y_fit, (data.x_test, data.y_test), batch, seed, epochs)
                rows.append({"method": method, "state_precision": precision, "batch_size": batch, "lr": lr,
                             "seed": seed, "test_acc": result.accuracy, "diverged": result.diverged,
                             "steps": result.steps})
            accs = [r["test_acc"] for r in rows[-len(seeds):]]
            print(f"{method} {precision:<8}: {', '.join(f'{a:.2%}' for a in accs)} {clock}", flush=True)
    write_csv(out / "precision.csv", rows)
    print(f"\nTable 13: test accuracy at batch {batch}, {epochs} epochs on {len(data.y_fit):,} images, seeds "
          f"{seeds}: mean ± std [95% t-interval], and each seed's difference from its float32 run")
    print("| method | state | accuracy | per-seed difference from float32 |\n|---|---|---|---|")
    for method in PRECISION_SETTINGS:
        base = {r["seed"]: r["test_acc"] for r in rows if r["method"] == method and r["state_precision"] == "float32"}
        for precision in ("float32", "bfloat16", "int8"):
            mine = [r for r in rows if r["method"] == method and r["state_precision"] == precision]
            accs = [r["test_acc"] for r in mine]
            mean, std = mean_std(accs)
            diffs = ", ".join(f"{r['test_acc'] - base[r['seed']]:+.2%}" for r in mine)
            print(f"| {method} | {precision} | {mean:.2%} ± {std:.2%} [± {interval95(accs):.2%}] | {diffs} |")


# --- tables 10-11: one search budget for LARS and the baseline --------------------------------------

def halton(index: int, base: int) -> float:
    """The ``index``-th point (from 1) of the van der Corput sequence in ``base``: a quasi-random
    coordinate in (0, 1); bases 2, 3, 5, 7 give a 4-d Halton sequence."""
    point, scale = 0.0, 1.0
    while index:
        scale /= base
        index, digit = divmod(index, base)
        point += digit * scale
    return point


def search_points(trials: int) -> list[tuple[float, float, float, float]]:
    """``trials`` Halton points: (LR position in [0, 1], warm-up, its start, momentum); both methods
    take the same points, each mapping the first coordinate onto its own LR range."""
    def pick(options: tuple[float, ...], u: float) -> float:
        return options[min(len(options) - 1, int(u * len(options)))]
    return [(halton(i, 2), pick(WARMUPS, halton(i, 3)), pick(WARMUP_STARTS, halton(i, 5)), pick(MOMENTA, halton(i, 7)))
            for i in range(1, trials + 1)]


def protocol_study(data: Data, batches: list[int], seeds: list[int], epochs: int, trials: int, out: Path,
                   clock: Clock) -> None:
    """LARS against Nesterov momentum with one search budget: ``trials`` quasi-random settings of the
    peak LR (γ for LARS), warm-up length {0, 0.25, 1 epoch}, warm-up start {1, 10, 30% of the peak}
    and momentum {0.8, 0.9, 0.95}, seed 0, on the held-out split; the best then trains with every seed
    on the same 50,000 images (the same number of steps) and is scored once on the test set."""
    points = search_points(trials)
    tuning, final = [], []
    tag = f"{epochs}ep"
    for batch in batches:
        for method, (optimizer, (low, high)) in PROTOCOL_RANGES.items():
            scores: dict[Recipe, float] = {}
            for trial, (u, warmup, start, momentum) in enumerate(points):
                lr = float(f"{low * (high / low) ** u:.3g}")
                recipe = Recipe(optimizer, lr, warmup, momentum=momentum,
                                warmup_start=start if warmup > 0 else None)
                result = run_result(recipe, data.x_fit, data.y_fit, (data.x_val, data.y_val), batch, 0, epochs)
                scores[recipe] = result.accuracy
                tuning.append({"epochs": epochs, "batch_size": batch, "method": method, "trial": trial, "lr": lr,
                               "warmup_epochs": warmup, "warmup_start": start if warmup > 0 else "",
                               "momentum": momentum, "val_acc": result.accuracy, "diverged": result.diverged,
                               "steps": result.steps})
            best = max(scores, key=lambda r: scores[r])
            for seed in seeds:
                result = run_result(best, data.x_fit, data.y_fit, (data.x_test, data.y_test), batch, seed, epochs)
                final.append({"epochs": epochs, "batch_size": batch, "method": method, "lr": best.lr,
                              "warmup_epochs": best.warmup_epochs, "warmup_start": best.warmup_start or "",
                              "momentum": best.momentum, "seed": seed, "test_acc": result.accuracy,
                              "diverged": result.diverged, "steps": result.steps})
            tests = ", ".join(f"{r['test_acc']:.1%}" for r in final[-len(seeds):])
            diverged = sum(r["diverged"] for r in tuning if r["batch_size"] == batch and r["method"] == method)
            print(f"batch {batch:>5} {method:<8} picked lr {best.lr:g}, warm-up {best.warmup_epochs:g} from "
                  f"{best.warmup_start}, momentum {best.momentum:g} (val {scores[best]:.1%}; {diverged} of {trials} "
                  f"searched diverged); test {tests} {clock}",
                  flush=True)
            # Written after every method and batch size, so that a long run stopped early keeps its rows.
            write_csv(out / f"protocol_{tag}_tuning.csv", tuning)
            write_csv(out / f"protocol_{tag}_final.csv", final)
    print_protocol_table(tuning, final, trials, len(data.y_fit))


def print_protocol_table(tuning: list[dict], final: list[dict], trials: int, images: int) -> None:
    """Tables 10-11 from the rows of :func:`protocol_study` (as written, or read back from its CSVs)."""
    epochs = final[0]["epochs"]
    methods = list(dict.fromkeys(r["method"] for r in final))
    print(f"\nTest accuracy, {epochs} epochs on {images:,} images: mean ± std of the seeds that did not diverge "
          f"[95% t-interval]; each method searched over the same {trials} quasi-random settings (seed 0, held "
          "out); 'div' counts diverged runs (search / final)")
    print("| batch | steps | " + " | ".join(methods) + " | difference |")
    print("|---:|---:|" + "---|" * (len(methods) + 1))
    for batch in dict.fromkeys(r["batch_size"] for r in final):
        cells, means = [], []
        for method in methods:
            rows = [r for r in final if r["batch_size"] == batch and r["method"] == method]
            kept = [float(r["test_acc"]) for r in rows if r["diverged"] not in (True, "True")]
            searched = [r for r in tuning if r["batch_size"] == batch and r["method"] == method]
            div = sum(r["diverged"] in (True, "True") for r in searched)
            mean, std = mean_std(kept) if kept else (math.nan, math.nan)
            means.append(mean)
            best = rows[0]
            cells.append(f"{mean:.1%} ± {std:.1%} [± {interval95(kept):.1%}] (lr {float(best['lr']):g}, warm-up "
                         f"{float(best['warmup_epochs']):g}, m {float(best['momentum']):g}; div {div}/"
                         f"{len(rows) - len(kept)})")
        steps = next(r["steps"] for r in final if r["batch_size"] == batch)
        print(f"| {batch} | {steps} | " + " | ".join(cells) + f" | {means[-1] - means[0]:+.1%} |")


def draw_figures(csv_dir: Path, out: Path) -> None:
    """Every figure of tables 1-3 again, from the per-run CSVs alone (no training)."""
    out.mkdir(parents=True, exist_ok=True)
    read = lambda name: list(csv.DictReader((csv_dir / name).open()))  # noqa: E731
    plot_batch(read("batch.csv"), out)
    plot_heatmaps(read("heatmap_runs.csv"), out)
    plot_eta(read("eta.csv"), out)
    print(f"drew accuracy_vs_batch.png, warmup_vs_lars_heatmaps.png and accuracy_vs_eta.png from {csv_dir} into {out}")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=("batch", "eta", "ranger", "all", "pilot", "lamb", "protocol",
                                          "precision", "figures"), nargs="?", default="all")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 12,000 images, 2 batch sizes, 1 seed")
    parser.add_argument("--epochs", type=int, default=None, help=f"epochs at every batch size (default {EPOCHS})")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per setting (default 3)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder with Fashion-MNIST (torchvision's layout or the 4 idx files)")
    parser.add_argument("--download", action="store_true", help="let torchvision download it into --data-dir")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--trials", type=int, default=None,
                        help=f"protocol: settings searched per method and batch size (default {PROTOCOL_TRIALS})")
    parser.add_argument("--from-csv", type=Path, default=None, metavar="PREFIX",
                        help="protocol: print the table from PREFIX_tuning.csv and PREFIX_final.csv (the committed "
                             "docs/data/protocol_5ep, say) instead of running")
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help=f"protocol: batch sizes (default {' '.join(map(str, PROTOCOL_BATCHES))})")
    parser.add_argument("--csv-dir", type=Path, default=Path("docs/data"),
                        help="figures: the folder whose batch.csv, eta.csv and heatmap_runs.csv are drawn "
                             "(default docs/data, the committed runs); the figures go to --out")
    args = parser.parse_args(argv)
    if args.study == "figures":
        draw_figures(args.csv_dir, args.out)
        return
    if args.from_csv is not None:
        tuning = list(csv.DictReader(Path(f"{args.from_csv}_tuning.csv").open()))
        final = list(csv.DictReader(Path(f"{args.from_csv}_final.csv").open()))
        first = (tuning[0]["batch_size"], tuning[0]["method"])
        trials = sum((r["batch_size"], r["method"]) == first for r in tuning)
        print_protocol_table(tuning, final, trials, 50_000)
        return
    if find_fashion_mnist(args.data_dir) is None and not args.download:
        sys.exit("Fashion-MNIST not found: apt-get install dataset-fashion-mnist, or pass --data-dir DIR "
                 "(add --download to let torchvision fetch it there)")
    torch.set_num_threads(torch.get_num_threads())
    epochs = args.epochs or (2 if args.quick else EPOCHS)
    seeds = list(range(args.seeds or (1 if args.quick or args.study == "pilot" else 3)))
    data = load(args.data_dir, args.download, 12_000 if args.quick else None)
    args.out.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    print(f"machine: {machine()}; data: Fashion-MNIST from {data.source}, "
          f"{len(data.y_train)} train / {len(data.y_test)} test", flush=True)
    if args.study in ("batch", "all"):
        batches = [256, 4096] if args.quick else [128, 256, 512, 1024, 2048, 4096, 8192]
        grid = TUNING_GRID[2::3] if args.quick else TUNING_GRID
        batch_study(data, batches, seeds, epochs, grid, args.out, clock)
    if args.study in ("eta", "all"):
        batches = [4096] if args.quick else [1024, 8192]
        etas = ETAS[1::3] if args.quick else ETAS
        products = PRODUCTS[1::3] if args.quick else PRODUCTS
        eta_study(data, batches, seeds, epochs, etas, products, args.out, clock)
    if args.study in ("ranger", "all"):
        batches = [4096] if args.quick else [1024, 8192]
        grids = {"Ranger": RANGER_LRS, "LARS + Ranger": LARS_RANGER_PRODUCTS, TUNED: TUNING_GRID}
        if args.quick:
            grids = {name: grid[1::3] for name, grid in grids.items()}
        ranger_study(data, batches, seeds, epochs, grids, args.out, clock)
    if args.study == "pilot":
        pilot = {256: PILOT[128][1:3], 4096: PILOT[8192][1:3]} if args.quick else PILOT
        pilot_study(data, pilot, seeds, epochs, args.out, clock)
    if args.study == "lamb":
        batches = [4096] if args.quick else LAMB_STUDY_BATCHES
        grids = {name: (opt, grid[2::3]) for name, (opt, grid) in ADAM_FAMILY_GRIDS.items()} if args.quick \
            else ADAM_FAMILY_GRIDS
        lamb_study(data, batches, seeds, epochs, grids, args.out, clock)
    if args.study == "precision":
        precision_study(data, 4096 if args.quick else PRECISION_BATCH, seeds, epochs, args.out, clock)
    if args.study == "protocol":
        batches = args.batches or ([4096] if args.quick else PROTOCOL_BATCHES)
        trials = args.trials or (3 if args.quick else PROTOCOL_TRIALS)
        protocol_study(data, batches, seeds if args.seeds or args.quick else list(range(5)), epochs, trials,
                       args.out, clock)
    print(f"\nmachine: {machine()}; took {time.perf_counter() - clock.start:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
