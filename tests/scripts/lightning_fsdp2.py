"""Run by tests/test_distributed.py: LARS under Lightning's ModelParallelStrategy (FSDP2), 2 CPU processes.

Lightning relaunches this script for rank 1 (its subprocess launcher), so it must be a file of its own.
Usage: python lightning_fsdp2.py OUT_DIR
"""

import sys
import warnings

import torch
from torch import nn

warnings.filterwarnings("ignore")

import lightning.pytorch as pl  # noqa: E402

import lars_plugins  # noqa: E402
from lars_plugins.lightning import TrustRatioCallback  # noqa: E402

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tests/, for test_distributed's model and data
from test_distributed import STEPS, batches, finish, make_model, make_opt  # noqa: E402


class Sharded(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = make_model()

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in (self.model[0], self.model[3]):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.model(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return make_opt(lars_plugins.param_groups(self.model, weight_decay=1e-4))

    def train_dataloader(self):
        rank = self.trainer.global_rank
        half = slice(rank * 8, (rank + 1) * 8)  # this rank's half of each global batch
        data = [(x[half], y[half]) for x, y in batches()]
        return torch.utils.data.DataLoader(data, batch_size=None)


if __name__ == "__main__":
    out = sys.argv[1]
    strategy = pl.strategies.ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=STEPS, log_every_n_steps=2,
                         logger=pl.loggers.CSVLogger(out, name="logs"), callbacks=[TrustRatioCallback()],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         use_distributed_sampler=False)
    module = Sharded()
    trainer.fit(module)
    params = {n: p.full_tensor().detach() for n, p in module.model.named_parameters()}
    if trainer.global_rank == 0:
        torch.save(params, f"{out}/params.pt")
    finish()
