"""The recorded per-layer metrics as a compact steps × layers table, and the files it reads and writes.

:class:`TrustRatioHistory` is what :class:`~lars_plugins.TrustRatioMonitor` fills and what
:mod:`lars_plugins.plot` draws. It round-trips through CSV (the wide format Lightning's
``CSVLogger`` also writes) and Parquet, and reads what the HF Trainer (``trainer_state.json``) and
TensorBoard logged. It knows nothing of optimizers.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any, Container, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

__all__ = ["TrustRatioHistory", "METRICS", "STATS", "STATS_SUFFIX", "BLOCK_ROWS", "wanted"]

# The per-layer quantities, in the order they are reported.
METRICS = ("trust_ratio", "effective_lr", "weight_norm", "grad_norm")
STATS = ("min", "median", "max")
STATS_SUFFIX = "_stats"  # summaries go to f"{metric}_stats/{stat}", a dashboard section of three plots

PathLike = Union[str, Path]


class TrustRatioHistory:
    """Recorded metrics as a compact table: one row per step, one column per ``metric/layer`` key.

    Columnar: the values live in float64 NumPy arrays of :data:`BLOCK_ROWS` rows each (8 bytes a value
    and 1 for whether it was recorded), so appending a record is one indexed copy and memory is about
    the size of the numbers; a new key widens only the block being filled. Columns keep the order
    in which they first appeared (model order). Saved as a wide CSV with a ``step`` column, the
    format Lightning's ``CSVLogger`` also writes, so :meth:`from_csv` reads either. A value recorded
    as NaN (a NaN gradient's ratio) stays NaN, distinct from a cell where nothing was recorded: an
    empty CSV cell or a Parquet null.
    """

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.columns: dict[str, int] = {}  # key -> column index, in order of first appearance
        self._blocks: list[_Block] = []
        self._row_of_step: dict[int, int] = {}
        self._last_keys: list[str] = []  # the previous record's keys, and their column indices
        self._last_index: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.steps)

    def nbytes(self) -> int:
        """Memory held by the table's values and masks."""
        return sum(block.values.size * 9 for block in self._blocks)

    def append(self, step: int, record: Mapping[str, float]) -> None:
        """Add (or merge into the row of) ``step`` the values of ``record``."""
        keys = list(record)
        if keys != self._last_keys:  # a run records the same keys every time: looked up once
            self._last_index = self._index(keys)
            self._last_keys = keys
        assert self._last_index is not None
        self._append_row(step, self._last_index, np.fromiter((float(v) for v in record.values()), dtype=np.float64,
                                                             count=len(record)))

    def _index(self, keys: Sequence[str]) -> np.ndarray:
        """Column indices of ``keys``, adding the new ones."""
        return np.fromiter((self.columns.setdefault(key, len(self.columns)) for key in keys), dtype=np.int64,
                           count=len(keys))

    def _append_row(self, step: int, index: np.ndarray, values: np.ndarray) -> None:
        """:meth:`append` of a row whose columns are known (``index``, from :meth:`_index`)."""
        row = self._row_of_step.get(step)
        if row is None:
            row = self._row_of_step[step] = len(self.steps)
            self.steps.append(step)
            if row % BLOCK_ROWS == 0:
                self._blocks.append(_Block(max(len(self.columns), 1)))
        self._blocks[row // BLOCK_ROWS].put(row % BLOCK_ROWS, index, values, len(self.columns))

    def metrics(self) -> list[str]:
        """Metric names present (the part of each key before the first ``/``)."""
        return list(dict.fromkeys(key.split("/", 1)[0] for key in self.columns if "/" in key))

    def layers(self, metric: str) -> list[str]:
        """Layer names recorded for ``metric``, in model order."""
        self._check_metric(metric)
        prefix = metric + "/"
        return [key[len(prefix):] for key in self.columns if key.startswith(prefix)]

    def table(self, metric: str, dtype: Any = np.float64) -> tuple[list[int], list[str], np.ndarray]:
        """``(steps, layers, values)`` with ``values`` a NumPy array of layers × steps (NaN where not
        recorded, or recorded as NaN), steps sorted, and steps at which no layer of ``metric`` was
        recorded left out. ``dtype`` is a NumPy dtype (a torch dtype is taken by its name). Built a
        few hundred columns at a time: no full-size float64 copy is made on the way to a float32 table."""
        steps, layers, values, _ = self.recorded_table(metric, dtype)
        return steps, layers, values

    def recorded_table(self, metric: str, dtype: Any = np.float64) -> tuple[list[int], list[str], np.ndarray,
                                                                            np.ndarray]:
        """:meth:`table` and beside it which cells were recorded (a recorded NaN, say from a NaN
        gradient, is told apart from a cell where nothing was recorded)."""
        layers = self.layers(metric)
        cols = [self.columns[f"{metric}/{name}"] for name in layers]
        order = sorted(range(len(self.steps)), key=self.steps.__getitem__)
        chunks = [cols[k:k + _CHUNK] for k in range(0, len(cols), _CHUNK)]
        any_recorded = self._rows_with_any(cols).tolist()
        rows = np.array([i for i in order if any_recorded[i]], dtype=np.int64)
        out = np.empty((len(layers), len(rows)), dtype=_numpy_dtype(dtype))
        mask = np.empty((len(layers), len(rows)), dtype=bool)
        for k, chunk in enumerate(chunks):
            values, recorded = self._gather(chunk)  # values NaN where not recorded
            out[k * _CHUNK:k * _CHUNK + len(chunk)] = values[rows].T
            mask[k * _CHUNK:k * _CHUNK + len(chunk)] = recorded[rows].T
        return [self.steps[i] for i in rows.tolist()], layers, out, mask

    def recorded_steps(self, metric: str) -> list[int]:
        """The steps at which some layer of ``metric`` was recorded, sorted."""
        cols = [self.columns[f"{metric}/{name}"] for name in self.layers(metric)]
        return sorted(step for step, recorded in zip(self.steps, self._rows_with_any(cols).tolist()) if recorded)

    def _rows_with_any(self, cols: list[int]) -> np.ndarray:
        """Which rows recorded any of columns ``cols`` (gathered a few hundred columns at a time)."""
        any_recorded = np.zeros(len(self.steps), dtype=bool)
        for k in range(0, len(cols), _CHUNK):
            any_recorded |= self._gather(cols[k:k + _CHUNK])[1].any(axis=1)
        return any_recorded

    def at_step(self, metric: str, step: int) -> dict[str, float]:
        """The values of ``metric`` recorded at ``step``, by layer (layers not recorded there left out)."""
        layers = self.layers(metric)
        row = self._row_of_step.get(step)
        if row is None:
            return {}
        block = self._blocks[row // BLOCK_ROWS]
        index = np.array([self.columns[f"{metric}/{name}"] for name in layers], dtype=np.int64)
        values, recorded = block.columns(index, row % BLOCK_ROWS + 1)
        return {name: v for name, v, m in zip(layers, values[-1].tolist(), recorded[-1].tolist()) if m}

    def matrix(self, metric: str) -> tuple[list[int], list[str], list[list[float]]]:
        """:meth:`table` with the values as lists: ``values[layer][step]``."""
        steps, layers, data = self.table(metric)
        return steps, layers, data.tolist()

    def latest(self, metric: str) -> dict[str, float]:
        """The newest recorded value of each layer of ``metric`` (NaN if that is what was recorded)."""
        layers = self.layers(metric)
        values, recorded = self._gather([self.columns[f"{metric}/{name}"] for name in layers])
        newest_first = np.array(sorted(range(len(self.steps)), key=self.steps.__getitem__, reverse=True),
                                dtype=np.int64)
        values, recorded = values[newest_first], recorded[newest_first]
        first = recorded.argmax(axis=0)  # the newest recorded row of each layer
        picked = np.take_along_axis(values, first[None], axis=0)[0].tolist()
        seen = list(np.asarray(recorded.any(axis=0)).tolist())
        return {name: v for name, v, any_ in zip(layers, picked, seen) if any_}

    def _gather(self, cols: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Values and recorded-masks of columns ``cols`` for every row, in row order."""
        index = np.array(cols, dtype=np.int64)
        parts = [block.columns(index, min(BLOCK_ROWS, len(self.steps) - k * BLOCK_ROWS))
                 for k, block in enumerate(self._blocks)]
        if not parts:
            return np.empty((0, len(cols)), dtype=np.float64), np.empty((0, len(cols)), dtype=bool)
        return np.concatenate([v for v, _ in parts]), np.concatenate([m for _, m in parts])

    def _check_metric(self, metric: str) -> None:
        if not self.steps:
            raise ValueError("the history is empty: nothing has been recorded")
        available = self.metrics()
        if metric not in available:
            raise ValueError(f"no metric {metric!r} in this history; available: {', '.join(available) or 'none'}")

    # --- files ---------------------------------------------------------------------------------

    def _row_chunks(self) -> Iterable[tuple[list[int], list[list[float]], np.ndarray, np.ndarray]]:
        """Per block: its steps, values as lists, which rows are fully recorded, and the mask."""
        n_cols = len(self.columns)
        for k, block in enumerate(self._blocks):
            n = min(BLOCK_ROWS, len(self.steps) - k * BLOCK_ROWS)
            values, recorded = block.columns(np.arange(n_cols), n)
            full = np.asarray(recorded.all(axis=1))
            yield self.steps[k * BLOCK_ROWS:k * BLOCK_ROWS + n], values.tolist(), full, recorded

    def to_rows(self) -> tuple[list[str], list[list[Any]]]:
        """Header and rows (step first), as written to CSV; ``None`` where nothing was recorded."""
        rows = []
        for steps, values, full, recorded in self._row_chunks():
            for i, (step, row) in enumerate(zip(steps, values)):
                mask = recorded[i].tolist()
                rows.append([step, *(v if m else None for v, m in zip(row, mask))])
        return ["step", *self.columns], rows

    def to_csv(self, path: PathLike, digits: int = 9) -> Path:
        """Write a wide CSV: ``step`` then one column per key; empty cells where not recorded.

        Values have ``digits`` significant digits: 9 writes every float32 exactly (the monitor's
        norms and ratios are float32 unless the parameters are float64) and anything else to 5e-10,
        at a third of the time of exact float64 text; ``digits=17`` is exact for float64."""
        if not (isinstance(digits, int) and 1 <= digits <= 17):
            raise ValueError(f"digits must be an int from 1 to 17, got {digits!r}")
        path = Path(path)
        cell = f"%.{digits}g"
        full_format = None
        with path.open("w", newline="") as f:
            csv.writer(f).writerow(["step", *self.columns])
            for steps, values, full, recorded in self._row_chunks():
                if full_format is None or full_format[0] != len(self.columns):
                    full_format = (len(self.columns), "%d," + ",".join([cell] * len(self.columns)) + "\n")
                lines = []
                for i, (step, row) in enumerate(zip(steps, values)):
                    if full[i]:  # one %-format of the whole row: the fastest float formatting Python has
                        lines.append(full_format[1] % (step, *row))
                    else:
                        mask = recorded[i].tolist()
                        lines.append(f"{step}," + ",".join(cell % v if m else "" for v, m in zip(row, mask)) + "\n")
                f.write("".join(lines))
        return path

    @classmethod
    def from_csv(cls, path: PathLike, metrics: Optional[Sequence[str]] = None,
                 steps: Optional[Container[int]] = None) -> "TrustRatioHistory":
        """Read a wide CSV with a ``step`` column: this class's own files, Lightning's ``CSVLogger``
        ``metrics.csv`` or the HF integration's. Only the monitor's keys (``trust_ratio/<layer>``,
        ``trust_ratio_stats/median``...) are read: others (``loss``, ``val/acc``, ``train/loss``) are
        ignored, and with ``metrics`` given, keys of other metrics too (a plot reads only what it draws), and with
        ``steps`` given, rows of other steps (cheaply: their numbers are not parsed);
        several rows of one step are merged. A file cut off (no final newline, or a row with fewer
        fields than the header) or a cell that is no number is refused, naming the file and line."""
        path = Path(path)
        history = cls()
        with path.open(newline="") as f:
            header_line = f.readline()
            if not header_line.endswith("\n"):
                if header_line:
                    raise ValueError(f"{path}: the file ends without a newline, so its last row is cut off; "
                                     "the file was truncated while it was written")
            header = next(csv.reader([header_line])) if header_line else None
            if not header or "step" not in header:
                raise ValueError(f"{path}: no 'step' column (columns: {header})")
            step_at = header.index("step")
            kept = [j for j, key in enumerate(header) if wanted(key, metrics)]
            keys = [header[j] for j in kept]
            every = kept == list(range(1, len(header)))
            simple = step_at == 0 and bool(kept)  # our own files: the step first, then numbers
            index: Optional[np.ndarray] = None
            for line_num, line in enumerate(f, start=2):
                if not line.endswith("\n"):
                    raise ValueError(f"{path}: the file ends without a newline, so its last row is cut off; "
                                     "the file was truncated while it was written")
                if steps is not None and step_at == 0 and '"' not in line:
                    head = line[:line.find(",")]
                    if head and head.lstrip("-").isdigit() and int(head) not in steps:
                        continue
                cells = line.rstrip("\r\n").split(",") if '"' not in line else next(csv.reader([line]))
                if len(cells) != len(header):
                    raise ValueError(f"{path}, line {line_num}: {len(cells)} fields where the header has "
                                     f"{len(header)}: the row is cut off or malformed")
                if cells[step_at] == "":
                    continue
                step = int(_parse(cells[step_at], path, line_num, "step"))
                if steps is not None and step not in steps:
                    continue
                if simple:
                    picked = cells[1:] if every else [cells[j] for j in kept]
                    if "" not in picked:
                        try:
                            values = np.fromiter(map(float, picked), dtype=np.float64, count=len(picked))
                        except ValueError:
                            pass  # a cell that is no number: found and named below
                        else:
                            if index is None:
                                index = history._index(keys)
                            history._append_row(step, index, values)
                            continue
                record = {header[j]: _parse(cells[j], path, line_num, header[j]) for j in kept if cells[j] != ""}
                if record:
                    history.append(step, record)
        if not history.steps:
            present = list(dict.fromkeys(key.split("/", 1)[0] for key in header if wanted(key, None)))
            if metrics is not None and present:
                raise ValueError(f"{path}: no metric {' or '.join(map(repr, metrics))} with a value; "
                                 f"available: {', '.join(present) or 'none'}")
            raise ValueError(f"{path}: no recorded metrics (no 'metric/layer' column with a value)")
        history._natural_order()  # Lightning's CSVLogger sorts its columns as strings
        return history

    def _natural_order(self, always: bool = False) -> None:
        """Columns in natural order (``net.3`` before ``net.12``) where the source sorted its keys as
        strings (or ``always``, for a source with no order): numbered layers are then back in model
        order for the usual names; the order of unnumbered siblings cannot be recovered. Decided per
        metric: a logger that adds a column later (Lightning's, for a metric logged from validation
        on) leaves each metric's own keys sorted even where the whole header is not."""
        keys = list(self.columns)
        by_metric: dict[str, list[str]] = {}
        for key in keys:
            by_metric.setdefault(key.split("/", 1)[0], []).append(key)
        if always or all(group == sorted(group) for group in by_metric.values()):
            rank = {metric: k for k, metric in enumerate(by_metric)}  # metrics keep their order
            self._reorder(sorted(keys, key=lambda key: (rank[key.split("/", 1)[0]], _natural_key(key))))

    def _reorder(self, keys: list[str]) -> None:
        index = np.array([self.columns[key] for key in keys], dtype=np.int64)
        for block in self._blocks:
            block.reorder(index)
        self.columns = {key: i for i, key in enumerate(keys)}
        self._last_keys, self._last_index = [], None

    def to_parquet(self, path: PathLike) -> Path:
        """Write the table as Parquet (needs ``pyarrow``: ``pip install "lars_plugins[parquet]"``)."""
        pa, pq = _pyarrow()
        values, recorded = self._gather(list(range(len(self.columns))))
        data, mask = values, ~recorded
        arrays = {"step": pa.array(self.steps, type=pa.int64())}
        arrays.update((key, pa.array(data[:, j], mask=mask[:, j])) for j, key in enumerate(self.columns))
        pq.write_table(pa.table(arrays), str(path))
        return Path(path)

    @classmethod
    def from_parquet(cls, path: PathLike, metrics: Optional[Sequence[str]] = None) -> "TrustRatioHistory":
        """Read a table written by :meth:`to_parquet` (only the keys of ``metrics``, if given), a
        column at a time into the table's blocks."""
        _, pq = _pyarrow()
        schema = pq.read_schema(str(path))
        if "step" not in schema.names:
            raise ValueError(f"{path}: no 'step' column")
        keys = [k for k in schema.names if wanted(k, metrics)]
        source = pq.ParquetFile(str(path))
        step_column = source.read(columns=["step"]).column("step")
        if step_column.null_count:
            raise ValueError(f"{path}: a step is null")
        history = cls()
        steps = step_column.to_pylist()
        history.steps = [int(step) for step in steps]
        history._row_of_step = {step: row for row, step in enumerate(history.steps)}
        history.columns = {key: j for j, key in enumerate(keys)}
        n = len(steps)
        history._blocks = [_Block(max(len(keys), 1)) for _ in range(-(-n // BLOCK_ROWS))]
        for j, key in enumerate(keys):
            if j % _CHUNK == 0:  # a few hundred columns at a time: the file is never all in memory twice
                table = source.read(columns=keys[j:j + _CHUNK])
            column = table.column(key).combine_chunks()
            values = column.to_numpy(zero_copy_only=False).astype("float64")
            recorded = column.is_valid().to_numpy(zero_copy_only=False)
            for k, block in enumerate(history._blocks):
                rows = slice(k * BLOCK_ROWS, min(n, (k + 1) * BLOCK_ROWS))
                count = rows.stop - rows.start
                block.values[:count, j] = np.where(recorded[rows], values[rows], math.nan)
                block.recorded[:count, j] = recorded[rows]
        if len(set(history.steps)) != n:
            raise ValueError(f"{path}: a step appears in more than one row")
        return history

    @classmethod
    def from_hf_state(cls, path: PathLike, metrics: Optional[Sequence[str]] = None) -> "TrustRatioHistory":
        """Read the HF Trainer's ``trainer_state.json`` (its ``log_history``; a checkpoint folder
        holding one works too): the trust ratios the HF integration merged into the Trainer's logs
        (:func:`lars_plugins.log_readers.read_hf_state`)."""
        from .log_readers import read_hf_state

        return read_hf_state(cls(), Path(path), metrics)

    @classmethod
    def from_tensorboard(cls, path: PathLike, metrics: Optional[Sequence[str]] = None) -> "TrustRatioHistory":
        """Read TensorBoard event files (a file, or the folder of a run; needs ``tensorboard``): the
        monitor's metrics among everything the run logged (:func:`lars_plugins.log_readers.read_tensorboard`)."""
        from .log_readers import read_tensorboard

        return read_tensorboard(cls(), Path(path), metrics)

    @staticmethod
    def file_metrics(path: PathLike) -> list[str]:
        """The metrics a file holds, from its header where it has one (CSV, Parquet)."""
        kind = _file_kind(Path(path))
        if kind in ("hf", "tensorboard"):
            return TrustRatioHistory.load(path).metrics()
        if kind == "parquet":
            _, pq = _pyarrow()
            keys = pq.read_schema(str(path)).names
        else:
            with Path(path).open(newline="") as f:
                keys = next(csv.reader([f.readline()]), [])
        return list(dict.fromkeys(key.split("/", 1)[0] for key in keys if wanted(key, None)))

    @classmethod
    def load(cls, path: PathLike, metrics: Optional[Sequence[str]] = None) -> "TrustRatioHistory":
        """Read what a run left, chosen by its name: CSV (ours, Lightning's ``CSVLogger``), Parquet,
        the HF Trainer's ``trainer_state.json`` (or a checkpoint folder with one), TensorBoard event
        files (``events.out.tfevents.*``, or a folder of them). Only the keys of ``metrics``, if given."""
        path = Path(path)
        kind = _file_kind(path)
        if kind == "parquet":
            return cls.from_parquet(path, metrics)
        if kind == "hf":
            return cls.from_hf_state(path, metrics)
        if kind == "tensorboard":
            return cls.from_tensorboard(path, metrics)
        return cls.from_csv(path, metrics)


BLOCK_ROWS = 256  # rows per storage block of a TrustRatioHistory
_CHUNK = 256  # columns gathered at a time when a table is built


class _Block:
    """``BLOCK_ROWS`` rows of a history: float64 values and a recorded-mask, widened on demand."""

    def __init__(self, width: int) -> None:
        self.values = np.full((BLOCK_ROWS, width), math.nan, dtype=np.float64)
        self.recorded = np.zeros((BLOCK_ROWS, width), dtype=bool)

    def put(self, row: int, index: np.ndarray, values: np.ndarray, width: int) -> None:
        if width > self.values.shape[1]:  # a key this block has not seen: widen it (this block only)
            grown = max(width, 2 * self.values.shape[1])
            values_grown = np.full((BLOCK_ROWS, grown), math.nan, dtype=np.float64)
            recorded_grown = np.zeros((BLOCK_ROWS, grown), dtype=bool)
            values_grown[:, :self.values.shape[1]] = self.values
            recorded_grown[:, :self.values.shape[1]] = self.recorded
            self.values, self.recorded = values_grown, recorded_grown
        self.values[row, index] = values
        self.recorded[row, index] = True

    def columns(self, index: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Columns ``index`` of the first ``rows`` rows (not recorded beyond this block's width)."""
        inside = index < self.values.shape[1]
        safe = np.where(inside, index, 0)
        values = self.values[:rows, safe]
        recorded = self.recorded[:rows, safe] & inside
        return np.where(recorded, values, math.nan), recorded

    def reorder(self, index: np.ndarray) -> None:
        values, recorded = self.columns(index, BLOCK_ROWS)
        self.values, self.recorded = values, recorded


def _file_kind(path: Path) -> str:
    """``csv``, ``parquet``, ``hf`` (trainer_state.json) or ``tensorboard`` (event files)."""
    if path.is_dir():
        if (path / "trainer_state.json").is_file():
            return "hf"
        if any(path.glob("events.out.tfevents.*")):
            return "tensorboard"
        raise ValueError(f"{path}: a folder with neither a trainer_state.json nor TensorBoard event files")
    if path.suffix.lower() in (".parquet", ".pq"):
        return "parquet"
    if path.suffix.lower() == ".json":
        return "hf"
    if path.name.startswith("events.out.tfevents."):
        return "tensorboard"
    return "csv"


_KNOWN = frozenset(METRICS) | {metric + STATS_SUFFIX for metric in METRICS}


def wanted(key: str, metrics: Optional[Sequence[str]]) -> bool:
    """Whether ``key`` is one of the monitor's ``metric/layer`` keys (of ``metrics``, where given).
    The rest of what loggers write (``train/loss``, ``val/acc``) is no layer's metric."""
    if not key or "/" not in key:
        return False
    metric = key.split("/", 1)[0]
    return metric in _KNOWN if metrics is None else metric in metrics


def _numpy_dtype(dtype: Any) -> np.dtype:
    """A NumPy dtype from a NumPy one, a name, or a torch dtype (``torch.float32`` by its name,
    without importing torch)."""
    if type(dtype).__module__ == "torch":
        dtype = str(dtype).rpartition(".")[2]
    return np.dtype(dtype)


def _natural_key(key: str) -> list[Any]:
    """``net.3.weight`` before ``net.12.weight``: digit runs compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", key)]


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
