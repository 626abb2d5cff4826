"""Parameter groups for LARS built from module types and names, with optional layer-wise LR decay."""

from __future__ import annotations

import fnmatch
import re
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from .blocks import block_ids
from .adapters import fsdp1, transformers as hf_adapter
from .layouts import is_fsdp1, layer_shape

__all__ = ["param_groups", "default_exclude", "is_bias_or_norm", "block_ids", "timm_layer_ids", "NORM_TYPES"]

# Modules whose parameters are normalisation scales and shifts: LARS leaves them unadapted and
# undecayed, as the paper's successors (MLPerf, SimCLR, BYOL, MoCo v3) do.
NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t
    for t in (
        nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
        nn.LayerNorm,
        nn.GroupNorm,
        nn.LocalResponseNorm,
        getattr(nn, "RMSNorm", None),  # torch >= 2.4
    )
    if t is not None
)

# A module whose class name says "norm" (HF's BertLayerNorm-style and timm's LayerNorm2d, RmsNorm...)
_NORM_NAME = re.compile(r"norm", re.IGNORECASE)

ExcludeT = Union[None, Callable[[str, nn.Parameter, nn.Module], bool], Sequence[str]]


def is_bias_or_norm(name: str, param: nn.Parameter, module: nn.Module) -> bool:
    """Exclusion by name and module alone: biases, every parameter of a normalisation module, and the
    1-D parameters of a module whose class name says "norm" (a custom RMSNorm) -- not its 2-D
    weights (a ``Normalizer.proj``). Never by ``ndim`` alone, so a flattened 1-D weight stays adapted.
    """
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "bias" or isinstance(module, NORM_TYPES):
        return True
    return param.ndim <= 1 and bool(_NORM_NAME.search(type(module).__name__))


def default_exclude(model: nn.Module) -> Callable[[str, nn.Parameter, nn.Module], bool]:
    """The exclusion rule of the model's own framework: what it leaves without weight decay.

    * A transformers model (a ``PreTrainedModel``): the HF Trainer's split
      (``Trainer.get_decay_parameter_names``: ``nn.LayerNorm`` parameters and names with ``bias`` or a
      ``norm`` part), so that LARS adapts exactly what the Trainer would decay.
    * Any other model: timm's (``param_groups_weight_decay``): every tensor with ``ndim <= 1``
      (biases, norm scales, EVA's ``q_bias``/``v_bias``, LayerScale ``gamma``), names ending in
      ``.bias``, and the names the model lists in ``no_weight_decay()`` (``pos_embed``,
      ``cls_token``...), as timm's ``create_optimizer_v2`` reads them. Parameters of normalisation
      modules are excluded whatever their shape.
    """
    if any(cls.__name__ == "PreTrainedModel" for cls in type(model).__mro__):
        decay = set(_hf_decay_parameter_names(model))
        return lambda name, param, module: name not in decay
    no_decay = getattr(model, "no_weight_decay", None)
    patterns = set(no_decay()) if callable(no_decay) else set()
    shapes = _original_shapes(model)
    return lambda name, param, module: (
        len(shapes.get(id(param), layer_shape(param))) <= 1 or name.endswith(".bias") or name == "bias"
        or isinstance(module, NORM_TYPES) or any(fnmatch.fnmatchcase(unwrapped_name(name), p) for p in patterns))


def _original_shapes(model: nn.Module) -> dict[int, torch.Size]:
    """Shapes of FSDP1 ``use_orig_params`` parameters, which are 1-D views of their shard: the timm
    rule must see the original shape (ZeRO-3's ``ds_shape`` is read by :func:`layer_shape`)."""
    if not any(is_fsdp1(p) and not fsdp1.is_flat_parameter(p) for p in model.parameters()):
        return {}
    shapes = {}
    for key, (handle, index) in fsdp1.find_handles().items():
        if index is not None:
            shapes[key] = fsdp1.original_shapes(fsdp1.flat_parameter(handle))[index]
    return shapes


# Modules that wrappers insert into parameter names (FSDP1, activation checkpointing, torch.compile).
_WRAPPERS = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


def unwrapped_name(name: str) -> str:
    """A parameter's name as in the unwrapped model (without FSDP1/checkpointing/compile wrappers)."""
    return _WRAPPERS.sub("", name)


def _hf_decay_parameter_names(model: nn.Module) -> list[str]:
    """The HF Trainer's own decay split (it needs the model alone, not a Trainer)."""
    return hf_adapter.decay_parameter_names(model)


def renamed_exclude(exclude_if: ExcludeT, renamed: dict[str, Any], function: str) -> ExcludeT:
    """``exclude_if``, or the value given under its former name ``exclude`` (with a ``FutureWarning``);
    any other extra keyword is a ``TypeError``, as Python would raise it."""
    unknown = [key for key in renamed if key != "exclude"]
    if unknown:
        raise TypeError(f"{function}() got an unexpected keyword argument {unknown[0]!r}")
    if "exclude" not in renamed:
        return exclude_if
    if exclude_if is not None:
        raise TypeError(f"{function}(): give exclude_if (the rule choosing excluded parameters), not also exclude, "
                        "its former name")
    warnings.warn(f"{function}(exclude=...) is now {function}(exclude_if=...): 'exclude' is the per-group bool the "
                  "rule decides", FutureWarning, stacklevel=3)
    return renamed["exclude"]


def _exclusion_rule(exclude_if: ExcludeT, model: nn.Module) -> Callable[[str, nn.Parameter, nn.Module], bool]:
    if exclude_if is None:
        return default_exclude(model)
    if callable(exclude_if):
        return exclude_if
    if isinstance(exclude_if, str):
        raise TypeError("exclude_if must be a callable or a sequence of name patterns, got a single string; "
                        f"write exclude_if=[{exclude_if!r}]")
    patterns = list(exclude_if)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"exclude_if patterns must be strings, got {patterns!r}")
    return lambda name, param, module: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def timm_layer_ids(model: nn.Module) -> Optional[dict[str, int]]:
    """A timm model's depths for layer decay, as timm's ``param_groups_layer_decay`` assigns them: its
    ``group_matcher(coarse=False)`` (ViT's final norm with the head, Swin's blocks one by one, ConvNeXt's
    stem as one depth), and parameters the matcher leaves out at the deepest. ``None`` for a model
    without one (not a timm model, or timm not installed)."""
    if not (hasattr(model, "group_matcher") and type(model).__module__.startswith("timm.")):
        return None
    try:
        from timm.models import group_parameters
    except ImportError:
        return None
    matcher = getattr(model, "group_matcher")
    layer_map = group_parameters(model, matcher(coarse=False), reverse=True)
    deepest = max(layer_map.values(), default=0)
    return {name: layer_map.get(name, deepest) for name, _ in model.named_parameters()}


def param_groups(
    model: nn.Module,
    weight_decay: float = 0.0,
    exclude_if: ExcludeT = None,
    *,
    lr: Optional[float] = None,
    layer_decay: Optional[float] = None,
    layer_id: Optional[Callable[[str], int]] = None,
    **renamed: Any,
) -> list[dict[str, Any]]:
    """Parameter groups for :class:`lars_plugins.LARS` (or any torch optimizer).

    Parameters chosen by ``exclude_if`` (default :func:`default_exclude`: what the model's own framework
    leaves without weight decay -- timm's rule, or the HF Trainer's for a transformers model) go to
    groups with ``exclude=True, weight_decay=0``;
    the rest to groups with ``exclude=False, weight_decay=weight_decay``. Every group carries
    ``(name, parameter)`` pairs, so ``group["param_names"]`` is filled in by torch.
    Frozen parameters (``requires_grad=False``) are left out.

    ``exclude_if`` may be a callable ``(name, param, module) -> bool`` or a sequence of ``fnmatch``
    patterns on qualified names (``["*.bias", "*norm*", "pos_embed"]``). (It was called ``exclude``,
    the name of the per-group bool it decides; that spelling still works, with a ``FutureWarning``.)

    With ``layer_decay`` (in ``(0, 1]``, fine-tuning): each group gets ``lr = lr·layer_decay**(D-d)``
    for depth ``d`` of ``D`` (a timm model's own grouping, :func:`timm_layer_ids`, as timm's
    ``param_groups_layer_decay`` takes it; for other models :func:`block_ids`, the convention of
    BEiT and ELECTRA that transformers' models share; or your ``layer_id(name) -> int``), so the head
    keeps ``lr`` and shallow layers get less. The scale is also stored as ``applied_lr_scale``; since
    the scaled ``lr`` is on the group itself, every torch LR scheduler keeps the ratios, and timm's
    schedulers (which multiply a group's ``lr_scale`` in) do not apply it a second time. Without
    ``layer_decay``, ``lr`` (if given) is set on every group as it is.
    """
    exclude_if = renamed_exclude(exclude_if, renamed, "param_groups")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    if layer_decay is not None:
        if isinstance(layer_decay, bool) or not isinstance(layer_decay, (int, float)) or not 0 < layer_decay <= 1:
            raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay!r}")
        if lr is None or isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr < 0:
            raise ValueError(f"layer_decay needs the base learning rate: lr must be a number >= 0, got {lr!r}")
    elif lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr < 0):
        raise ValueError(f"lr must be a number >= 0, got {lr!r}")
    rule = _exclusion_rule(exclude_if, model)

    modules = dict(model.named_modules())
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    depth: dict[str, int] = {}
    if layer_decay is not None:
        all_names = [n for n, _ in model.named_parameters()]  # depth must not change when layers are frozen
        if layer_id is not None:
            depth = {n: layer_id(n) for n in all_names}
        else:
            depth = timm_layer_ids(model) or block_ids(all_names)
    deepest = max(depth.values(), default=0)

    groups: dict[tuple[Optional[bool], int], dict[str, Any]] = {}
    for name, param in named:
        module = modules[name.rpartition(".")[0]]
        excluded: Optional[bool] = bool(rule(name, param, module))
        if fsdp1.is_flat_parameter(param):
            # An FSDP1 FlatParameter holds weights, biases and norms together: LARS decides per
            # original layer by its shape (exclude=None), which the name rules cannot do.
            if exclude_if is not None:
                raise ValueError(f"{name} is an FSDP1 flat parameter, so exclusion by name cannot apply to the layers "
                                 "inside it; wrap with use_orig_params=True, or leave exclude_if=None (biases and "
                                 "norms are then excluded by their original shapes)")
            excluded = None
        d = depth.get(name, 0)
        group = groups.get((excluded, d))
        if group is None:
            group = groups[(excluded, d)] = {
                "params": [],
                "weight_decay": 0.0 if excluded is True else float(weight_decay),
                "exclude": excluded,
            }
            if layer_decay is not None:
                scale = float(layer_decay) ** (deepest - d)
                group.update(lr=float(lr) * scale, applied_lr_scale=scale, layer_id=d)  # type: ignore[arg-type]
            elif lr is not None:  # every group at lr: the same as the optimizer's lr, set on the groups
                group["lr"] = float(lr)
        group["params"].append((name, param))
    return [groups[k] for k in sorted(groups, key=lambda k: (k[1], -1 if k[0] is None else int(k[0])))]
