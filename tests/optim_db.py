"""One table of the package's layer-wise optimizers, from which tests/test_optim_db.py generates the
checks every one of them must pass (as torch's ``optim_db`` in ``common_optimizers.py`` does), and
the distributed tests take the optimizers they run under every engine.

A new optimizer gets all of them by adding one :class:`OptimizerRow`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from lars_plugins import LAMB, LARS, Layerwise, LayerwiseAdamW, tensor_lists


@dataclass(frozen=True)
class OptimizerRow:
    """How to build one optimizer, and what it answers to.

    ``build(params, **keywords)`` makes it with the row's settings, ``keywords`` overriding them;
    ``numbers`` are numeric constructor keywords with valid, non-default values (given as NumPy
    scalars in one test); ``abbreviation`` is a group key that is a prefix of one of its keys, with
    that key; ``bad_load`` a group value a checkpoint must not bring in; ``sparse`` what a sparse
    gradient gets: ``"refused"`` (a RuntimeError naming it) or ``"dense"`` (the step of its dense
    equivalent, where the base optimizer supports them); ``accelerator_path(monkeypatch)`` forces
    the paths an accelerator takes (no host reads) on CPU tensors; ``distributed`` the optimizer the
    engine-parity tests run (``None``: not run there).
    """

    name: str
    build: Callable[..., torch.optim.Optimizer]
    numbers: dict[str, float]
    abbreviation: tuple[str, str]
    bad_load: tuple[str, Any]
    sparse: str = "refused"
    distributed: Optional[Callable[[Any], torch.optim.Optimizer]] = None
    wraps: bool = False  # a wrapper over a base optimizer (its groups are the base's)

    def __str__(self) -> str:
        return self.name

    def accelerator_path(self, monkeypatch: Any) -> None:
        monkeypatch.setattr(tensor_lists, "_FORCED_PATH", "tensor")
        if self.wraps:
            def host_path(*_: Any) -> None:
                raise AssertionError("the CPU rescaling ran where the tensor path was asked for")
            monkeypatch.setattr(Layerwise, "_rescale_on_host", host_path)


def _with(defaults: dict[str, Any], keywords: dict[str, Any]) -> dict[str, Any]:
    return {**defaults, **keywords}


def _layerwise_sgd(params: Any, **keywords: Any) -> Layerwise:
    base_keys = {"lr", "momentum", "weight_decay", "foreach"}
    base = {k: v for k, v in keywords.items() if k in base_keys}
    ours = {k: v for k, v in keywords.items() if k not in base_keys}
    return Layerwise(torch.optim.SGD(params, **_with({"lr": 0.1, "momentum": 0.9}, base)),
                     **_with({"trust_coefficient": 0.02}, ours))


ROWS = [
    OptimizerRow(
        "lars", lambda params, **kw: LARS(params, **_with({"lr": 0.5, "momentum": 0.9, "weight_decay": 1e-4}, kw)),
        numbers={"lr": 0.5, "momentum": 0.8, "weight_decay": 1e-3, "trust_coefficient": 0.01},
        abbreviation=("trust_coef", "trust_coefficient"), bad_load=("lr", -1.0),
        distributed=lambda params: LARS(params, lr=2.0, momentum=0.9, nesterov=True, weight_decay=1e-4,
                                        trust_coefficient=0.01)),
    OptimizerRow(
        "lamb", lambda params, **kw: LAMB(params, **_with({"lr": 1e-2, "weight_decay": 0.01}, kw)),
        numbers={"lr": 2e-2, "eps": 1e-5, "weight_decay": 0.05},
        abbreviation=("weight_dec", "weight_decay"), bad_load=("eps", -1.0),
        distributed=lambda params: LAMB(params, lr=1e-2, trust_clip=True)),
    OptimizerRow(
        "layerwise_sgd", _layerwise_sgd,
        numbers={"trust_coefficient": 0.05, "trust_eps": 1e-6},
        abbreviation=("trust_coef", "trust_coefficient"), bad_load=("trust_coefficient", 0.0),
        sparse="dense", wraps=True),
    OptimizerRow(
        "layerwise_adamw", lambda params, **kw: LayerwiseAdamW(params, **_with({"lr": 1e-2}, kw)),
        numbers={"lr": 2e-2, "eps": 1e-6, "weight_decay": 0.05, "trust_coefficient": 0.5},
        abbreviation=("trust_e", "trust_eps"), bad_load=("trust_eps", -1.0), wraps=True,
        distributed=lambda params: Layerwise(torch.optim.AdamW(params, lr=1e-2), trust_coefficient=0.5)),
]

ROWS_BY_NAME = {row.name: row for row in ROWS}
# The engine-parity tests' optimizers, by the names those tests use.
DISTRIBUTED = {("layerwise" if row.name == "layerwise_adamw" else row.name): row.distributed
               for row in ROWS if row.distributed is not None}
