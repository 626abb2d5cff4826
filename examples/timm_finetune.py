"""Fine-tune a timm model with opt="lars", layer-wise LR decay and the trust-ratio monitor.

    python examples/timm_finetune.py --pretrained                  # real use: hub weights (needs internet)
    python examples/timm_finetune.py --checkpoint weights.pth      # weights from a local file
    python examples/timm_finetune.py --save-checkpoint weights.pth # train from scratch, save the weights

Data: scikit-learn's bundled digits, upsampled to 32x32 RGB. The optimizer comes from timm's own
factory by name (import lars_plugins.timm registers it); timm's weight-decay filter and layer decay
build the groups; timm's cosine scheduler applies the layer scales. Test accuracy is printed before
and after; the per-layer trust ratios are written as CSV and drawn as a heatmap.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import timm
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn

import lars_plugins
import lars_plugins.timm  # noqa: F401  (registers "lars", "larc", "nlars", "nlarc" in timm)
from lars_plugins.demo import accuracy, load_digits


def build_model(name: str, pretrained: bool, checkpoint: Path | None) -> nn.Module:
    if checkpoint is not None:
        # timm's own way to take "pretrained" weights from a local file instead of the hub.
        return timm.create_model(name, pretrained=True, num_classes=10,
                                 pretrained_cfg_overlay=dict(file=str(checkpoint), num_classes=10))
    return timm.create_model(name, pretrained=pretrained, num_classes=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--pretrained", action="store_true", help="load the hub's pretrained weights")
    parser.add_argument("--checkpoint", type=Path, help="load weights from this local file instead")
    parser.add_argument("--save-checkpoint", type=Path, help="save the fine-tuned weights here")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2.0)
    parser.add_argument("--layer-decay", type=float, default=0.7)
    parser.add_argument("--out-dir", type=Path, default=Path("timm_finetune_run"))
    args = parser.parse_args()

    torch.manual_seed(0)
    data = load_digits()
    to_rgb32 = lambda x: nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)  # noqa: E731
    x_train, x_test = to_rgb32(data.x_train), to_rgb32(data.x_test)
    model = build_model(args.model, args.pretrained, args.checkpoint)
    source = ("pretrained (hub)" if args.pretrained else f"weights from {args.checkpoint}" if args.checkpoint
              else "random init")
    print(f"{args.model}, {source}: test accuracy before fine-tuning {accuracy(model, x_test, data.y_test):.1%}")

    optimizer = create_optimizer_v2(model, opt="lars", lr=args.lr, weight_decay=5e-4, momentum=0.9,
                                    layer_decay=args.layer_decay, trust_coeff=1e-3)
    steps_per_epoch = -(-len(data.y_train) // args.batch_size)
    scheduler = CosineLRScheduler(optimizer, t_initial=args.epochs * steps_per_epoch)  # applies lr_scale
    monitor = lars_plugins.TrustRatioMonitor(model, optimizer, every_n_steps=2, per_layer=True)
    print(f"optimizer {type(optimizer).__module__}.{type(optimizer).__name__}, {len(optimizer.param_groups)} groups, "
          f"layer scales {min(g['lr_scale'] for g in optimizer.param_groups):.3f}..1")

    step = 0
    for epoch in range(1, args.epochs + 1):
        for idx in torch.randperm(len(data.y_train)).split(args.batch_size):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x_train[idx]), data.y_train[idx]).backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
        print(f"epoch {epoch}  test accuracy {accuracy(model, x_test, data.y_test):.1%}  "
              f"median trust ratio {monitor.latest['trust_ratio_stats/median']:.2e}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = monitor.history.to_csv(args.out_dir / "trust_ratios.csv")
    try:
        from lars_plugins.plot import save_plot

        print(f"trust ratios: {save_plot(monitor.history, args.out_dir / 'trust_ratio_heatmap.png', kind='heatmap')}")
    except ImportError:
        print(f"trust ratios: {csv_path} (install matplotlib to draw them)")
    if args.save_checkpoint:
        torch.save(model.state_dict(), args.save_checkpoint)
        print(f"saved weights to {args.save_checkpoint}")


if __name__ == "__main__":
    main()
