"""Large-batch training with Lightning: LARS from configure_lars, the trust-ratio callback, then a plot.

    python examples/lightning_large_batch.py                      # 30 epochs at batch 1024, ~1 minute
    python examples/lightning_large_batch.py --epochs 3 --out-dir /tmp/run

A LightningModule (the demo's small CNN with BatchNorm) learns scikit-learn's bundled digits at batch
1024: LARS with bias/BatchNorm exclusion, 2 warm-up steps then polynomial decay per step
(lars_plugins.lightning.configure_lars), TrustRatioCallback logging per-layer trust ratios every step
to a CSVLogger, and finally the same drawing `lars-plugins plot <metrics.csv>` makes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from lars_plugins.demo import load_digits, small_cnn
from lars_plugins.lightning import TrustRatioCallback, configure_lars

warnings.filterwarnings("ignore", ".*does not have many workers.*")


class DigitsCNN(pl.LightningModule):
    def __init__(self, lr: float = 16.0, weight_decay: float = 5e-4, warmup_steps: int = 2):
        super().__init__()
        self.save_hyperparameters()
        self.net = small_cnn()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        h = self.hparams
        return configure_lars(self, lr=h.lr, weight_decay=h.weight_decay, warmup_steps=h.warmup_steps, decay="poly")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--out-dir", type=Path, default=Path("lightning_run"))
    args = parser.parse_args()

    pl.seed_everything(0, verbose=False)
    data = load_digits()
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x_train, data.y_train),
                                        batch_size=args.batch_size, shuffle=True)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x_test, data.y_test), batch_size=512)
    logger = pl.loggers.CSVLogger(str(args.out_dir), name="logs")
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=logger, log_every_n_steps=1,
                         callbacks=[TrustRatioCallback()], enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=False)
    model = DigitsCNN()
    trainer.fit(model, train, val)
    print(f"validation accuracy after {args.epochs} epochs at batch {args.batch_size}: "
          f"{trainer.callback_metrics['val_acc'].item():.1%}")
    metrics = Path(logger.log_dir) / "metrics.csv"
    out = args.out_dir / "trust_ratios.png"
    # The command line a user would type; run here so the example shows it end to end.
    subprocess.run([sys.executable, "-m", "lars_plugins.cli", "plot", str(metrics), "-o", str(out),
                    "--title", "Lightning, digits, batch 1024: LARS trust ratios"], check=True)
    print(f"metrics: {metrics}")


if __name__ == "__main__":
    main()
