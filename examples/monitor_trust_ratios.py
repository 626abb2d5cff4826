"""Watch LARS's per-layer trust ratios while a ResNet-18 trains at a large batch on real digits.

    python examples/monitor_trust_ratios.py                     # 10 epochs, about a minute on 2 cores
    python examples/monitor_trust_ratios.py --epochs 1 --out-dir /tmp/tr   # a quick look

A torchvision ResNet-18 (random init, its stem adapted to 16x16 inputs) learns scikit-learn's bundled
digits at batch 512 with LARS; TrustRatioMonitor records every step, then the history is saved as CSV
and drawn as a report (heatmap, per-layer lines, last-step bars). docs/monitoring.md shows its picture.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import lars_plugins
from lars_plugins.demo import accuracy, load_digits
from lars_plugins.plot import save_plot


def resnet18_for_digits() -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, 3, padding=1, bias=False)  # 16x16 greyscale in, no early downsampling
    model.maxpool = nn.Identity()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=10.0)
    parser.add_argument("--out-dir", type=Path, default=Path("trust_ratio_run"))
    args = parser.parse_args()

    torch.manual_seed(0)
    data = load_digits()
    upsample = nn.Upsample(size=16, mode="bilinear", align_corners=False)
    x_train, x_test = upsample(data.x_train), upsample(data.x_test)
    model = resnet18_for_digits()
    optimizer = lars_plugins.LARS(lars_plugins.param_groups(model, weight_decay=5e-4), lr=args.lr, momentum=0.9)
    steps_per_epoch = -(-len(data.y_train) // args.batch_size)
    # The paper's polynomial decay (1 - t/T)^2, stepped once per optimizer step.
    scheduler = lars_plugins.WarmupDecayLR(optimizer, total_steps=args.epochs * steps_per_epoch, decay="poly")
    monitor = lars_plugins.TrustRatioMonitor(model, optimizer, every_n_steps=1)

    for epoch in range(1, args.epochs + 1):
        for idx in torch.randperm(len(data.y_train)).split(args.batch_size):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x_train[idx]), data.y_train[idx]).backward()
            optimizer.step()
            scheduler.step()
        stats = monitor.latest
        print(f"epoch {epoch:2d}  test accuracy {accuracy(model, x_test, data.y_test):6.1%}  trust ratio "
              f"min {stats['trust_ratio_stats/min']:.2e} median {stats['trust_ratio_stats/median']:.2e} "
              f"max {stats['trust_ratio_stats/max']:.2e}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = monitor.history.to_csv(args.out_dir / "trust_ratios.csv")
    png = save_plot(monitor.history, args.out_dir / "trust_ratio_report.png",
                    title=f"ResNet-18 on digits, LARS, batch {args.batch_size}, lr {args.lr}, η 0.001")
    print(f"history: {csv_path} ({len(monitor.history)} steps x "
          f"{len(monitor.history.layers('trust_ratio'))} adapted layers); report: {png}")


if __name__ == "__main__":
    main()
