"""A user's main.py that imports Lightning alone, driven by the plain LightningCLI.

Run as ``python plain_lightning_cli.py fit --optimizer ... [--lr_scheduler ...]``; prints the
optimizer's class and the last LR on stdout. Nothing here imports lars_plugins: LightningCLI must
find it from the command line alone.
"""

import sys

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI
from torch import nn

assert "lars_plugins" not in sys.modules


class Net(LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(64, 8, generator=gen), torch.randint(0, 3, (64,), generator=gen)
        data = torch.utils.data.TensorDataset(x, y)
        return torch.utils.data.DataLoader(data, batch_size=16)  # 4 optimizer steps per epoch


if __name__ == "__main__":
    cli = LightningCLI(Net, save_config_kwargs={"overwrite": True})
    opt = cli.trainer.optimizers[0]
    print(f"OPTIMIZER {type(opt).__module__}.{type(opt).__name__} LR {opt.param_groups[0]['lr']!r}")
