"""torchtitan integration: every optimizer of the registry by name in torchtitan's own optimizer
configuration.

torchtitan builds its optimizers in ``OptimizersContainer`` from ``ParamGroupConfig`` entries
(a regex over parameter names, an ``optimizer_name``, its keyword arguments) and knows three names
(``Adam``, ``AdamW``, ``DistMuon``). :class:`LayerwiseOptimizersContainer` is that container with
the names of :mod:`lars_plugins.registry` added (``lars``, ``lamb``, ``layerwise_adamw``… and
yours); torchtitan's own names keep meaning what they did, so one configuration can mix them
(LAMB for the blocks, AdamW for the embeddings). Two ways in, both torchtitan's:

* in your config function: ``optimizer=lars_plugins.torchtitan.optimizer_config("lamb", lr=2e-3)``
  (or a :class:`LayerwiseOptimizersContainer.Config` with your own ``param_groups``);
* on the command line, over any torchtitan configuration, with its override hook::

      --override.imports 'lars_plugins.torchtitan.layerwise_optimizer={"name": "lamb", "lr": 0.002}'

The optimizers see torchtitan's parameters as they are: DTensors sharded by FSDP2, tensor
parallelism or both (``_StridedShard``), whose whole-layer norms they reduce over the mesh. What
torchtitan's ``implementation`` means for them is in :data:`IMPLEMENTATIONS`.

Importing this module needs torchtitan (the ``torchtitan`` extra); ``import lars_plugins`` does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch.optim import Optimizer
from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig
from torchtitan.config.override import derive, override

from .adapters import torchtitan as torchtitan_adapter
from .registry import OptimizerEntry, optimizer_entry, optimizer_names

__all__ = ["LayerwiseOptimizersContainer", "optimizer_config", "layerwise_optimizer", "IMPLEMENTATIONS"]

# torchtitan's ``optimizer.implementation`` -> the keywords our optimizers get where a group's own
# optimizer_kwargs do not set them. "fused" (torchtitan's default, "for best performance") takes the
# fastest path each layout has, fused=None: the fused CUDA step for whole tensors on a GPU, the
# multi-tensor step with one collective per mesh dimension for sharded ones; fused=True would refuse
# every sharded run, since a fused kernel cannot reduce a norm across ranks. "foreach" is the
# multi-tensor step, "for-loop" the one-tensor-at-a-time step.
IMPLEMENTATIONS: dict[str, dict[str, Any]] = {
    "fused": {"fused": None, "foreach": None},
    "foreach": {"fused": False, "foreach": True},
    "for-loop": {"fused": False, "foreach": False},
}


def _factory(container: LayerwiseOptimizersContainer, name: str) -> Callable[..., Optimizer]:
    builtin = torchtitan_adapter.builtin_factory(name)
    if builtin is not None:
        return builtin
    try:
        entry = optimizer_entry(name)
    except ValueError as error:
        raise ValueError(f"optimizer_name={name!r}: not one of torchtitan's names (Adam, AdamW, DistMuon) nor of "
                         f"lars_plugins' ({', '.join(optimizer_names())}); {error}") from None
    config = container.config
    if config.implementation not in IMPLEMENTATIONS:
        raise ValueError(f"optimizer.implementation={config.implementation!r} with optimizer_name={name!r}: "
                         f"lars_plugins' optimizers take {', '.join(map(repr, IMPLEMENTATIONS))}; "
                         "'fused_opt_states_bf16' keeps Adam's moments in bfloat16 through torch's fused AdamW "
                         "and applies to Adam and AdamW only. Set --optimizer.implementation fused")
    # The ParamGroupConfigs of this name, in the order torchtitan built their groups (it refuses a
    # pattern that matches nothing, so every one of them has a group).
    given = [pg.optimizer_kwargs for pg in config.param_groups if pg.optimizer_name == name]
    return lambda groups, **kwargs: _build(entry, groups, given, IMPLEMENTATIONS[config.implementation], kwargs)


def _build(entry: OptimizerEntry, groups: list[dict[str, Any]], given: list[dict[str, Any]],
           implementation: dict[str, Any], kwargs: dict[str, Any]) -> Optimizer:
    accepted = set(entry.keywords())
    for group, own in zip(groups, given, strict=True):
        for key, value in implementation.items():
            if key not in own:  # torchtitan's container put it there, not the user
                if key in accepted:
                    group[key] = value
                else:
                    del group[key]
    return entry.build(groups, **kwargs)


@torchtitan_adapter.container_resolving(OptimizersContainer, _factory)
class LayerwiseOptimizersContainer(OptimizersContainer):
    """torchtitan's ``OptimizersContainer`` that also resolves the names of
    :mod:`lars_plugins.registry` (``optimizer_name="lamb"``): checkpoints (torchtitan's
    FQN-keyed optimizer state), learning-rate schedulers and the training loop treat our optimizers
    as torchtitan's own.

    torchtitan's ``implementation`` applies to our groups as :data:`IMPLEMENTATIONS` says, unless a
    group's ``optimizer_kwargs`` set ``fused``/``foreach`` themselves; ``fused_opt_states_bf16`` is
    refused for our names (it is torch's AdamW kernel on bfloat16 moments).
    """

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        """``OptimizersContainer.Config``, built as :class:`LayerwiseOptimizersContainer`."""

    def __init__(self, config: Config, *, model_parts: list[Any]) -> None:
        self.config = config  # read while the optimizers are built (_factory)
        super().__init__(config, model_parts=model_parts)


def optimizer_config(name: str, *, lr: float, pattern: str = r".*", implementation: str = "fused",
                     **options: Any) -> LayerwiseOptimizersContainer.Config:
    """A container configuration with one parameter group: every parameter whose name matches
    ``pattern`` stepped by the registry's optimizer ``name`` with ``lr`` and ``options`` (as
    torchtitan's ``default_adamw`` builds AdamW's). Biases and norms are excluded from adaptation
    by the optimizers' own ``exclude_bias_and_norm=True``, which decides from whole-parameter shapes,
    so sharding does not change what is excluded."""
    optimizer_entry(name)  # an unknown name fails here, not when the trainer builds the optimizer
    return LayerwiseOptimizersContainer.Config(
        param_groups=[ParamGroupConfig(pattern=pattern, optimizer_name=name, optimizer_kwargs={"lr": lr, **options})],
        implementation=implementation)


@override(target=OptimizersContainer.Config,
          description="lars_plugins: the registry's optimizer (LARS, LAMB, ...) for torchtitan's parameter group")
def layerwise_optimizer(config: OptimizersContainer.Config, *, name: str, lr: float,
                        **options: Any) -> LayerwiseOptimizersContainer.Config:
    """torchtitan override (``--override.imports 'lars_plugins.torchtitan.layerwise_optimizer={"name":
    "lamb", "lr": 0.002}'``): the configuration's optimizer becomes the registry's ``name`` with
    ``lr`` and ``options``, over the parameters its one group selected; ``implementation`` and the
    other fields are kept. The group's own keyword arguments are not carried over: they belong to
    another optimizer (AdamW's ``eps`` is not LARS's). A configuration with several groups is
    refused: write a :class:`LayerwiseOptimizersContainer.Config` in your config function instead."""
    optimizer_entry(name)
    if len(config.param_groups) != 1:
        raise ValueError(f"lars_plugins.torchtitan.layerwise_optimizer replaces one parameter group, and this "
                         f"configuration has {len(config.param_groups)} "
                         f"({', '.join(pg.pattern for pg in config.param_groups) or 'none'}); which optimizer "
                         "each should get is yours to say: give param_groups to "
                         "lars_plugins.torchtitan.LayerwiseOptimizersContainer.Config in your config function")
    pattern = config.param_groups[0].pattern
    return derive(config, LayerwiseOptimizersContainer.Config, param_groups=[
        ParamGroupConfig(pattern=pattern, optimizer_name=name, optimizer_kwargs={"lr": lr, **options})])
