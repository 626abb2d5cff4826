"""``lars-plugins demo``: large-batch training on real images, LARS beside linearly scaled SGD.

The data are scikit-learn's bundled digits (1,797 real 8x8 greyscale scans of handwritten digits,
shipped inside the scikit-learn wheel, so nothing is downloaded). A small CNN with BatchNorm is
trained at a large batch with both optimizers from the same initial weights, in lockstep, and the
test accuracy of each is printed after every epoch. LARS's per-layer trust ratios are recorded at
every step and drawn as a heatmap at the end.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .groups import param_groups
from .monitor import TrustRatioHistory, TrustRatioMonitor
from .optim import LARS

BASE_BATCH = 32
BASE_SGD_LR = 0.05  # a good SGD learning rate for this model at batch 32


@dataclass
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(seed: int = 0, test_fraction: float = 0.25) -> Digits:
    """scikit-learn's digits as (N, 1, 8, 8) float tensors, standardised, split per class."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError('the demo needs scikit-learn: pip install "lars_plugins[demo]"') from err
    data = sk_load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        data.images, data.target, test_size=test_fraction, random_state=seed, stratify=data.target
    )
    x_tr = torch.tensor(x_tr, dtype=torch.float32).unsqueeze(1)
    x_te = torch.tensor(x_te, dtype=torch.float32).unsqueeze(1)
    mean, std = x_tr.mean(), x_tr.std()
    return Digits((x_tr - mean) / std, torch.tensor(y_tr), (x_te - mean) / std, torch.tensor(y_te))


def small_cnn(num_classes: int = 10) -> nn.Module:
    """Three conv layers with BatchNorm and a linear head: about 100k parameters."""

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(1, 32), *block(32, 64), nn.MaxPool2d(2),
        *block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(128, num_classes),
    )


def make_sgd(model: nn.Module, batch_size: int, weight_decay: float) -> torch.optim.Optimizer:
    """SGD with the linear scaling rule: lr = 0.05 · batch / 32, no warm-up."""
    groups = param_groups(model, weight_decay=weight_decay)
    plain = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups]
    return torch.optim.SGD(plain, lr=BASE_SGD_LR * batch_size / BASE_BATCH, momentum=0.9)


def make_lars(model: nn.Module, lr: float, weight_decay: float, trust_coefficient: float) -> torch.optim.Optimizer:
    return LARS(param_groups(model, weight_decay=weight_decay), lr=lr, momentum=0.9,
                trust_coefficient=trust_coefficient)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return correct


def poly_decay(total_steps: int, power: float = 2.0) -> Callable[[int], float]:
    """The paper's polynomial LR decay, (1 - t/T)^2, as a LambdaLR factor."""
    return lambda step: (1.0 - min(step, total_steps) / total_steps) ** power


def run_demo(
    batch_size: int = 1024,
    epochs: int = 30,
    lars_lr: float = 16.0,
    trust_coefficient: float = 0.001,
    weight_decay: float = 5e-4,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
    output_dir: Optional[Path] = Path("lars_demo_output"),
) -> dict[str, list[float]]:
    """Train the CNN with LARS and with linearly scaled SGD; return test accuracy per epoch for each.

    LARS's per-layer trust ratios are recorded at every step; with ``output_dir`` they are written
    there as ``trust_ratios.csv`` and drawn as ``trust_ratio_heatmap.png`` (needs matplotlib).
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    data = load_digits(seed=seed)
    n = len(data.y_train)
    asked, batch_size = batch_size, min(batch_size, n)  # the batch really used
    steps_per_epoch = -(-n // batch_size)
    init = small_cnn()
    runs: dict[str, tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]] = {}
    for name in ("LARS", "SGD"):
        model = small_cnn()
        model.load_state_dict(init.state_dict())
        if name == "LARS":
            opt = make_lars(model, lars_lr, weight_decay, trust_coefficient)
        else:
            opt = make_sgd(model, batch_size, weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, poly_decay(epochs * steps_per_epoch))
        runs[name] = (model, opt, sched)
    monitor = TrustRatioMonitor(runs["LARS"][0], runs["LARS"][1], every_n_steps=1, metrics=("trust_ratio",
                                "weight_norm", "grad_norm"))

    sgd_lr = runs["SGD"][1].param_groups[0]["lr"]
    whole = f" (the whole training set; {asked} was asked)" if asked > n else ""
    log(f"digits: {n} training / {len(data.y_test)} test images (scikit-learn's bundled set), "
        f"batch {batch_size}{whole} ({steps_per_epoch} steps/epoch), {epochs} epochs, poly(2) decay, no warm-up")
    log(f"  LARS: lr {lars_lr}, trust coefficient {trust_coefficient}, momentum 0.9, weight decay {weight_decay}")
    log(f"  SGD : lr {sgd_lr:g} (= {BASE_SGD_LR} x {batch_size}/{BASE_BATCH}, linear scaling), momentum 0.9, "
        f"weight decay {weight_decay}")
    history: dict[str, list[float]] = {name: [] for name in runs}
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    log(f"{'epoch':>5}  {'LARS test acc':>13}  {'SGD test acc':>12}")
    # disable=None: a live bar on a terminal, none in a log file (CI), where the lines suffice.
    bar = tqdm(range(1, epochs + 1), desc="training", unit="epoch", disable=None if progress else True, leave=False)
    for epoch in bar:
        for idx in torch.randperm(n, generator=generator).split(batch_size):
            for model, opt, sched in runs.values():
                opt.zero_grad(set_to_none=True)
                loss_fn(model(data.x_train[idx]), data.y_train[idx]).backward()
                opt.step()
                sched.step()
        for name, (model, _, _) in runs.items():
            history[name].append(accuracy(model, data.x_test, data.y_test))
        line = f"{epoch:>5}  {history['LARS'][-1]:>13.1%}  {history['SGD'][-1]:>12.1%}"
        if bar.disable:
            log(line)
        else:
            bar.write(line)
        bar.set_postfix(LARS=f"{history['LARS'][-1]:.1%}", SGD=f"{history['SGD'][-1]:.1%}")
    bar.close()
    log(f"final test accuracy after {epochs} epochs at batch {batch_size}: "
        f"LARS {history['LARS'][-1]:.1%}, SGD (linear scaling) {history['SGD'][-1]:.1%} "
        f"[{time.perf_counter() - start:.0f} s]")
    monitor.remove()
    if output_dir is not None and monitor.history is not None:
        _write_trust_ratios(monitor.history, Path(output_dir), batch_size, log)
    return history


def _write_trust_ratios(history: TrustRatioHistory, output_dir: Path, batch_size: int,
                        log: Callable[[str], None]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_path = history.to_csv(output_dir / "trust_ratios.csv")
    try:
        from .plot import save_plot
    except ImportError:
        log(f"trust ratios of the LARS run: {csv_path} (pip install matplotlib to draw them)")
        return
    png = save_plot(history, output_dir / "trust_ratio_heatmap.png", kind="heatmap",
                    title=f"LARS on digits, batch {batch_size}: trust ratio per layer and step")
    log(f"trust ratios of the LARS run: heatmap {png.resolve()}")
    log(f"  data {csv_path}; full report: lars-plugins plot {csv_path} -o trust_ratio_report.png")


def _checked(kind: type, low: float, open_low: bool) -> Callable[[str], float]:
    """An argparse ``type`` that parses ``kind`` and refuses values below ``low`` (or equal, if open)."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or value < low or (open_low and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if open_low else '>='} {low:g} and finite, got {text}")
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    positive_int, positive, non_negative = _checked(int, 1, False), _checked(float, 0, True), _checked(float, 0, False)
    parser.add_argument("--batch-size", type=positive_int, default=1024,
                        help="training batch size (default 1024; at most the 1,347 training images are used)")
    parser.add_argument("--epochs", type=positive_int, default=30, help="epochs (default 30)")
    parser.add_argument("--lars-lr", type=positive, default=16.0, help="LARS global learning rate (default 16)")
    parser.add_argument("--trust-coefficient", type=positive, default=0.001,
                        help="LARS trust coefficient η (default 0.001, the paper's)")
    parser.add_argument("--weight-decay", type=non_negative, default=5e-4, help="weight decay for both (default 5e-4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--output-dir", type=Path, default=Path("lars_demo_output"),
                        help="where the trust-ratio CSV and heatmap go (default lars_demo_output)")


def main(args: Optional[argparse.Namespace] = None) -> dict[str, list[float]]:
    if args is None:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        args = parser.parse_args()
    if args.output_dir is not None:
        # Before training, not after it: a run must not end by losing what it recorded.
        try:
            args.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SystemExit(f"lars-plugins demo: error: argument --output-dir: cannot use {args.output_dir}: "
                             f"{err.strerror or err}") from err
    return run_demo(batch_size=args.batch_size, epochs=args.epochs, lars_lr=args.lars_lr,
                    trust_coefficient=args.trust_coefficient, weight_decay=args.weight_decay, seed=args.seed,
                    progress=not args.no_progress, output_dir=args.output_dir)
