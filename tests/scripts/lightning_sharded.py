"""Run by tests/test_distributed.py: LARS under a Lightning sharded strategy, 2 CPU processes, with
TrustRatioCallback and CSVLogger.

* ``fsdp2``: ModelParallelStrategy, ``fully_shard`` in ``configure_model``, LARS built directly;
* ``fsdp1``: FSDPStrategy (FSDP1, ``use_orig_params=True`` as Lightning sets it), ``configure_lars``.

Lightning relaunches this script for rank 1 (its subprocess launcher), so it must be a file of its own.
Usage: python lightning_sharded.py {fsdp1,fsdp2} OUT_DIR
"""

import sys
import warnings

import torch
from torch import nn

warnings.filterwarnings("ignore")

import lightning.pytorch as pl  # noqa: E402
from torch.distributed.fsdp import FullyShardedDataParallel  # noqa: E402

import lars_plugins.lightning  # noqa: E402
from lars_plugins.lightning import TrustRatioCallback  # noqa: E402

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tests/, for test_distributed's model and data
from test_distributed import STEPS, batches, finish, make_model, make_opt  # noqa: E402

ENGINE = sys.argv[1]


# Lightning allows FSDPStrategy on CUDA only (it checks the exact class, so a subclass runs on CPU),
# and FSDP1 without GPUs needs device_id=cpu, which Lightning does not pass (it passes the root
# device's index, None on CPU). Everything else is Lightning's own FSDP path.
class CPUFSDPStrategy(pl.strategies.FSDPStrategy):
    pass


_fsdp_init = FullyShardedDataParallel.__init__


def _cpu_fsdp_init(self, module, *args, device_id=None, **kwargs):
    _fsdp_init(self, module, *args, device_id=torch.device("cpu") if device_id is None else device_id, **kwargs)


FullyShardedDataParallel.__init__ = _cpu_fsdp_init


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = make_model()

    def configure_model(self):
        if ENGINE != "fsdp2":
            return
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
        if ENGINE == "fsdp2":
            return make_opt(lars_plugins.param_groups(self.model, weight_decay=1e-4))
        # A constant schedule, so that the one-process reference is test_distributed's make_opt.
        return lars_plugins.lightning.configure_lars(self, lr=2.0, weight_decay=1e-4, momentum=0.9, nesterov=True,
                                                     trust_coefficient=0.01, decay="constant")

    def train_dataloader(self):
        rank = self.trainer.global_rank
        half = slice(rank * 8, (rank + 1) * 8)  # this rank's half of each global batch
        data = [(x[half], y[half]) for x, y in batches()]
        return torch.utils.data.DataLoader(data, batch_size=None)


def full_parameters(trainer, module):
    if ENGINE == "fsdp2":
        return {n: p.full_tensor().detach() for n, p in module.model.named_parameters()}
    with FullyShardedDataParallel.summon_full_params(trainer.strategy.model):
        return {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone() for n, p in module.model.named_parameters()}


if __name__ == "__main__":
    out = sys.argv[2]
    if ENGINE == "fsdp2":
        strategy = pl.strategies.ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = CPUFSDPStrategy(auto_wrap_policy={nn.Linear})
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=STEPS, log_every_n_steps=2,
                         logger=pl.loggers.CSVLogger(out, name="logs"), callbacks=[TrustRatioCallback()],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         use_distributed_sampler=False)
    module = Net()
    trainer.fit(module)
    params = full_parameters(trainer, module)
    if trainer.global_rank == 0:
        torch.save(params, f"{out}/params.pt")
    finish()
