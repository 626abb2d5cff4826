"""transformers: the Trainer's closed list of optimizer names and its weight-decay split."""

from __future__ import annotations

from typing import Any

__all__ = ["optimizer_names", "decay_parameter_names"]


def optimizer_names() -> list[str]:
    """The values ``TrainingArguments.optim`` accepts (``transformers.training_args.OptimizerNames``)."""
    from transformers.training_args import OptimizerNames

    return [o.value for o in OptimizerNames]


def decay_parameter_names(model: Any) -> list[str]:
    """The names the HF Trainer decays (``Trainer.get_decay_parameter_names``), from the model alone:
    the method reads no attribute of the Trainer, so it is called without one."""
    from transformers import Trainer

    return Trainer.get_decay_parameter_names(None, model)  # type: ignore[arg-type]
