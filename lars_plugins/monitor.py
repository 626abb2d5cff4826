"""Per-layer trust-ratio monitoring for any torch optimizer, framework-free.

:class:`TrustRatioMonitor` hooks an optimizer's ``step()`` and, on the steps it is asked to record,
collects per parameter ``‖w‖`` (before the update), ``‖g‖``, the trust ratio and the effective LR.
Nothing is computed on other steps; a recording step reduces on the device and crosses to the host
once per device. The records go to a :class:`~lars_plugins.history.TrustRatioHistory`
(:mod:`lars_plugins.history`) and to whatever logger the integrations hand them to.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable, Iterable, NamedTuple, Optional, Protocol, Sequence, Union, cast, runtime_checkable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .adapters import fsdp1, lightning, timm
from .distributed import ShardedNorms, is_dtensor, to_local
from .tensor_lists import buckets, indices_by, ratio_dtype
from .groups import unwrapped_name
from .history import METRICS, STATS_SUFFIX, TrustRatioHistory
from .layouts import FlatLayout, LayoutResolver, merge

__all__ = ["TrustRatioMonitor", "MonitoredOptimizer", "LayerRecord"]

_ADAPTED_ONLY = ("trust_ratio", "effective_lr")  # for layer-wise optimizers, summarised over adapted layers


@runtime_checkable
class MonitoredOptimizer(Protocol):
    """What the monitor asks of a layer-wise optimizer beyond torch's ``Optimizer`` (every
    :class:`~lars_plugins.base.LayerwiseOptimizer` provides it; any other optimizer is monitored
    from its parameters alone, its ratio reported as ``‖w‖/‖g‖``)."""

    def is_excluded(self, group: dict[str, Any], param: Any) -> bool:
        """Whether ``param`` of ``group`` takes no trust ratio."""

    def takes_norms(self, group: dict[str, Any]) -> bool:
        """Whether a step of ``group`` hands over the norms it takes (:meth:`hand_norms_to`)."""

    def hand_norms_to(self, sink: Optional[dict[Tensor, tuple[Any, Any]]]) -> None:
        """Put ``(‖w‖, ‖g‖ or None)`` of the adapted parameters a step takes into ``sink``."""

    @property
    def handed_norms(self) -> Optional[dict[Tensor, tuple[Any, Any]]]:
        """The sink of :meth:`hand_norms_to`, or ``None``."""

    def layout(self, group: dict[str, Any]) -> Optional[FlatLayout]:
        """The flat layout (FSDP1, ZeRO) of ``group``, or ``None`` for whole tensors."""

    def layer_trust_ratios(self, group: dict[str, Any]) -> Optional[tuple[FlatLayout, Tensor]]:
        """The last step's ratio of each layer of a flat group."""


class LayerRecord(NamedTuple):
    """One layer as a recording step saw it (values as tensors on its device, or Python floats)."""

    order: float  # its place in the model
    name: str
    device: torch.device
    weight_norm: Any
    grad_norm: Any
    lr: Any
    ratio: Any  # None: not adapted, or no layer-wise optimizer

def unwrap_optimizer(optimizer: Any) -> Optimizer:
    """The torch optimizer inside wrappers (Lightning's ``LightningOptimizer``, Accelerate's
    ``AcceleratedOptimizer``, timm's ``Lookahead``), whose ``step()`` is the one that really runs."""
    for _ in range(8):
        candidates = [lightning.wrapped_optimizer(optimizer), getattr(optimizer, "optimizer", None),
                      timm.lookahead_base(optimizer)]
        inner = next((c for c in candidates if isinstance(c, Optimizer)), None)
        if inner is None:
            break
        optimizer = inner
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (or a wrapper of one), "
                        f"got {type(optimizer).__name__}")
    return optimizer


class TrustRatioMonitor:
    """Record per-layer ``‖w‖``, ``‖g‖``, trust ratio and effective LR on chosen optimizer steps.

    What is recorded, per parameter (by qualified name):

    * ``weight_norm``: ``‖w‖`` before the update; ``grad_norm``: ``‖g‖`` as the optimizer saw it
      (after unscaling and clipping, before the update);
    * ``trust_ratio``: for :class:`lars_plugins.LARS`, the ratio the step actually used
      (``state[p]["trust_ratio"]``, post-clip; excluded parameters have none); for any other optimizer,
      ``‖w‖/‖g‖``, the quantity of the paper's Table 2, as a diagnostic;
    * ``effective_lr``: ``lr·ratio`` for adapted LARS parameters, the group's ``lr`` otherwise.

    Recording happens on the optimizer steps where ``every_n_steps`` divides the monitor's step
    count (0, n, 2n…), or on the next step after :meth:`record_next_step` (what framework callbacks
    use). Other steps cost one Python ``if``. A step the optimizer skips (an AMP overflow, where the
    scaler never calls ``step()``) records nothing.

    Args:
        model: the model, for parameter names (or an iterable of ``(name, param)``); ``None`` takes
            names from the optimizer's ``param_names`` group key, else ``group{i}.param{j}``.
        optimizer: the optimizer, or a framework wrapper of one.
        every_n_steps: record every n-th optimizer step; ``None``: only when asked.
        per_layer: report one value per layer and metric.
        summaries: report ``{metric}_stats/min|median|max`` over layers (for LARS, LAMB and
            ``Layerwise``, those of ``trust_ratio`` and ``effective_lr`` over the adapted layers only).
        metrics: which of :data:`METRICS` to report.
        keep_history: keep every record in :attr:`history`.
        on_record: called as ``on_record(step, metrics)`` after each recording step (e.g. a logger).
    """

    def __init__(
        self,
        model: Union[nn.Module, Iterable[tuple[str, Tensor]], None],
        optimizer: Any,
        *,
        every_n_steps: Optional[int] = None,
        per_layer: bool = True,
        summaries: bool = True,
        metrics: Sequence[str] = METRICS,
        keep_history: bool = True,
        on_record: Optional[Callable[[int, dict[str, float]], None]] = None,
    ) -> None:
        check_options(every_n_steps=every_n_steps, per_layer=per_layer, summaries=summaries, metrics=metrics)
        self.optimizer = unwrap_optimizer(optimizer)
        self.every_n_steps = every_n_steps
        self.per_layer = per_layer
        self.summaries = summaries
        self.metrics = tuple(m for m in METRICS if m in metrics)
        self.on_record = on_record
        self.history: Optional[TrustRatioHistory] = TrustRatioHistory() if keep_history else None
        self.latest: Optional[dict[str, float]] = None
        self.step = 0  # optimizer steps seen (skipped AMP steps are not steps)
        self._names = _parameter_names(model, self.optimizer)  # param -> (model order, name)
        # FSDP1 flat parameters: their layers are named by the flat parameter's place in the model.
        self._flat_names = {id(p): name.rpartition(fsdp1.FLAT_PARAM_NAME)[0] for p, (_, name) in self._names.items()
                            if name.endswith(fsdp1.FLAT_PARAM_NAME)}
        built_with = [p for g in self.optimizer.param_groups for p in g["params"]]
        self._layouts = LayoutResolver(list(self._names) or built_with, owner="TrustRatioMonitor")
        self._n_groups = len(self.optimizer.param_groups)
        self._members: dict[tuple[int, ...], list[bool]] = {}
        self._merged_layouts: dict[tuple[int, ...], tuple[FlatLayout, list[slice]]] = {}
        self._armed_step: Optional[int] = None
        self._recording = False
        self._calls = 0  # step() calls seen in the current optimizer step
        self._weight_norms: dict[Any, Tensor] = {}
        self._sink: Optional[dict[Tensor, tuple[Any, Any]]] = None  # norms the optimizer hands over
        self._entries: list[LayerRecord] = []
        self._handles = [
            self.optimizer.register_step_pre_hook(self._before_step),
            self.optimizer.register_step_post_hook(self._after_step),
        ]

    # --- control -------------------------------------------------------------------------------

    def record_next_step(self, step: Optional[int] = None) -> None:
        """Record the next optimizer step, reported under ``step`` (default: the monitor's count)."""
        self._armed_step = self.step if step is None else int(step)

    def cancel_recording(self) -> None:
        """Undo :meth:`record_next_step` (``every_n_steps`` still applies)."""
        self._armed_step = None

    def will_record(self) -> bool:
        """Whether the next optimizer step will be recorded."""
        return self._armed_step is not None or (self.every_n_steps is not None and self.step % self.every_n_steps == 0)

    def remove(self) -> None:
        """Detach from the optimizer."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "TrustRatioMonitor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # --- hooks ---------------------------------------------------------------------------------

    def _before_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if self._calls == 0:  # the first (usually only) call of an optimizer step decides
            self._recording = self.will_record()
        if not self._recording:
            return
        # ‖w‖ before the update. Taken for every parameter: under a closure (Lightning) the
        # gradients of this step do not exist yet, so which parameters get one is not known. Those
        # whose norms the optimizer takes itself (LARS's, LAMB's adapted parameters) are handed over.
        plain, flat = self._split(optimizer)
        if isinstance(optimizer, MonitoredOptimizer):
            handed = {p for group in optimizer.param_groups if optimizer.takes_norms(group)  # one layout lookup
                      for p in group["params"] if not optimizer.is_excluded(group, p)}
            if handed:
                sink = optimizer.handed_norms  # another monitor of this optimizer may have asked already
                self._sink = sink if sink is not None else {}
                optimizer.hand_norms_to(self._sink)
                plain = [p for p in plain if p not in handed]
        if plain:
            self._weight_norms.update(zip(plain, _norms(plain)))
        if flat:
            layout, tensors, spans = self._merged(flat)
            w_norms = layout.norms(layout.views(tensors), dtype=ratio_dtype(tensors[0].dtype),
                                   device=tensors[0].device)[0]
            for (_, group_layout), span in zip(flat, spans):
                self._weight_norms[id(group_layout)] = w_norms[span]

    def _split(self, optimizer: Optimizer) -> tuple[list[Tensor], list[tuple[dict[str, Any], FlatLayout]]]:
        """The plain (or DTensor) parameters of the groups stepped now, and the groups with flat layouts."""
        plain, flat = [], []
        for group in optimizer.param_groups:
            layout = self._layout(optimizer, group)
            if layout is None:
                plain += group["params"]
            else:
                flat.append((group, layout))
        return plain, flat

    def _merged(self, flat: list[tuple[dict[str, Any], FlatLayout]]) -> tuple[FlatLayout, list[Tensor], list[slice]]:
        """The flat layouts of several groups as one (one collective for all), their tensors, and
        where each group's layers lie in it."""
        key = tuple(id(layout) for _, layout in flat)
        if key not in self._merged_layouts:
            merged = merge([(layout, len(group["params"])) for group, layout in flat])
            bounds = [0]
            for _, layout in flat:
                bounds.append(bounds[-1] + len(layout.layers))
            self._merged_layouts[key] = (merged, [slice(a, b) for a, b in zip(bounds, bounds[1:])])
        merged, spans = self._merged_layouts[key]
        return merged, [t for group, _ in flat for t in group["params"]], spans

    def _after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if self._recording:
            self._entries += self._collect(optimizer)
        self._calls += 1
        if self._calls < self._calls_per_step(optimizer):
            return
        # The optimizer step is complete (DeepSpeed ZeRO steps the optimizer once per partition).
        if isinstance(optimizer, MonitoredOptimizer) and optimizer.handed_norms is not None:
            optimizer.hand_norms_to(None)
        self._sink = None
        step = self._armed_step if self._armed_step is not None else self.step
        entries, recording = self._entries, self._recording
        self._weight_norms, self._entries, self._armed_step, self._calls, self._recording = {}, [], None, 0, False
        self.step += 1
        if not recording:
            return
        record = self._record(entries)
        self.latest = record
        if self.history is not None:
            self.history.append(step, record)
        if self.on_record is not None:
            self.on_record(step, record)

    def _calls_per_step(self, optimizer: Optimizer) -> int:
        """How many ``step()`` calls make one optimizer step: DeepSpeed ZeRO-1/2 call the optimizer
        once per param group (showing it that group alone), ZeRO-3 once per sub-group."""
        if len(optimizer.param_groups) < self._n_groups:
            return self._n_groups
        if any(len(group["params"]) > 1 for group in optimizer.param_groups):
            return 1  # ZeRO-3 shows one flat partition at a time: no layout lookup on ordinary steps
        layouts = [self._layout(optimizer, group) for group in optimizer.param_groups]
        return max((layout.calls_per_step for layout in layouts if layout is not None), default=1)

    def _layout(self, optimizer: Optimizer, group: dict[str, Any]) -> Optional[FlatLayout]:
        if not group["params"]:
            return None
        if isinstance(optimizer, MonitoredOptimizer):
            return optimizer.layout(group)
        return self._layouts(group["params"])

    # --- collection ----------------------------------------------------------------------------

    def _collect(self, optimizer: Optimizer) -> list[LayerRecord]:
        """A :class:`LayerRecord` of every layer stepped now."""
        entries: list[LayerRecord] = []
        layerwise = optimizer if isinstance(optimizer, MonitoredOptimizer) else None
        unnamed = len(self._names)
        plain_params, flat = self._split(optimizer)
        flat = [(group, layout) for group, layout in flat if id(layout) in self._weight_norms]
        if flat:
            merged, tensors, spans = self._merged(flat)
            g_all, counts_all = merged.norms(merged.views([t.grad for t in tensors]),
                                             dtype=ratio_dtype(tensors[0].dtype), device=tensors[0].device)
            key = tuple(id(layout) for _, layout in flat)
            if key not in self._members:  # which layers these tensors hold on some rank: fixed by the layouts
                self._members[key] = [c > 0 for c in counts_all.tolist()]
            members_all = self._members[key]
        for (group, layout), span in zip(flat, spans if flat else []):
            g_norms, members, w_norms = g_all[span], members_all[span], self._weight_norms[id(layout)]
            flat_ratios = layerwise.layer_trust_ratios(group) if layerwise is not None else None
            ratios = flat_ratios[1] if flat_ratios is not None else None
            device = group["params"][0].device
            for k, layer in enumerate(layout.layers):
                if not members[k]:
                    continue
                if isinstance(layer.key, tuple):  # an FSDP1 flat parameter's layer: named, ordered by the flat's place
                    flat_order = self._names.get(layer.key[0], (unnamed, ""))[0]
                    order = flat_order + k / (len(layout.layers) + 1)
                    name = self._flat_names.get(id(layer.key[0]), "") + str(layer.name)
                else:
                    order, name = self._names.get(layer.key, (unnamed + len(entries), layer.name or f"layer{k}"))
                ratio = None
                if ratios is not None and layerwise is not None and not layerwise.is_excluded(group, layer.shape):
                    ratio = ratios[k]
                entries.append(LayerRecord(order, name, device, w_norms[k], g_norms[k], group["lr"], ratio))
        lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
        handed = {p: pair for p, pair in (self._sink or {}).items() if p.grad is not None}
        params = [p for p in plain_params if p.grad is not None and p in self._weight_norms and p not in handed]
        # Gradient norms the optimizer did not hand over (all of them for LAMB, whose ratio uses ‖u‖),
        # in one reduction: under FSDP2 one collective per mesh dimension for all of them.
        missing = [p for p, (_, g) in handed.items() if g is None] + params
        # Every one has a gradient (both lists were filtered on it): cast, not filter, so nothing can shift.
        grad_norms = dict(zip(missing, _norms([cast(Tensor, p.grad) for p in missing]))) if missing else {}
        for p, (w, g) in handed.items():
            w, g = (t if isinstance(t, Tensor) else torch.tensor(t, dtype=torch.float64)
                    for t in (w, grad_norms[p] if g is None else g))
            order, name = self._names.get(p, (unnamed + len(entries), f"param{len(entries)}"))
            ratio = optimizer.state[p].get("trust_ratio")
            entries.append(LayerRecord(order, name, w.device, w, g, lr_of[id(p)], ratio))
        for p in params:
            order, name = self._names.get(p, (unnamed + len(entries), f"param{len(entries)}"))
            ratio = optimizer.state.get(p, {}).get("trust_ratio")
            entries.append(LayerRecord(order, name, p.device, self._weight_norms[p], grad_norms[p], lr_of[id(p)],
                                       ratio))
        return entries

    def _record(self, entries: list[LayerRecord]) -> dict[str, float]:
        if not entries:
            return {}
        entries.sort(key=lambda entry: entry.order)
        # A parameter the model does not name may take a fallback name that it does.
        names = _unique([e.name for e in entries])
        ratios = [e.ratio for e in entries]
        w_host, g_host, r_host, lr_host = _to_host([e.device for e in entries], [e.weight_norm for e in entries],
                                                   [e.grad_norm for e in entries], ratios, [e.lr for e in entries])

        is_lars = any(r is not None for r in ratios)
        per_metric: dict[str, dict[str, float]] = {m: {} for m in self.metrics}
        for name, w, g, ratio, lr in zip(names, w_host, g_host, r_host, lr_host):
            if is_lars:
                layer_ratio = ratio  # None for excluded parameters: not adapted, no ratio
                effective = lr * ratio if ratio is not None else lr
            else:
                layer_ratio = w / g if g > 0 else math.nan
                effective = lr
            for metric, value in (("trust_ratio", layer_ratio), ("effective_lr", effective),
                                  ("weight_norm", w), ("grad_norm", g)):
                if metric in per_metric and value is not None:
                    per_metric[metric][name] = value

        # Summaries of trust_ratio and effective_lr are over the adapted layers only: an excluded
        # tensor's effective LR is the raw group LR (often 100x the adapted ones), which would make
        # min/median/max describe the excluded tensors rather than the layer-wise rates.
        adapted = {name for name, ratio in zip(names, r_host) if ratio is not None} if is_lars else None
        record: dict[str, float] = {}
        for metric, layer_values in per_metric.items():
            if self.per_layer:
                record.update((f"{metric}/{name}", value) for name, value in layer_values.items())
            if self.summaries:
                summarised = layer_values.values() if adapted is None or metric not in _ADAPTED_ONLY else \
                    [v for name, v in layer_values.items() if name in adapted]
                finite = [v for v in summarised if math.isfinite(v)]
                if finite:
                    record[f"{metric}{STATS_SUFFIX}/min"] = min(finite)
                    record[f"{metric}{STATS_SUFFIX}/median"] = statistics.median(finite)
                    record[f"{metric}{STATS_SUFFIX}/max"] = max(finite)
        return record


def _to_host(
    devices: Sequence[torch.device],
    w_norms: Sequence[Tensor],
    g_norms: Sequence[Tensor],
    ratios: Sequence[Optional[Tensor]],
    lrs: Sequence[Union[float, Tensor]],
) -> tuple[list[float], list[float], list[Optional[float]], list[float]]:
    """Bring norms, ratios and tensor LRs to the host: one stacked tensor and one transfer per device."""
    w_host, g_host = [0.0] * len(devices), [0.0] * len(devices)
    r_host: list[Optional[float]] = [None] * len(devices)
    lr_host = [lr if not isinstance(lr, Tensor) else math.nan for lr in lrs]
    for device, idx in indices_by(devices).items():
        with_ratio = [i for i in idx if ratios[i] is not None]
        tensor_lr = [i for i in idx if isinstance(lrs[i], Tensor)]
        parts = [_stack([w_norms[i] for i in idx]), _stack([g_norms[i] for i in idx])]
        if with_ratio:
            parts.append(_stack([ratios[i] for i in with_ratio]))  # type: ignore[misc]
        if tensor_lr:
            parts.append(_stack([lrs[i].to(device) for i in tensor_lr]))  # type: ignore[union-attr]
        host = torch.cat([part.double() for part in parts]).cpu().tolist()  # the one sync of this device
        n = len(idx)
        for k, i in enumerate(idx):
            w_host[i], g_host[i] = host[k], host[n + k]
        for k, i in enumerate(with_ratio):
            r_host[i] = host[2 * n + k]
        for k, i in enumerate(tensor_lr):
            lr_host[i] = host[2 * n + len(with_ratio) + k]
    return w_host, g_host, r_host, lr_host


def _stack(tensors: Sequence[Tensor]) -> Tensor:
    """Stack 0-d tensors of possibly different float dtypes (a float64 layer in a float32 model)."""
    dtype = tensors[0].dtype
    if any(t.dtype != dtype for t in tensors):
        return torch.stack([t.double() for t in tensors])
    return torch.stack(list(tensors))


def check_options(*, every_n_steps: Optional[int] = None, per_layer: bool = True, summaries: bool = True,
                  metrics: Sequence[str] = METRICS) -> None:
    """Raise ``ValueError``/``TypeError`` for monitor options that are out of range."""
    if every_n_steps is not None and (isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int)
                                      or every_n_steps < 1):
        raise ValueError(f"every_n_steps must be an int >= 1 or None, got {every_n_steps!r}")
    if isinstance(metrics, str):
        raise TypeError(f"metrics must be a sequence of names, got the string {metrics!r}; write [{metrics!r}]")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics must be a non-empty subset of {list(METRICS)}, got {list(metrics)!r}")
    if not (per_layer or summaries):
        raise ValueError("per_layer and summaries are both False: nothing would be reported")


def _norms(tensors: Sequence[Tensor]) -> list[Tensor]:
    """L2 norms (0-d tensors on each tensor's device, at least float32), one foreach kernel per bucket.

    Sharded (DTensor) tensors get whole-tensor norms, with one all_reduce per mesh dimension; every
    rank runs the same recording steps, so the collectives match up.
    """
    if any(is_dtensor(t) for t in tensors):
        dtype = ratio_dtype(tensors[0].dtype)
        norms, _ = ShardedNorms(tensors, owner="TrustRatioMonitor")(range(len(tensors)),
                                                                    [to_local(t) for t in tensors], [], dtype)
        return list(norms.unbind())
    out: list[Tensor] = [tensors[0]] * len(tensors)  # every slot is filled below
    dense = []
    for i, t in enumerate(tensors):
        if t.is_sparse:  # a sparse gradient (Embedding(sparse=True)): duplicate indices add up first
            out[i] = torch.linalg.vector_norm(t.coalesce().values(), dtype=ratio_dtype(t.dtype))
        else:
            dense.append(i)
    for (_, dtype), idx in buckets([tensors[i] for i in dense]).items():
        idx = [dense[k] for k in idx]
        bucket_norms = torch._foreach_norm([tensors[i] for i in idx], 2, dtype=ratio_dtype(dtype))
        for i, n in zip(idx, bucket_norms):
            out[i] = n
    return out


def _parameter_names(
    model: Union[nn.Module, Iterable[tuple[str, Tensor]], None], optimizer: Optimizer
) -> dict[Tensor, tuple[int, str]]:
    """``param -> (position in the model, qualified name)``."""
    if isinstance(model, nn.Module):
        named: Iterable[tuple[str, Tensor]] = model.named_parameters()
    elif model is not None:
        named = model
    else:
        named = [
            (group["param_names"][j] if group.get("param_names") else f"group{g}.param{j}", p)
            for g, group in enumerate(optimizer.param_groups)
            for j, p in enumerate(group["params"])
        ]
    # Names as in the unwrapped model (FSDP1 and activation checkpointing insert wrapper modules).
    names: dict[Tensor, tuple[int, str]] = {}
    seen: dict[str, int] = {}
    for i, (name, p) in enumerate(named):
        name = unwrapped_name(name)
        if name in seen:
            raise ValueError(f"two parameters are both named {name!r} (positions {seen[name]} and {i}); "
                             "the monitor would report one layer for both: give each a name of its own")
        seen[name] = i
        names[p] = (i, name)
    return names


def _unique(names: list[str]) -> list[str]:
    """Names with repeats made distinct (``name#2``...): a layer is never reported over another."""
    taken = set(names)
    count: dict[str, int] = {}
    out = []
    for name in names:
        count[name] = count.get(name, 0) + 1
        if count[name] == 1:
            out.append(name)
            continue
        k = count[name]
        while f"{name}#{k}" in taken:
            k += 1
        taken.add(f"{name}#{k}")
        out.append(f"{name}#{k}")
    return out
