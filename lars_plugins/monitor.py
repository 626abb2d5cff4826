"""Per-layer trust-ratio monitoring for any torch optimizer, framework-free.

:class:`TrustRatioMonitor` hooks an optimizer's ``step()`` and, on the steps it is asked to record,
collects per parameter ``‖w‖`` (before the update), ``‖g‖``, the trust ratio and the effective LR.
Nothing is computed on other steps; a recording step reduces on the device and crosses to the host
once per device. :class:`TrustRatioHistory` keeps the records as a compact steps × layers table
that round-trips through CSV (the wide format Lightning's ``CSVLogger`` also writes) and Parquet.
"""

from __future__ import annotations

import csv
import io
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .distributed import ShardedNorms, is_dtensor, to_local
from .functional import ratio_dtype
from .groups import unwrapped_name
from .layouts import FlatLayout, LayoutResolver, merge

__all__ = ["TrustRatioMonitor", "TrustRatioHistory", "METRICS", "STATS", "unwrap_optimizer"]

# The per-layer quantities, in the order they are reported.
METRICS = ("trust_ratio", "effective_lr", "weight_norm", "grad_norm")
STATS = ("min", "median", "max")
STATS_SUFFIX = "_stats"  # summaries go to f"{metric}_stats/{stat}", a dashboard section of three plots

PathLike = Union[str, Path]


def unwrap_optimizer(optimizer: Any) -> Optimizer:
    """The torch optimizer inside wrappers (Lightning's ``LightningOptimizer``, Accelerate's
    ``AcceleratedOptimizer``, timm's ``Lookahead``), whose ``step()`` is the one that really runs."""
    for _ in range(8):
        inner = next((getattr(optimizer, a) for a in ("_optimizer", "optimizer", "_base_optimizer", "base_optimizer")
                      if isinstance(getattr(optimizer, a, None), Optimizer)), None)
        if inner is None:
            break
        optimizer = inner
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (or a wrapper of one), got {type(optimizer).__name__}")
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
        summaries: report ``{metric}_stats/min|median|max`` over layers.
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
        self._flat_names = {id(p): name.rpartition("_flat_param")[0] for p, (_, name) in self._names.items()
                            if name.endswith("_flat_param")}
        self._layouts = LayoutResolver(list(self._names) or [p for g in self.optimizer.param_groups for p in g["params"]])
        self._n_groups = len(self.optimizer.param_groups)
        self._members: dict[tuple[int, ...], list[bool]] = {}
        self._merged_layouts: dict[tuple[int, ...], tuple[FlatLayout, list[slice]]] = {}
        self._armed_step: Optional[int] = None
        self._recording = False
        self._calls = 0  # step() calls seen in the current optimizer step
        self._weight_norms: dict[Any, Tensor] = {}
        self._entries: list[tuple] = []
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
        # gradients of this step do not exist yet, so which parameters get one is not known.
        plain, flat = self._split(optimizer)
        if plain:
            self._weight_norms.update(zip(plain, _norms(plain)))
        if flat:
            layout, tensors, spans = self._merged(flat)
            w_norms = layout.norms(layout.views(tensors), dtype=ratio_dtype(tensors[0].dtype), device=tensors[0].device)[0]
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
        layout_of = getattr(optimizer, "layout", None)
        return layout_of(group) if callable(layout_of) else self._layouts(group["params"])

    # --- collection ----------------------------------------------------------------------------

    def _collect(self, optimizer: Optimizer) -> list[tuple]:
        """``(model order, name, device, ‖w‖, ‖g‖, lr, ratio or None)`` of every layer stepped now."""
        entries: list[tuple] = []
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
            flat_ratios = getattr(optimizer, "layer_trust_ratios", lambda g: None)(group)
            ratios = flat_ratios[1] if flat_ratios is not None else None
            device = group["params"][0].device
            for k, layer in enumerate(layout.layers):
                if not members[k]:
                    continue
                if isinstance(layer.key, tuple):  # an FSDP1 flat parameter's layer: named and ordered by the flat's place
                    flat_order = self._names.get(layer.key[0], (unnamed, ""))[0]
                    order = flat_order + k / (len(layout.layers) + 1)
                    name = self._flat_names.get(id(layer.key[0]), "") + str(layer.name)
                else:
                    order, name = self._names.get(layer.key, (unnamed + len(entries), layer.name or f"layer{k}"))
                ratio = None
                if ratios is not None and optimizer.is_adapted(group, layer.shape):  # type: ignore[attr-defined]
                    ratio = ratios[k]
                entries.append((order, name, device, w_norms[k], g_norms[k], group["lr"], ratio))
        lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
        params = [p for p in plain_params if p.grad is not None and p in self._weight_norms]
        if params:
            for p, g in zip(params, _norms([p.grad for p in params])):
                order, name = self._names.get(p, (unnamed + len(entries), f"param{len(entries)}"))
                ratio = optimizer.state.get(p, {}).get("trust_ratio")
                entries.append((order, name, p.device, self._weight_norms[p], g, lr_of[id(p)], ratio))
        return entries

    def _record(self, entries: list[tuple]) -> dict[str, float]:
        if not entries:
            return {}
        entries.sort(key=lambda entry: entry[0])
        _, names, devices, w_norms, g_norms, lrs, ratios = (list(column) for column in zip(*entries))
        names = _unique(names)  # a parameter the model does not name may take a fallback name that it does
        w_host, g_host, r_host, lr_host = _to_host(devices, w_norms, g_norms, ratios, lrs)

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

        record: dict[str, float] = {}
        for metric, layer_values in per_metric.items():
            if self.per_layer:
                record.update((f"{metric}/{name}", value) for name, value in layer_values.items())
            if self.summaries:
                finite = [v for v in layer_values.values() if math.isfinite(v)]
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
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, device in enumerate(devices):
        by_device[device].append(i)
    for device, idx in by_device.items():
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
        norms, _ = ShardedNorms(tensors)(range(len(tensors)), [to_local(t) for t in tensors], [], dtype)
        return list(norms.unbind())
    out: list[Optional[Tensor]] = [None] * len(tensors)
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        buckets[(t.device, t.dtype)].append(i)
    for (_, dtype), idx in buckets.items():
        norms = torch._foreach_norm([tensors[i] for i in idx], 2, dtype=ratio_dtype(dtype))
        for i, n in zip(idx, norms):
            out[i] = n
    return out  # type: ignore[return-value]


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



class TrustRatioHistory:
    """Recorded metrics as a compact table: one row per step, one column per ``metric/layer`` key.

    Columns keep the order in which they first appeared (model order). Saved as a wide CSV with a
    ``step`` column, the format Lightning's ``CSVLogger`` writes, so :meth:`from_csv` reads either.
    A value that was recorded as NaN (a NaN gradient's ratio) stays NaN, distinct from a cell where
    nothing was recorded: an empty CSV cell or a Parquet null.
    """

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.columns: dict[str, int] = {}  # key -> column index, in order of first appearance
        self._rows: list[list[Optional[float]]] = []  # None: not recorded
        self._row_of_step: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.steps)

    def append(self, step: int, record: Mapping[str, float]) -> None:
        """Add (or merge into the row of) ``step`` the values of ``record``."""
        row_index = self._row_of_step.get(step)
        if row_index is None:
            row_index = self._row_of_step[step] = len(self.steps)
            self.steps.append(step)
            self._rows.append([])
        row = self._rows[row_index]
        for key, value in record.items():
            col = self.columns.setdefault(key, len(self.columns))
            if len(row) <= col:
                row.extend([None] * (col + 1 - len(row)))
            row[col] = float(value)

    def metrics(self) -> list[str]:
        """Metric names present (the part of each key before the first ``/``)."""
        return list(dict.fromkeys(key.split("/", 1)[0] for key in self.columns if "/" in key))

    def layers(self, metric: str) -> list[str]:
        """Layer names recorded for ``metric``, in model order."""
        self._check_metric(metric)
        prefix = metric + "/"
        return [key[len(prefix):] for key in self.columns if key.startswith(prefix)]

    def matrix(self, metric: str) -> tuple[list[int], list[str], list[list[float]]]:
        """``(steps, layers, values)`` with ``values[layer][step]`` (NaN where not recorded, or
        recorded as NaN), steps sorted, and steps at which no layer of ``metric`` was recorded left out."""
        layers = self.layers(metric)
        cols = [self.columns[f"{metric}/{name}"] for name in layers]
        order = sorted(range(len(self.steps)), key=self.steps.__getitem__)
        kept = [i for i in order if any(_cell(self._rows[i], c) is not None for c in cols)]
        values = [[_value(_cell(self._rows[i], c)) for i in kept] for c in cols]
        return [self.steps[i] for i in kept], layers, values

    def latest(self, metric: str) -> dict[str, float]:
        """The newest recorded value of each layer of ``metric`` (NaN if that is what was recorded)."""
        layers = self.layers(metric)
        order = sorted(range(len(self.steps)), key=self.steps.__getitem__, reverse=True)
        out = {}
        for name in layers:
            col = self.columns[f"{metric}/{name}"]
            newest = next((_cell(self._rows[i], col) for i in order if _cell(self._rows[i], col) is not None), None)
            if newest is not None:
                out[name] = newest
        return out

    def _check_metric(self, metric: str) -> None:
        if not self.steps:
            raise ValueError("the history is empty: nothing has been recorded")
        available = self.metrics()
        if metric not in available:
            raise ValueError(f"no metric {metric!r} in this history; available: {', '.join(available) or 'none'}")

    # --- files ---------------------------------------------------------------------------------

    def to_rows(self) -> tuple[list[str], list[list[Any]]]:
        """Header and rows (step first), as written to CSV; ``None`` where nothing was recorded."""
        header = ["step", *self.columns]
        rows = [[step, *(_cell(row, c) for c in range(len(self.columns)))] for step, row in zip(self.steps, self._rows)]
        return header, rows

    def to_csv(self, path: PathLike) -> Path:
        """Write a wide CSV: ``step`` then one column per key; empty cells where not recorded."""
        path = Path(path)
        header, rows = self.to_rows()
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for row in rows:
                writer.writerow(["" if v is None else repr(v) for v in row])
        return path

    @classmethod
    def from_csv(cls, path: PathLike) -> "TrustRatioHistory":
        """Read a wide CSV with a ``step`` column: this class's own files, Lightning's ``CSVLogger``
        ``metrics.csv`` or the HF integration's. Keys without a ``/`` (loss, epoch) are ignored;
        several rows of one step are merged. A file cut off (no final newline, or a row with fewer
        fields than the header) or a cell that is no number is refused, naming the file and line."""
        path = Path(path)
        text = path.read_text()
        if text and not text.endswith("\n"):
            raise ValueError(f"{path}: the file ends without a newline, so its last row is cut off; "
                             "the file was truncated while it was written")
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if reader.fieldnames is None or "step" not in reader.fieldnames:
            raise ValueError(f"{path}: no 'step' column (columns: {reader.fieldnames})")
        history = cls()
        for line in reader:
            if None in line or any(value is None for value in line.values()):
                raise ValueError(f"{path}, line {reader.line_num}: {len([v for v in line.values() if v is not None])} "
                                 f"fields where the header has {len(reader.fieldnames)}: the row is cut off or malformed")
            record = {}
            for key, cell in line.items():
                if key and "/" in key and cell != "":
                    record[key] = _parse(cell, path, reader.line_num, key)
            if record and line["step"] != "":
                history.append(int(_parse(line["step"], path, reader.line_num, "step")), record)
        if not history.steps:
            raise ValueError(f"{path}: no recorded metrics (no 'metric/layer' column with a value)")
        keys = list(history.columns)
        if keys == sorted(keys):
            # Lightning's CSVLogger sorts its columns as strings (net.12 before net.3); numbered layers
            # read in numeric order are back in model order for the usual names.
            history._reorder(sorted(keys, key=_natural_key))
        return history

    def _reorder(self, keys: list[str]) -> None:
        old = self.columns
        self.columns = {key: i for i, key in enumerate(keys)}
        self._rows = [[_cell(row, old[key]) for key in keys] for row in self._rows]

    def to_parquet(self, path: PathLike) -> Path:
        """Write the table as Parquet (needs ``pyarrow``: ``pip install "lars_plugins[parquet]"``)."""
        pa, pq = _pyarrow()
        header, rows = self.to_rows()
        table = pa.table({name: [row[i] for row in rows] for i, name in enumerate(header)})
        pq.write_table(table, str(path))
        return Path(path)

    @classmethod
    def from_parquet(cls, path: PathLike) -> "TrustRatioHistory":
        """Read a table written by :meth:`to_parquet`."""
        _, pq = _pyarrow()
        columns = pq.read_table(str(path)).to_pydict()
        if "step" not in columns:
            raise ValueError(f"{path}: no 'step' column")
        history = cls()
        keys = [k for k in columns if "/" in k]
        for i, step in enumerate(columns["step"]):
            if step is None:
                raise ValueError(f"{path}, row {i}: the step is null")
            history.append(int(step), {k: columns[k][i] for k in keys if columns[k][i] is not None})
        return history

    @classmethod
    def load(cls, path: PathLike) -> "TrustRatioHistory":
        """Read CSV or Parquet, chosen by the file's suffix."""
        return cls.from_parquet(path) if Path(path).suffix.lower() in (".parquet", ".pq") else cls.from_csv(path)


def _natural_key(key: str) -> list[Any]:
    """``net.3.weight`` before ``net.12.weight``: digit runs compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", key)]


def _cell(row: list[Optional[float]], col: int) -> Optional[float]:
    return row[col] if col < len(row) else None


def _value(cell: Optional[float]) -> float:
    return math.nan if cell is None else cell


def _parse(cell: str, path: Path, line: int, key: str) -> float:
    try:
        return float(cell)
    except ValueError:
        raise ValueError(f"{path}, line {line}: {key} is {cell!r}, not a number") from None


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError('Parquet needs pyarrow: pip install "lars_plugins[parquet]"') from err
    return pa, pq
