"""LightningModules for the Lightning tests, one per namespace, importable by path (ddp_spawn pickles
them; LightningCLI resolves them)."""

from __future__ import annotations

import torch
from torch import nn

import lars_plugins


def digits_loader(n=256, batch_size=32, shuffle=False):
    from lars_plugins.demo import load_digits

    data = load_digits()
    x, y = data.x_train[:n].flatten(1), data.y_train[:n]
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def make_classes(pl):
    class Net(pl.LightningModule):
        """An MLP with LayerNorm (no BatchNorm: DDP and a single process then see the same gradients)."""

        def __init__(self, lr: float = 2.0, weight_decay: float = 1e-4, warmup_steps: int = 0,
                     decay: str = "cosine", batch_size: int = 32):
            super().__init__()
            self.save_hyperparameters()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 10))
            self.seen = {}  # step -> (‖w‖, ‖g‖) of net.0.weight just before each optimizer step

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def on_before_optimizer_step(self, optimizer):
            w = self.net[0].weight
            self.seen[self.trainer.fit_loop.epoch_loop._batches_that_stepped] = (
                w.detach().norm().item(), w.grad.norm().item())

        def train_dataloader(self):
            """Digits in order; under DDP each rank takes every world_size-th sample, unshuffled, so that a
            global batch holds the same samples as one batch of world_size x batch_size in one process."""
            loader = digits_loader(batch_size=self.hparams.batch_size)
            world = self.trainer.world_size
            if world == 1:
                return loader
            sampler = torch.utils.data.DistributedSampler(loader.dataset, num_replicas=world,
                                                          rank=self.trainer.global_rank, shuffle=False)
            return torch.utils.data.DataLoader(loader.dataset, batch_size=self.hparams.batch_size, sampler=sampler)

        def configure_optimizers(self):
            h = self.hparams
            return lars_plugins.lightning.configure_lars(self, lr=h.lr, weight_decay=h.weight_decay,
                                                         warmup_steps=h.warmup_steps, decay=h.decay)

    class CLINet(Net):
        """No configure_optimizers: LightningCLI's --optimizer/--lr_scheduler build them."""

        configure_optimizers = pl.LightningModule.configure_optimizers

    class TwoOptimizers(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.automatic_optimization = False
            self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
            self.head = nn.Linear(32, 10)

        def training_step(self, batch, batch_idx):
            opt_body, opt_head = self.optimizers()
            x, y = batch
            loss = nn.functional.cross_entropy(self.head(self.body(x)), y)
            opt_body.zero_grad()
            opt_head.zero_grad()
            self.manual_backward(loss)
            opt_body.step()
            opt_head.step()
            self.log("train_loss", loss)

        def configure_optimizers(self):
            return (lars_plugins.LARS(self.body.parameters(), lr=1.0),
                    torch.optim.SGD(self.head.parameters(), lr=0.1))

    return Net, CLINet, TwoOptimizers


def make_clean_exit_ddp_spawn(pl):
    """A ``ddp_spawn`` strategy class whose workers leave without interpreter teardown, once fit is
    done, rank 0 has queued its results and every rank has passed a barrier. At teardown gloo's
    still-joinable communication thread makes the C++ runtime abort a finished worker now and then
    ("terminate called without an active exception"): the workers of test_distributed leave the
    same way for the same reason."""
    import os
    import sys

    import torch.distributed as dist

    launchers = __import__(f"{pl.__name__}.strategies.launchers.multiprocessing", fromlist=["_"])

    class CleanExitLauncher(launchers._MultiProcessingLauncher):
        def _wrapping_function(self, *args, **kwargs):
            super()._wrapping_function(*args, **kwargs)
            if dist.is_initialized():
                dist.barrier()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    class CleanExitDDPSpawn(pl.strategies.DDPStrategy):
        def __init__(self, **kwargs):
            super().__init__(start_method="spawn", **kwargs)

        def _configure_launcher(self):
            super()._configure_launcher()
            self._launcher = CleanExitLauncher(self, start_method=self._start_method)

    return CleanExitLauncher, CleanExitDDPSpawn


import lars_plugins.lightning  # noqa: E402
import lars_plugins.pytorch_lightning  # noqa: E402

try:
    import lightning.pytorch as _L

    Net, CLINet, TwoOptimizers = make_classes(_L)
    CleanExitLauncher, CleanExitDDPSpawn = make_clean_exit_ddp_spawn(_L)
    for _c in (Net, CLINet, TwoOptimizers, CleanExitLauncher, CleanExitDDPSpawn):
        _c.__module__, _c.__qualname__ = __name__, _c.__name__
except ImportError:  # pragma: no cover
    pass

try:
    import pytorch_lightning as _PL

    PLNet, PLCLINet, PLTwoOptimizers = make_classes(_PL)
    for _c, _n in ((PLNet, "PLNet"), (PLCLINet, "PLCLINet"), (PLTwoOptimizers, "PLTwoOptimizers")):
        _c.__name__ = _c.__qualname__ = _n
except ImportError:  # pragma: no cover
    pass
