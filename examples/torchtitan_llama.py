"""torchtitan's own Trainer with LAMB or LARS from lars_plugins, on its llama3 debug model.

    torchrun --nproc_per_node 4 examples/torchtitan_llama.py                    # dp 2 x tp 2, LAMB
    torchrun --nproc_per_node 4 examples/torchtitan_llama.py --optimizer lars --lr 1.0
    torchrun --nproc_per_node 4 examples/torchtitan_llama.py -- --debug.seed 0   # torchtitan's own flags

This is torchtitan's training loop, configuration and parallelize function (``parallelize_llama``:
tensor parallelism on the ``tp`` mesh dimension, then FSDP2 on ``dp_shard``) with nothing replaced
but the optimizer, selected through torchtitan's override hook exactly as on its command line::

    --override.imports 'lars_plugins.torchtitan.layerwise_optimizer={"name": "lamb", "lr": 0.002}'

torchtitan's debug configuration reads a tokenizer and the ``c4_test`` sample from its repository's
``tests/assets``, which its wheel does not ship; this script writes stand-ins (a word-level
tokenizer and a few hundred synthetic lines) to ``--assets`` so that nothing is downloaded. Flags
after ``--`` go to torchtitan's ``ConfigManager`` unchanged.

On a machine without CUDA it runs on CPU with gloo. torchtitan 0.3 assumes a GPU in five places;
:func:`run_on_cpu` works around each from the outside (nothing of torchtitan is edited): the device
type, FlexAttention (no backward on CPU: scaled-dot-product attention instead), FSDP's pre-scaled
sum (gloo has no PREMUL_SUM), the GPU memory monitor and ``barrier(device_ids=...)``. On GPUs none of
these apply and the same command runs torchtitan as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import torch

WORDS = [f"w{i}" for i in range(1000)]


def write_assets(folder: Path) -> tuple[Path, Path]:
    """A word-level tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) whose vocabulary fits the
    debug model's 2048 entries, and a ``c4_test``-shaped dataset (JSON lines with a ``text`` field)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer_dir, data_dir = folder / "tokenizer", folder / "c4_test"
    if (data_dir / "train.json").exists():
        return tokenizer_dir, data_dir
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(["<unk>", "<|begin_of_text|>", "<|end_of_text|>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tokenizer_dir / "tokenizer.json"))
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "add_bos_token": True}))
    # Text with structure to learn: each line walks the vocabulary in small strides from a random start.
    rng = random.Random(0)
    with open(data_dir / "train.json", "w") as f:
        for _ in range(400):
            start, stride = rng.randrange(len(WORDS)), rng.choice([1, 2, 3])
            f.write(json.dumps({"text": " ".join(WORDS[(start + k * stride) % len(WORDS)] for k in range(200))}))
            f.write("\n")
    return tokenizer_dir, data_dir


def run_on_cpu() -> None:
    """torchtitan 0.3 on CPU processes with gloo: the workarounds that apply before its modules load."""
    import torch._utils

    torch._utils._get_available_device_type = lambda: "cpu"  # else torchtitan picks "cuda"

    import torchtitan.components.metrics as metrics
    import torchtitan.distributed.utils as dist_utils

    class NoDeviceMemory:  # torch.cpu has no memory statistics for torchtitan's monitor to read
        device_name = "cpu"

        def get_peak_stats(self) -> Any:
            from torchtitan.components.metrics import DeviceMemStats

            return DeviceMemStats(*[0] * len(DeviceMemStats._fields))

        def reset_peak_stats(self) -> None:
            pass

    metrics.build_device_memory_monitor = NoDeviceMemory
    # After the first step torchtitan shortens the process-group timeouts with a barrier that takes
    # device ids (CUDA only); on CPU the defaults stay.
    dist_utils.set_pg_timeouts = lambda *args, **kwargs: None


def cpu_model(trainer_config: Any) -> None:
    """The model's parts that need a GPU, replaced in the configuration: scaled-dot-product attention
    for FlexAttention, whose backward has no CPU kernel."""
    from torchtitan.models.common.attention import ScaledDotProductAttention

    for layer in trainer_config.model_spec.model.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()


def sum_reductions_on_gloo(trainer: Any) -> None:
    """FSDP reduces gradients with a pre-scaled sum (PREMUL_SUM), which gloo lacks; a plain sum is the
    same reduction here, since torchtitan divides the loss by the global token count itself."""
    from torch.distributed.fsdp import FSDPModule

    for part in trainer.model_parts:
        for module in part.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="lamb", help="a name of lars_plugins' registry (lamb, lars, ...)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel degree (FSDP2 takes the rest)")
    parser.add_argument("--assets", type=Path, default=Path("torchtitan_assets"),
                        help="where the stand-in tokenizer and data are written (and read back)")
    parser.add_argument("--dump-folder", type=Path, default=Path("torchtitan_outputs"))
    parser.add_argument("torchtitan_args", nargs="*", help="after --: flags for torchtitan's ConfigManager")
    args = parser.parse_args(argv)

    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        run_on_cpu()
    from torchtitan.config import ConfigManager

    tokenizer_dir, data_dir = write_assets(args.assets)
    options = {"name": args.optimizer, "lr": args.lr, "weight_decay": args.weight_decay}
    config = ConfigManager().parse_args([
        "--module", "llama3", "--config", "llama3_debugmodel",
        "--override.imports", f"lars_plugins.torchtitan.layerwise_optimizer={json.dumps(options)}",
        "--hf-assets-path", str(tokenizer_dir), "--dataloader.dataset-path", str(data_dir),
        "--training.steps", str(args.steps), "--training.seq-len", "128", "--training.local-batch-size", "4",
        "--parallelism.tensor-parallel-degree", str(args.tp), "--dump-folder", str(args.dump_folder),
        "--checkpoint.no-enable", "--validator.no-enable", "--metrics.log-freq", "1",
        *(["--training.mixed-precision-param", "float32", "--optimizer.implementation", "foreach"]
          if on_cpu else []),
        *args.torchtitan_args,
    ])
    if on_cpu:
        cpu_model(config)

    losses: list[float] = []
    trainer = config.build()
    if on_cpu:
        sum_reductions_on_gloo(trainer)
    log = trainer.metrics_processor.log

    def record(step: int, global_avg_loss: float, *rest: Any, **kwargs: Any) -> Any:
        losses.append(global_avg_loss)
        return log(step, global_avg_loss, *rest, **kwargs)

    trainer.metrics_processor.log = record
    try:
        trainer.train()
        optimizers = sorted({f"{type(o).__module__}.{type(o).__name__}" for o in trainer.optimizers})
        placements = sorted({str(tuple(p.placements)) for part in trainer.model_parts
                             for p in part.parameters() if hasattr(p, "placements")})
    finally:
        trainer.close()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    summary = {"losses": losses, "optimizers": optimizers, "container": type(trainer.optimizers).__name__,
               "placements": placements}
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
