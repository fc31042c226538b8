"""Quantized weights and eco's optimizers on PyTorch's own distributed engine (FSDP2, DCP, DDP).

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every parameter along
dim 0. A :class:`~eco.qparam.QuantizedTensor` parameter stays quantized: its
shard is a ``QuantizedTensor`` holding the codes and scales of its rows (the
formats keep scales local to rows, groups and experts for this reason; the one
scale of a tensor-wise INT4 matrix is held by every shard). Before forward and
backward, FSDP2 all-gathers what :meth:`QuantizedTensor.fsdp_pre_all_gather`
returns, the shard's codes and scales (1 or 0.5 bytes per parameter plus the
scales, instead of 2 for a bf16 weight), and :meth:`fsdp_post_all_gather` wraps
the gathered buffers in a full ``QuantizedTensor`` (no copy): ops dequantize
what they need from it, and autograd saves it, not a dequantized copy.
Gradients are ordinary tensors, reduce-scattered as usual.

Why the one-argument form of ``fsdp_pre_all_gather`` (the mesh only): FSDP2's
five-argument form requires, on a rank whose shard is shorter than the others
(rows not divisible by the world size), every all-gather input to have the
padded *logical* shard shape, which packed INT4 codes and per-row scales cannot
have. All-gather inputs must still be equally long on every rank, so a short
shard is padded here to the padded row count; that count is read from the
buffer FSDP2 cut the shard from (``fully_shard`` allocates the padded shard with
``new_zeros`` and keeps a dim-0 prefix view of it as the local tensor).

eco's optimizers step each rank's shards (:func:`local_view`): the backends
get each shard's place in its whole tensor (offset of its first element, the
whole shape, an all-reduce over the shards) and compute exactly the unsharded
step's bits. States are ``DTensor`` s (:func:`allocate_state`), so DCP saves
and reshards them like the parameters.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

from . import states
from .qparam import QuantizedTensor, _alias, _handles, _view
from .states import StateFormat

aten = torch.ops.aten


def local_tensor(t):
    """The shard this rank holds of a ``DTensor`` (FSDP2 parameters, gradients, sharded states); else ``t``."""
    return t._local_tensor if isinstance(t, DTensor) else t


# ---------------------------------------------------------------- the optimizer on shards
class ShardInfo(NamedTuple):
    """Where a shard sits in its whole tensor, and the groups of the ranks holding its other rows."""

    offset: int  # row-major index, in the whole tensor, of the shard's first element
    full_shape: torch.Size
    groups: tuple


def steps_whole(p: torch.Tensor, shape, formats) -> bool:
    """Whether every rank steps the whole of ``p`` (gathered) and keeps whole, replicated states: a sharded 1-D
    parameter (``shape``: its real view's) with a block-scaled state format, whose shards would cut the
    128-element blocks that share a scale. Such parameters are norms and biases: small."""
    return isinstance(p, DTensor) and len(shape) == 1 and any(isinstance(f, states.Block8) for f in formats)


def allocate_state(fmt: StateFormat, p: torch.Tensor, shape, whole: bool = False) -> tuple[torch.Tensor, ...]:
    """Zero tensors of state format ``fmt`` for parameter ``p`` (``shape``: its real view's): for a ``DTensor``
    ``p``, ``DTensor``s (so DCP can reshard them) whose row-local parts are sharded like ``p`` and whose
    per-matrix parts (``states.replicated_parts``) are replicated, every rank holding the same copy; all
    replicated when the whole tensor is stepped on every rank (``whole``, :func:`steps_whole`)."""
    if not isinstance(p, DTensor):
        return fmt.allocate(shape, p.device)
    local = p._local_tensor
    local_shape = shape if whole else (*local.shape, *shape[p.dim():])
    replicated = fmt.parts if whole else states.replicated_parts(fmt, shape)
    out = []
    for suffix, full, part in zip(fmt.parts, fmt.shapes(shape), fmt.allocate(local_shape, local.device), strict=True):
        if suffix in replicated:  # per matrix (shaped by the columns only), or whole: this rank's part is all of it
            out.append(DTensor.from_local(part, p.device_mesh, [Replicate()] * p.device_mesh.ndim, run_check=False))
        else:
            out.append(_sharded_like(p, part, full))
    return tuple(out)


def _sharded_like(p: DTensor, local: torch.Tensor, shape) -> DTensor:
    whole = torch.empty(shape, device="meta")
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=whole.shape,
                              stride=whole.stride())


def shardwise(p: torch.Tensor, fn) -> torch.Tensor:
    """``fn`` applied to ``p``, or to each rank's shard of ``p`` (the result sharded like ``p``)."""
    return _sharded_like(p, fn(p._local_tensor), p.shape) if isinstance(p, DTensor) else fn(p)


def local_view(p: torch.Tensor, whole: bool = False) -> torch.Tensor:
    """What the optimizer steps for parameter ``p``: ``p`` itself, or, for a ``DTensor``, a fresh alias of this
    rank's shard that carries the shard of the gradient as ``.grad`` and where the shard sits (see
    :func:`shard_offset`, :func:`shard_full_shape`, :func:`shard_reduce`); gone after the step.

    ``whole`` (:func:`steps_whole`): the gathered parameter and gradient (collectives, in the same order on
    every rank); :func:`write_back` then copies this rank's rows of the result into its shard.
    """
    if not isinstance(p, DTensor):
        return p
    if whole:
        view = p.detach().full_tensor()
        view.grad = p.grad.full_tensor()
        view.eco_write_back = p
        return view
    view = p._local_tensor.detach()
    view.grad = local_tensor(p.grad)
    view.eco_shard = ShardInfo(_dim0_start(p) * p.shape[1:].numel(), p.shape, tuple(_shard_groups(p)))
    return view


def write_back(views) -> None:
    """Copy each rank's rows of the stepped whole tensors of :func:`local_view` (``whole``) into its shard."""
    for view in views:
        p = getattr(view, "eco_write_back", None)
        if p is not None:
            start = _dim0_start(p)
            shard = p._local_tensor
            shard.copy_(view[start:start + shard.shape[0]])


def local_state(state: dict) -> dict:
    """``state`` with each sharded tensor replaced by this rank's shard (the step writes into it in place)."""
    return {key: local_tensor(value) for key, value in state.items()}


def is_shard(view: torch.Tensor) -> bool:
    """Whether ``view`` is a shard made by :func:`local_view`."""
    return hasattr(view, "eco_shard")


def shard_offset(view: torch.Tensor) -> int:
    """Row-major index, in the whole (unsharded) tensor, of the first element of ``view`` (0: not a shard)."""
    return view.eco_shard.offset if is_shard(view) else 0


def shard_full_shape(view: torch.Tensor):
    """Shape of the whole tensor ``view`` is a shard of (None: not a shard)."""
    return view.eco_shard.full_shape if is_shard(view) else None


def shard_reduce(view: torch.Tensor):
    """``reduce(tensor, op)``, an in-place all-reduce (``op``: ``"max"`` or ``"sum"``) over the ranks holding
    the other rows of ``view``; None for an unsharded tensor, and for a shard of stacked matrices (experts: it holds
    whole ones, nothing to reduce; the steps reduce only for 2-D tensors)."""
    groups = view.eco_shard.groups if is_shard(view) and len(view.eco_shard.full_shape) == 2 else ()
    if not groups:
        return None

    def reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
        for group in groups:
            dist.all_reduce(tensor, op=_REDUCE_OPS[op], group=group)
        return tensor

    return reduce


_REDUCE_OPS = {"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}


def _dim0_start(p: DTensor) -> int:
    """First global row of this rank's shard; refuses layouts whose shard is not one block of whole rows."""
    from torch.distributed.tensor.placement_types import Shard

    if any(type(pl) not in (Shard, Replicate) or (type(pl) is Shard and pl.dim != 0) for pl in p.placements):
        raise NotImplementedError(
            f"eco's optimizers step DTensor parameters sharded along dim 0 (FSDP2's default), got placements "
            f"{p.placements} for a parameter of shape {tuple(p.shape)}"
        )
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return offset[0] if offset else 0


def _shard_groups(p: DTensor) -> list:
    """Process groups across which ``p``'s rows are split (the mesh dimensions it is sharded over)."""
    return [p.device_mesh.get_group(dim) for dim, pl in enumerate(p.placements)
            if pl.is_shard() and p.device_mesh.size(dim) > 1]


def all_ranks_agree(flag: bool, params) -> bool:
    """``flag`` if it holds on every rank sharing sharded ``params`` with this one (one all-reduce), else False.

    A step is skipped everywhere or nowhere: a NaN in one shard's gradient is seen by that rank only.
    """
    groups = {}
    for p in params:
        if isinstance(p, DTensor):
            for dim in range(p.device_mesh.ndim):
                if p.device_mesh.size(dim) > 1:
                    group = p.device_mesh.get_group(dim)
                    groups[id(group)] = (group, p.device_mesh.device_type)
    for group, device_type in groups.values():
        value = torch.tensor([int(flag)], dtype=torch.int32, device=device_type)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=group)
        flag = bool(value.item())
    return flag


# ---------------------------------------------------------------- FSDP2's ops on a quantized weight
def _one_scale(qt: QuantizedTensor) -> bool:
    """True when one scale covers all rows (tensor-wise INT4 on a 2-D weight): every row slice shares it."""
    return qt.fmt.tensorwise and qt.dim() == 2


@_handles(aten.new_zeros.default, aten.new_empty.default)
def _new_zeros(func, args, kwargs):
    """A zero weight of the same format when the shape allows one (FSDP2 pads shards this way). The one scale of a
    tensor-wise matrix is kept: a shard of no rows (never copied into) still holds its matrix's scale."""
    qt, size = args[0], tuple(args[1])
    dtype = kwargs.get("dtype") or qt.dtype
    device = kwargs.get("device") or qt.device
    if len(size) != qt.dim() or size[1:] != tuple(qt.shape[1:]) or not dtype.is_floating_point:
        return torch.zeros(size, dtype=dtype, device=device)
    codes = qt.fmt.encode(torch.zeros(size, dtype=torch.int8, device=device))
    if _one_scale(qt):
        scales = qt.scales.to(device, copy=True)
    else:
        scales = torch.ones(qt.fmt.scale_shape(size), dtype=qt.scales.dtype, device=device)
    return QuantizedTensor(codes, scales, qt.fmt, size, dtype)


@_handles(aten.as_strided.default)
def _as_strided(func, args, kwargs):
    """FSDP2 views the all-gathered weight as its unpadded size: a contiguous dim-0 prefix stays a selection of
    the codes (as a recorded view, every ``w[e]`` of it would dequantize all experts)."""
    qt, size, stride = args[0], tuple(args[1]), tuple(args[2])
    offset = args[3] if len(args) > 3 else kwargs.get("storage_offset", 0) or 0
    if (offset == 0 and len(size) == qt.dim() and size[1:] == tuple(qt.shape[1:]) and size[0] <= qt.shape[0]
            and stride == tuple(qt.stride()) and not qt._post and qt._rows is None):
        if size[0] == qt.shape[0]:
            return _alias(qt)
        return _view(qt, aten.slice.Tensor, (0, 0, size[0]), {})
    return _view(qt, func, args[1:], kwargs)


# ---------------------------------------------------------------- FSDP2 all-gather
def _rows_in_buffer(t: torch.Tensor) -> int:
    """Rows of ``t``'s storage from ``t``'s first row on (a shard's padded row count)."""
    row_bytes = t.shape[1:].numel() * t.element_size()
    return (t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()) // row_bytes


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` extended to ``rows`` rows over its own buffer (the padding FSDP2 allocated)."""
    if t.shape[0] == rows:
        return t
    return torch.as_strided(t, (rows, *t.shape[1:]), t.stride(), t.storage_offset())


def fsdp_pre_all_gather(qt: QuantizedTensor, mesh):
    rows = _rows_in_buffer(qt.codes)
    codes = _pad_rows(qt.codes, rows)
    scales = qt.scales if _one_scale(qt) else _pad_rows(qt.scales, rows)
    return (codes, scales), None


def fsdp_post_all_gather(qt: QuantizedTensor, outputs, metadata, param_dtype, *, out=None):
    if out is not None:  # ``out`` already views these buffers, which FSDP2 refilled in place
        return None
    if len(outputs) == 1:
        # One rank: FSDP2 (torch 2.13) copies only the first all-gather input; the shard is the whole
        # weight, so its own scales are the scales (updated in place by the optimizer, as the codes' source is).
        (codes,), scales = outputs, qt.scales
    else:
        codes, scales = outputs
        if _one_scale(qt):
            scales = scales[:1]
    full = QuantizedTensor(codes, scales, qt.fmt, (codes.shape[0], *qt.shape[1:]), param_dtype)
    return full, ()
