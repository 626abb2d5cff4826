"""Where whole layers lie in the flat tensors that FSDP1 and DeepSpeed ZeRO hand an optimizer.

LARS needs ``‖w‖`` and ``‖g‖`` of each whole original parameter ("layer"). FSDP1 and ZeRO flatten
parameters and give each rank a slice of the concatenation, so one optimizer tensor may hold pieces
of several layers and one layer may be split across ranks. A :class:`FlatLayout` lists, for the
tensors of one parameter group, the pieces ``(tensor, start, numel, layer)`` this rank holds, from
the engine's own shard metadata:

* FSDP1 ``use_orig_params=False``: the ``FlatParameter``'s ``_shard_param_infos`` and ``_shapes``;
* FSDP1 ``use_orig_params=True``: each original parameter is a 1-D view of its piece (possibly
  empty); its shape comes from its ``FlatParameter``;
* DeepSpeed ZeRO-1/2 (and its bf16 optimizer): each original parameter's ``_hp_mapping`` fragment
  address inside the flat fp32 partition, and ``_dp_group``;
* DeepSpeed ZeRO-3: the sub-group's original parameters in order, ``partition_numel()`` each, of
  which the first ``ds_numel - rank·partition_numel`` elements are real (the rest is padding).

:meth:`FlatLayout.norms` sums the squared norms of the pieces per layer and adds them up over the
ranks with one ``all_reduce`` per process group, over a vector indexed by every layer the layout
knows. That vector is the same on every rank, so ranks that hold no piece of a layer (or no piece
at all) take part in the same collective. Nothing here imports FSDP or DeepSpeed: the engines are
recognised by the attributes they set, read through :mod:`lars_plugins.adapters`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .adapters import deepspeed, fsdp1
from .distributed import device_constant, is_dtensor
from .tensor_lists import buckets, pick, ratio_dtype
from .state_precision import piece_blocks

__all__ = ["Layer", "Piece", "FlatLayout"]

# FlatLayout.narrow_plan: per piece (coded, start, end), per tensor blocks, per tensor float32 values.
NarrowPlan = tuple[list[tuple[bool, int, int]], dict[int, int], dict[int, int]]


class Layer(NamedTuple):
    """A whole original parameter: ``key`` identifies it (the parameter itself, or ``(flat, i)``
    for FSDP1 flat parameters, whose originals are no parameters any more)."""

    key: Any
    shape: torch.Size
    name: Optional[str] = None


class Piece(NamedTuple):
    """``numel`` elements of layer ``layer`` at ``start`` in the flattened group tensor ``tensor``."""

    tensor: int
    start: int
    numel: int
    layer: int


@dataclass
class FlatLayout:
    """How the tensors of one parameter group cover whole layers on this rank.

    ``reductions`` lists ``(process group, layer indices)``: the squared norms of those layers are
    summed over that group (``None``: the pieces are whole, nothing to sum).
    """

    engine: str
    layers: list[Layer]
    pieces: list[Piece]
    reductions: list[tuple[Any, list[int]]]
    calls_per_step: int = 1  # step() calls per optimizer step (ZeRO-3: one per sub-group)
    _plans: dict[Any, Any] = field(default_factory=dict, repr=False)  # views(): split plans per tensor

    def constant(self, values: Sequence[Any], device: torch.device, dtype: Optional[torch.dtype] = None) -> Tensor:
        """``torch.tensor(values)`` on ``device``, made once per distinct ``values`` (no copy per step):
        :func:`lars_plugins.distributed.device_constant`."""
        return device_constant(values, device, dtype)

    def views(self, tensors: Sequence[Optional[Tensor]]) -> list[Optional[Tensor]]:
        """The pieces as 1-D views of the group's tensors (``None`` where the tensor is ``None``).

        One ``split_with_sizes`` per tensor (pieces and the gaps between them) rather than one
        ``narrow`` per piece: the host cost of a step is mostly these views.
        """
        out: list[Optional[Tensor]] = [None] * len(self.pieces)
        for t_index, tensor in enumerate(tensors):
            if tensor is None:
                continue
            plan = self._split_plan(t_index, tensor.numel())
            if plan is None:
                continue
            sizes, owners = plan
            for part, j in zip(tensor.view(-1).split_with_sizes(sizes), owners):
                if j >= 0:
                    out[j] = part
        return out

    def narrow_plan(self, coded: tuple[bool, ...]) -> NarrowPlan:
        """8-bit state of flat tensors, for layers ``coded`` (one flag per layer) or not: for each
        piece, whether it is coded and where it lies, among its tensor's blocks
        (:func:`~lars_plugins.state_precision.piece_blocks`) if coded, else among its tensor's float32
        values kept aside (``start``, ``end``); each tensor's number of blocks; each tensor's number of
        float32 values. Pieces in order of place."""
        key = ("narrow", coded)
        if key not in self._plans:
            places = [(False, 0, 0)] * len(self.pieces)
            blocks: dict[int, int] = {}
            uncoded: dict[int, int] = {}
            for j, piece in sorted(enumerate(self.pieces), key=lambda item: (item[1].tensor, item[1].start)):
                is_coded = coded[piece.layer]
                counts, size = (blocks, piece_blocks(piece.numel)) if is_coded else (uncoded, piece.numel)
                start = counts.get(piece.tensor, 0)
                places[j] = (is_coded, start, start + size)
                counts[piece.tensor] = start + size
            self._plans[key] = (places, blocks, uncoded)
        return self._plans[key]

    def _split_plan(self, t_index: int, numel: int) -> Optional[tuple[list[int], list[int]]]:
        """Sizes of the consecutive parts of tensor ``t_index`` and the piece each part is (-1: a gap)."""
        key = (t_index, numel)
        if key not in self._plans:
            sizes: list[int] = []
            owners: list[int] = []
            end = 0
            mine = sorted((p.start, j) for j, p in enumerate(self.pieces) if p.tensor == t_index)
            for start, j in mine:
                if start > end:
                    sizes.append(start - end)
                    owners.append(-1)
                sizes.append(self.pieces[j].numel)
                owners.append(j)
                end = start + self.pieces[j].numel
            if end < numel:
                sizes.append(numel - end)
                owners.append(-1)
            self._plans[key] = (sizes, owners) if mine else None
        return self._plans[key]

    def norms(self, *piece_sets: Sequence[Optional[Tensor]], dtype: torch.dtype,
              device: torch.device) -> list[Tensor]:
        """Whole-layer L2 norms, one vector over :attr:`layers` per set of pieces (aligned with
        :attr:`pieces`; ``None`` counts as zero), then the number of elements of each layer found
        on all ranks (0 for a layer these tensors do not hold). One ``all_reduce`` per process group
        for everything together."""
        return self.reduce([self.piece_squares(pieces, dtype=dtype, device=device) for pieces in piece_sets],
                           dtype=dtype, device=device)

    def piece_squares(self, pieces: Sequence[Optional[Tensor]], *, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The squared L2 norm of each piece (aligned with :attr:`pieces`; 0 where ``None``), on this rank."""
        squares = torch.zeros(len(self.pieces), dtype=dtype, device=device)
        kept = [j for j, piece in enumerate(self.pieces) if piece.numel and pieces[j] is not None]
        if kept:
            local = torch.stack(torch._foreach_norm(pick(pieces, kept), 2, dtype=dtype)).square()
            squares.index_copy_(0, self.constant(kept, device), local)
        return squares

    def reduce(self, squares: Sequence[Tensor], *, dtype: torch.dtype, device: torch.device) -> list[Tensor]:
        """:meth:`norms` from per-piece squared norms (:meth:`piece_squares`, taken when convenient:
        a wrapper takes ``‖w‖`` before its base optimizer's step and ``‖Δw‖`` after it)."""
        n = len(self.layers)
        squared = torch.zeros((len(squares) + 1) * n, dtype=dtype, device=device)
        if self.pieces:
            layer_of = self.constant([piece.layer for piece in self.pieces], device)
            for k, piece_squares in enumerate(squares):
                squared.index_add_(0, layer_of + k * n, piece_squares)
            counts = self.constant([float(piece.numel) for piece in self.pieces], device, dtype)
            squared.index_add_(0, layer_of + len(squares) * n, counts)
        _all_reduce(squared, self.reductions, n, len(squares) + 1)
        *norms, counts = squared.split(n)
        return [norm.sqrt() for norm in norms] + [counts]


def merge(layouts: Sequence[tuple[FlatLayout, int]]) -> FlatLayout:
    """One layout over the concatenated tensors of several ``(layout, number of tensors)``: their norms
    then take one collective per process group in all."""
    layers: list[Layer] = []
    pieces: list[Piece] = []
    reductions: dict[int, tuple[Any, list[int]]] = {}
    tensors = 0
    for layout, count in layouts:
        offset = len(layers)
        layers += layout.layers
        pieces += [p._replace(tensor=p.tensor + tensors, layer=p.layer + offset) for p in layout.pieces]
        for group, members in layout.reductions:
            reductions.setdefault(id(group), (group, []))[1].extend(i + offset for i in members)
        tensors += count
    return FlatLayout("+".join(dict.fromkeys(layout.engine for layout, _ in layouts)), layers, pieces,
                      list(reductions.values()), max(layout.calls_per_step for layout, _ in layouts))


def _all_reduce(squared: Tensor, reductions: list[tuple[Any, list[int]]], n: int, sets: int) -> None:
    import torch.distributed as dist

    for group, layers in reductions:
        if group is None:
            continue
        if len(layers) == n:  # the usual case: one process group for the whole layout
            dist.all_reduce(squared, op=dist.ReduceOp.SUM, group=group)
            continue
        index = device_constant([k * n + i for k in range(sets) for i in layers], squared.device)
        part = squared[index]
        dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
        squared[index] = part


def is_fsdp1(tensor: Tensor) -> bool:
    """Whether ``tensor`` is an FSDP1 ``FlatParameter`` or an FSDP1 ``use_orig_params`` view."""
    return fsdp1.is_flattened(tensor) and not is_dtensor(tensor)


def layer_shape(param: Tensor) -> torch.Size:
    """The shape of the whole parameter (ZeRO-3 keeps it aside: the tensor itself is empty)."""
    shape = deepspeed.whole_shape(param)
    return shape if shape is not None else param.shape


class LayoutResolver:
    """Finds the :class:`FlatLayout` of a group's tensors, and caches it.

    ``candidates`` are the original parameters in an order every rank shares (what the optimizer was
    built with, or a model's parameters); under ZeRO-1/2 they are the layers of the norm vector.
    Returns ``None`` for tensors that are whole layers (plain tensors, DTensors). ``owner`` names
    the optimizer (or monitor) in messages.
    """

    def __init__(self, candidates: Sequence[Tensor], owner: str = "LARS") -> None:
        self.candidates = list(candidates)
        self.owner = owner
        self._cache: dict[tuple[int, ...], Optional[FlatLayout]] = {}
        self._fsdp1: Optional[dict[int, Any]] = None

    def __call__(self, tensors: Sequence[Tensor], where: str = "") -> Optional[FlatLayout]:
        key = tuple(id(t) for t in tensors)
        if key not in self._cache:
            self._cache[key] = self._resolve(list(tensors), where)
        return self._cache[key]

    def _resolve(self, tensors: list[Tensor], where: str) -> Optional[FlatLayout]:
        if not tensors:
            return None
        if any(is_fsdp1(t) for t in tensors):
            if not all(is_fsdp1(t) for t in tensors):
                raise ValueError(f"{where}a param group mixes FSDP1 parameters with others; put each in a group "
                                 "of its own")
            return self._fsdp1_layout(tensors, where)
        known = {id(p) for p in self.candidates}
        if all(id(t) in known for t in tensors):
            return None
        # A tensor the optimizer was not built with: DeepSpeed ZeRO swapped in its flat fp32 partitions.
        z3 = deepspeed.zero3_optimizer(self.candidates)
        if z3 is not None:
            return _zero3_layout(tensors, z3, where)
        if any(deepspeed.has_zero12_fragment(p) for p in self.candidates):
            return _zero12_layout(tensors, self.candidates, where)
        raise ValueError(
            f"{where}a tensor of shape {tuple(tensors[0].shape)} that this optimizer was not built with replaced its "
            f"parameters, and no engine layout (FSDP1, DeepSpeed ZeRO) describes it, so {self.owner} cannot tell "
            "which layers it holds. Build the optimizer with the tensors it will step. See docs/distributed.md.")

    # --- FSDP1 ---------------------------------------------------------------------------------

    def _fsdp1_handles(self) -> dict[int, Any]:
        if self._fsdp1 is None:  # once per optimizer
            self._fsdp1 = fsdp1.find_handles()
        return self._fsdp1

    def _fsdp1_layout(self, tensors: list[Tensor], where: str) -> FlatLayout:
        handles = self._fsdp1_handles()
        layers: list[Layer] = []
        pieces: list[Piece] = []
        groups: dict[int, tuple[Any, list[int]]] = {}
        for t_index, tensor in enumerate(tensors):
            entry = handles.get(id(tensor))
            if entry is None:
                raise ValueError(f"{where}an FSDP1 parameter whose FlatParamHandle cannot be found; build the "
                                 "optimizer after wrapping the model in FullyShardedDataParallel")
            handle, index = entry
            flat = fsdp1.flat_parameter(handle)
            group = fsdp1.reduction_group(handle)
            reduce_into = groups.setdefault(id(group), (group, []))[1]
            shapes, names = fsdp1.original_shapes(flat), fsdp1.original_names(flat)
            if index is not None:  # use_orig_params=True: the tensor is the layer's (possibly empty) piece
                pieces.append(Piece(t_index, 0, tensor.numel(), len(layers)))
                reduce_into.append(len(layers))
                layers.append(Layer(tensor, shapes[index], names[index]))
                continue
            for i, piece in enumerate(fsdp1.shard_pieces(flat)):
                if piece.numel:
                    pieces.append(Piece(t_index, piece.offset, piece.numel, len(layers)))
                reduce_into.append(len(layers))
                layers.append(Layer((tensor, i), shapes[i], names[i]))
        return FlatLayout("FSDP1", layers, pieces, list(groups.values()))


# --- DeepSpeed ZeRO ---------------------------------------------------------------------------------


def _zero12_layout(tensors: list[Tensor], candidates: list[Tensor], where: str) -> FlatLayout:
    """ZeRO-1/2: pieces from each original's fragment of the flat partition (``_hp_mapping``).

    The layers are all ``candidates`` (identical on every rank); those not in these tensors get
    zero norms that nobody uses, which keeps the collective the same on ranks holding no piece.
    """
    storages = {t.untyped_storage().data_ptr(): i for i, t in enumerate(tensors)}
    layers: list[Layer] = []
    pieces: list[Piece] = []
    groups: dict[int, tuple[Any, list[int]]] = {}
    for index, param in enumerate(candidates):
        layers.append(Layer(param, layer_shape(param)))
        if deepspeed.has_zero12_fragment(param) and not deepspeed.records_data_parallel_group(param):
            raise ValueError(f"{where}this DeepSpeed does not record the data-parallel group of its partitions "
                             "(_dp_group), which whole-parameter norms need; use deepspeed >= 0.19")
        group = deepspeed.data_parallel_group(param)
        groups.setdefault(id(group), (group, []))[1].append(index)
        fragment = deepspeed.zero12_fragment(param)
        if fragment is None:
            continue
        t_index = storages.get(fragment.tensor.untyped_storage().data_ptr())
        if t_index is None:
            continue  # a fragment of another group's partition
        tensor = tensors[t_index]
        start = (fragment.tensor.storage_offset() - tensor.storage_offset())
        if start != fragment.start or fragment.tensor.numel() != fragment.numel:
            raise ValueError(f"{where}DeepSpeed's fragment address of a parameter does not match its place in the "
                             "flat partition; this DeepSpeed layout is not supported")
        pieces.append(Piece(t_index, fragment.start, fragment.numel, index))
    return FlatLayout("DeepSpeed ZeRO-1/2", layers, pieces, list(groups.values()))


def _zero3_layout(tensors: list[Tensor], z3: Any, where: str) -> FlatLayout:
    """ZeRO-3: each tensor is one sub-group's flat fp32 partition; every original parameter of the
    sub-group holds ``partition_numel()`` elements of it, in order, the real ones first."""
    import torch.distributed as dist

    flats, sub_groups, group = deepspeed.zero3_sub_groups(z3)
    rank = dist.get_rank(group=group)
    layers: list[Layer] = []
    pieces: list[Piece] = []
    for t_index, tensor in enumerate(tensors):
        sub = next((i for i, flat in enumerate(flats) if flat is tensor), None)
        if sub is None:
            raise ValueError(f"{where}a tensor in a param group is none of DeepSpeed ZeRO-3's flat fp32 partitions")
        offset = 0
        for param in sub_groups[sub]:
            size, whole = deepspeed.zero3_share(param)
            real = min(size, max(0, whole - rank * size))
            if real:
                pieces.append(Piece(t_index, offset, real, len(layers)))
            layers.append(Layer(param, layer_shape(param)))
            offset += size
    return FlatLayout("DeepSpeed ZeRO-3", layers, pieces, [(group, list(range(len(layers))))],
                      calls_per_step=len(sub_groups))


class FlatPieces:
    """A group's tensors under a flat layout (FSDP1, DeepSpeed ZeRO) as a step takes them: the
    pieces of layers this rank holds that have gradients (``params``, ``grads``: 1-D views), whether
    each piece's layer is excluded, and ``norms``, the whole-layer norms the update rules ask for.

    The same face as :class:`~lars_plugins.distributed.WholeTensors`, so that an optimizer writes
    one step for both. What differs is inside: whole-layer norms need one collective that every rank
    runs, whatever pieces it holds, so :meth:`norms` reduces every layer of the layout at its first
    call (``‖w‖`` from all this rank's pieces, the other norm from the pieces it is given) and
    :meth:`finish` runs the same collective on a rank whose pieces never asked. State lives in
    tensors shaped like the flat tensors (the engines checkpoint and re-partition it as their own),
    and the ratios of whole layers are kept per layer (:meth:`layer_norms`), not per piece.
    """

    whole = False
    sharded = True

    def __init__(self, layout: FlatLayout, tensors: list[Tensor], excluded_layers: list[bool], where: str = "",
                 owner: str = "LARS") -> None:
        self.layout = layout
        self.tensors = tensors
        self.adapted_layers = [not excluded for excluded in excluded_layers]
        self._values = layout.views(tensors)
        grad_views = layout.views([t.grad for t in tensors])
        self.kept = [j for j, piece in enumerate(layout.pieces) if piece.numel and grad_views[j] is not None]
        self.params: list[Tensor] = pick(self._values, self.kept)
        self.grads: list[Tensor] = pick(grad_views, self.kept)
        self.excluded = [excluded_layers[layout.pieces[j].layer] for j in self.kept]
        self.owners = [tensors[layout.pieces[j].tensor] for j in self.kept]
        if len(buckets(self.params)) > 1:
            raise ValueError(f"{where}the flat tensors of one param group hold several dtypes or devices; "
                             f"{owner} takes the whole-layer norms of a flat layout in one collective: put the "
                             "tensors of each dtype and device in a param group of their own")
        self.dtype, self.device = ratio_dtype(tensors[0].dtype), tensors[0].device
        self._layer_norms: Optional[tuple[Tensor, Tensor]] = None

    @property
    def needs_collective(self) -> bool:
        """Whether this step reduces norms: decided by the layout alone, so the same on every rank."""
        return any(self.adapted_layers)

    def norms(self, indices: Sequence[int], local_params: Sequence[Tensor], local_others: Sequence[Tensor],
              dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Whole-layer ``‖w‖`` and ``‖other‖`` (gradient, LAMB's ``u``) of the pieces ``indices``
        (positions in :attr:`params`), given ``local_others`` of those pieces."""
        if self._layer_norms is not None:
            raise RuntimeError("a flat layout's norms were asked for twice in one step")
        others: list[Optional[Tensor]] = [None] * len(self.layout.pieces)
        for item, other in zip(indices, local_others):
            others[self.kept[item]] = other
        self._reduce(others)
        assert self._layer_norms is not None
        w_norms, other_norms = self._layer_norms
        per_item = self.layout.constant([self.layout.pieces[self.kept[i]].layer for i in indices], self.device)
        return w_norms[per_item], other_norms[per_item]

    def reduce(self, indices: Sequence[int], squares: Sequence[Tensor]) -> list[Tensor]:
        """Whole-layer norms of the pieces ``indices`` from their squared norms (one vector per set,
        taken when convenient: the wrapper takes ``‖w‖`` before its base's step and ``‖Δw‖`` after),
        in the step's one collective; :attr:`layer_norms` then holds the first two sets per layer."""
        if self._layer_norms is not None:
            raise RuntimeError("a flat layout's norms were asked for twice in one step")
        index = self.layout.constant([self.kept[i] for i in indices], self.device, torch.long)
        per_piece = []
        for piece_squares in squares:
            full = torch.zeros(len(self.layout.pieces), dtype=self.dtype, device=self.device)
            if len(indices):
                full.index_copy_(0, index, piece_squares.to(self.dtype))
            per_piece.append(full)
        *layer_norms, _ = self.layout.reduce(per_piece, dtype=self.dtype, device=self.device)
        self._layer_norms = (layer_norms[0], layer_norms[1])
        per_item = self.layout.constant([self.layout.pieces[self.kept[i]].layer for i in indices], self.device,
                                        torch.long)
        return [norms[per_item] for norms in layer_norms]

    def _reduce(self, others: Sequence[Optional[Tensor]]) -> None:
        w_norms, other_norms, _ = self.layout.norms(self._values, others, dtype=self.dtype, device=self.device)
        self._layer_norms = (w_norms, other_norms)

    def finish(self) -> None:
        """Run the step's collective if this rank's pieces never asked for norms (it holds no piece
        of an adapted layer, or none with a gradient): the other ranks run it."""
        if self.needs_collective and self._layer_norms is None:
            self._reduce([None] * len(self.layout.pieces))

    @property
    def layer_norms(self) -> Optional[tuple[Tensor, Tensor]]:
        """``(‖w‖, ‖other‖)`` of every layer of the layout at this step, once reduced."""
        return self._layer_norms

    def ratio_slots(self, optimizer: Any) -> list[Optional[Tensor]]:
        """Where the rules write each piece's ratio: scratch (the per-layer ratios are kept from
        :attr:`layer_norms`)."""
        scratch = torch.empty(len(self.params), dtype=self.dtype, device=self.device).unbind()
        return [None if excluded else slot for slot, excluded in zip(scratch, self.excluded)]

    def state(self, state: dict[Tensor, dict[str, Any]], key: str) -> list[Optional[Tensor]]:
        """Each piece's view of ``state[t][key]`` of its flat tensor ``t`` (``None`` where it does not exist yet)."""
        return pick(self.layout.views([state[t].get(key) for t in self.tensors]), self.kept)

    def store(self, state: dict[Tensor, dict[str, Any]], key: str, values: Sequence[Optional[Tensor]],
              new: Sequence[bool]) -> None:
        """On a flat tensor's first step, the pieces' new state goes into one tensor shaped like it."""
        for t_index, tensor in enumerate(self.tensors):
            if key in state[tensor]:  # every step after the first
                continue
            mine = [k for k, j in enumerate(self.kept) if self.layout.pieces[j].tensor == t_index and new[k]]
            if not mine:
                continue
            flat = torch.zeros_like(tensor, memory_format=torch.contiguous_format)
            views = self.layout.views([flat if k == t_index else None for k in range(len(self.tensors))])
            for k in mine:
                view, value = views[self.kept[k]], values[k]
                if view is not None and value is not None:
                    view.copy_(value)
            state[tensor][key] = flat
