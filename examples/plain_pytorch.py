"""Plain PyTorch with lars_plugins.LARS: large-batch training on real digits, a schedule, a checkpoint.

    python examples/plain_pytorch.py --epochs 30 --batch-size 1024

Shows the pieces a real training script needs: parameter groups that keep biases and BatchNorm out
of adaptation and weight decay, the paper's polynomial LR decay, the per-layer trust ratios LARS used,
and a checkpoint saved and resumed with torch.load(weights_only=True).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import lars_plugins
from lars_plugins.demo import accuracy, load_digits, small_cnn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=16.0)
    parser.add_argument("--checkpoint", type=Path, default=Path("lars_checkpoint.pt"))
    args = parser.parse_args()

    torch.manual_seed(0)
    data = load_digits()
    model = small_cnn()
    optimizer = lars_plugins.LARS(
        lars_plugins.param_groups(model, weight_decay=5e-4), lr=args.lr, momentum=0.9, trust_coefficient=1e-3
    )
    steps_per_epoch = -(-len(data.y_train) // args.batch_size)
    # The paper's polynomial decay (1 - t/T)^2, stepped once per optimizer step.
    scheduler = lars_plugins.WarmupDecayLR(optimizer, total_steps=args.epochs * steps_per_epoch, decay="poly")

    for epoch in range(1, args.epochs + 1):
        for idx in torch.randperm(len(data.y_train)).split(args.batch_size):
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            optimizer.step()
            scheduler.step()
        print(f"epoch {epoch:3d}  lr {scheduler.get_last_lr()[0]:.3f}  "
              f"test accuracy {accuracy(model, data.x_test, data.y_test):.1%}")

    print("trust ratios LARS used at the last step (adapted tensors only):")
    for group in optimizer.param_groups:
        for name, p in zip(group["param_names"], group["params"]):
            if "trust_ratio" in optimizer.state[p]:
                print(f"  {name:<12} {optimizer.state[p]['trust_ratio'].item():.3e}")

    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, args.checkpoint)
    checkpoint = torch.load(args.checkpoint, weights_only=True)
    resumed = lars_plugins.LARS(lars_plugins.param_groups(model, weight_decay=5e-4))
    resumed.load_state_dict(checkpoint["optimizer"])
    print(f"checkpoint {args.checkpoint} reloaded with weights_only=True: "
          f"lr {resumed.param_groups[0]['lr']:.3g}, {len(resumed.state)} tensors of state")


if __name__ == "__main__":
    main()
