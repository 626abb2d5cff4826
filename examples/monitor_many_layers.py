"""Trust ratios of a deep network (hundreds of tensors) over every step of a real run, and the plot.

    python examples/monitor_many_layers.py                       # 96 residual blocks, 384 tensors, ~3 min on 2 cores
    python examples/monitor_many_layers.py --blocks 8 --max-steps 5 --out-dir /tmp/many   # a quick look

A residual MLP of ``--blocks`` blocks (each a LayerNorm and a Linear: four tensors) learns
Fashion-MNIST (or, where it is not installed, scikit-learn's bundled digits) at batch 1024 with LARS;
TrustRatioMonitor records every step; the history is saved as CSV and drawn with ``lars-plugins
plot``'s report, which groups the layers by block beyond 200 rows. docs/monitoring.md shows its picture.
"""

from __future__ import annotations

import argparse
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

import lars_plugins
from lars_plugins.plot import save_plot


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.fc(self.norm(x)))


def deep_mlp(blocks: int, width: int, in_features: int, classes: int) -> nn.Module:
    return nn.Sequential(OrderedDict([
        ("stem", nn.Linear(in_features, width)),
        ("blocks", nn.Sequential(*[Block(width) for _ in range(blocks)])),
        ("head", nn.Linear(width, classes)),
    ]))


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    from lars_plugins.demo.datasets import find_fashion_mnist, load_fashion_mnist

    if find_fashion_mnist() is not None:
        split = load_fashion_mnist(None, download=False)
        return split.x_train.flatten(1), split.y_train, split.x_test.flatten(1), split.y_test, "Fashion-MNIST"
    from lars_plugins.demo import load_digits

    digits = load_digits()
    return digits.x_train.flatten(1), digits.y_train, digits.x_test.flatten(1), digits.y_test, "scikit-learn digits"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=96)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=8.0)
    parser.add_argument("--out-dir", type=Path, default=Path("many_layers_run"))
    args = parser.parse_args()

    x_train, y_train, x_test, y_test, source = load_data()
    torch.manual_seed(0)
    model = deep_mlp(args.blocks, args.width, x_train.shape[1], 10)
    groups = lars_plugins.param_groups(model, weight_decay=5e-4)
    optimizer = lars_plugins.LARS(groups, lr=args.lr, momentum=0.9, trust_coefficient=1e-3)
    steps_per_epoch = -(-len(y_train) // args.batch_size)
    total = min(args.epochs * steps_per_epoch, args.max_steps or 10**9)
    scheduler = lars_plugins.WarmupDecayLR(optimizer, total_steps=total, decay="poly")
    monitor = lars_plugins.TrustRatioMonitor(model, optimizer, every_n_steps=1)
    tensors = len(list(model.parameters()))
    print(f"{tensors} tensors, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {source}, "
          f"{total} steps at batch {args.batch_size}", flush=True)
    start, step = time.perf_counter(), 0
    generator = torch.Generator().manual_seed(0)
    while step < total:
        for idx in torch.randperm(len(y_train), generator=generator).split(args.batch_size):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step >= total:
                break
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"trained in {time.perf_counter() - start:.0f} s: test accuracy {accuracy:.1%}", flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = monitor.history.to_csv(args.out_dir / "trust_ratios.csv")
    start = time.perf_counter()
    png = save_plot(csv_path, args.out_dir / "trust_ratio_report_many_layers.png",
                    title=f"LARS on a {args.blocks}-block residual MLP ({tensors} tensors), {source}, every step "
                          f"of {total} recorded")
    print(f"wrote {csv_path} and {png} (plot {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
