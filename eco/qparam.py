"""The quantized weight, and ``quantize_`` that puts it into a model.

``QuantizedTensor`` is a wrapper tensor subclass: to the model it looks like a
floating tensor of its logical shape and dtype, while it only holds ``codes``
and ``scales``. Any op the model runs on it sees the dequantized values
(``__torch_dispatch__``), so ``nn.Linear``, ``F.linear``, matmuls and
``transformers``-style fused experts (``w[expert]``) run unchanged. Autograd
sits above dispatch, so ``.grad`` arrives as an ordinary tensor of the logical
dtype.

Views stay quantized. ``w.t()``, ``w.transpose(...)``, ``w[e]``, ``w[ids]``,
``w[a:b]`` and every other view op return a ``QuantizedTensor`` that reads the
same codes and scales and records the view; the op that consumes it (``mm``,
``bmm``, ``grouped_mm``, ...) dequantizes. Autograd therefore saves the view
for backward, which costs no memory beyond the codes and scales that exist
anyway, and backward dequantizes again. Selections along dim 0 (experts, or
rows of a row/group-scaled matrix) act on the codes directly, because scales
are local to dim-0 slices: ``w[e]`` dequantizes one expert only.

Writes take effect in the codes. An in-place op on a quantized weight or on
any view of it (``w[0, 0] = 5.0``, ``w[1].zero_()``, ``torch._foreach_lerp_``,
``w.data = t``) runs on the dequantized values; every scale group (row,
block, group, or whole matrix for tensor-wise INT4) whose values changed is
re-quantized with round-to-nearest, and every other group keeps its codes and
scales bit for bit. ``w[index]`` with an index tensor is a copy in PyTorch;
here it reads the weight's codes lazily, so writing into it raises.

The optimizer updates ``codes`` and ``scales`` in place; the quantized weight
knows nothing about optimizers.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import inspect
import itertools
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from torch.fx.experimental.proxy_tensor import get_proxy_mode
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.checkpoint import CheckpointPolicy

from . import backends
from .formats import QuantFormat, format_from_config

aten = torch.ops.aten

# One recorded view op: the aten overload and its arguments after ``self``.
ViewOp = tuple  # (OpOverload, tuple, dict)


def _quantize(fmt: QuantFormat, x: torch.Tensor, rounding: str = "nearest", generator=None):
    return backends.quantize(x, fmt, rounding, generator)


def _dequantize(fmt: QuantFormat, codes, scales, shape, dtype) -> torch.Tensor:
    return backends.dequantize(codes, scales, fmt, shape, dtype)


@contextlib.contextmanager
def _recomputed_in_backward():
    """Under torch.compile, mark the graph nodes made inside as "recompute in backward".

    Eager autograd saves the quantized view and backward dequantizes again. A compiled graph is partitioned
    by AOTAutograd instead, which would save the dequantized weight for the backward matmul (it never
    recomputes a value that backward must materialize anyway). The tag is the one selective activation
    checkpointing uses; the partitioner then saves the codes and scales (inputs, no new memory).
    """
    mode = get_proxy_mode()
    if mode is None:
        yield
        return
    graph = mode.tracer.graph
    before = len(graph.nodes)
    yield
    for node in itertools.islice(reversed(graph.nodes), len(graph.nodes) - before):
        node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE


class QuantizedTensor(torch.Tensor):
    """A weight stored as ``codes`` + ``scales`` in a :class:`~eco.formats.QuantFormat`.

    A view of a quantized weight is a ``QuantizedTensor`` too: ``codes`` and
    ``scales`` are then the part of the weight's codes it reads (``w[e]``:
    expert ``e``'s), and the view ops after that are applied to the
    dequantized values.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    fmt: QuantFormat

    @staticmethod
    def __new__(cls, codes, scales, fmt, shape, dtype, requires_grad=False, *, strides=None, storage_offset=None):
        return torch.Tensor._make_wrapper_subclass(
            cls, torch.Size(shape), strides=strides, storage_offset=storage_offset, dtype=dtype,
            device=codes.device, requires_grad=requires_grad,
        )

    def __init__(self, codes, scales, fmt, shape, dtype, requires_grad=False, **geometry):
        self.codes = codes
        self.scales = scales
        self.fmt = fmt
        # What is read: rows ``_rows`` (an index tensor, for ``w[index]``) of codes/scales, of logical
        # shape ``_stored_shape``, dequantized, then the view ops ``_post``.
        self._rows: torch.Tensor | None = None
        self._stored_shape = torch.Size(shape)
        self._post: tuple[ViewOp, ...] = ()
        # Where writes go: the quantized tensor whose codes they are stored into, and the view ops from it to
        # here (None and () when that is this tensor). ``_codes_view``: codes and scales are views into another
        # tensor's (``w[e]``: whole scale groups of ``w``, so writes are stored here and land in ``w``).
        self._root: QuantizedTensor | None = None
        self._chain: tuple[ViewOp, ...] = ()
        self._codes_view = False

    # ------------------------------------------------------------ construction
    @classmethod
    def from_float(cls, x: torch.Tensor, fmt: QuantFormat, rounding: str = "nearest", generator=None):
        """Quantize ``x``; the result's logical dtype is ``x.dtype``. A meta ``x`` gives meta codes and scales."""
        _check_quantizable(x, fmt)
        codes, scales = _quantize(fmt, x.detach(), rounding, generator)
        return cls(codes, scales, fmt, x.shape, x.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The represented values as an ordinary tensor (logical dtype by default)."""
        with _recomputed_in_backward():
            codes, scales = self._read()
            out = _dequantize(self.fmt, codes, scales, self._stored_shape, dtype or self.dtype)
            for func, args, kwargs in self._post:
                out = func(out, *args, **kwargs)
        return out

    def _read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The codes and scales of the values this tensor reads, before the ``_post`` view ops."""
        if self._rows is None:
            return self.codes, self.scales
        return _take_rows(self.fmt, self.codes, self.scales, lambda t: t[self._rows])

    def __repr__(self):
        kind = "" if self._is_whole_storage() else "view, "
        return (f"QuantizedTensor({self.fmt}, {kind}shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"device={self.device})")

    # ------------------------------------------------------------ tensor methods that bypass dispatch
    @property
    def data(self):
        return self.detach()

    @data.setter
    def data(self, value):
        """``w.data = t``: a quantized ``t`` of this format and shape is shared (as torch shares storage);
        anything else is quantized into this weight's codes (round-to-nearest, only the groups that change)."""
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"expected a tensor, got {type(value).__name__}")
        if value.shape != self.shape or value.dtype != self.dtype or value.device != self.device:
            raise ValueError(
                f"cannot set .data of a quantized weight of shape {tuple(self.shape)}, {self.dtype}, on "
                f"{self.device} to a tensor of shape {tuple(value.shape)}, {value.dtype}, on {value.device}: "
                "a quantized weight keeps its shape, dtype and device; quantize a new parameter instead "
                "(eco.quantize_ on a fresh module)"
            )
        if (isinstance(value, QuantizedTensor) and value.fmt == self.fmt and self._is_whole_storage()
                and value._is_whole_storage()):
            self.codes, self.scales = value.codes, value.scales
            return
        with torch.no_grad():
            self.copy_(value)

    def share_memory_(self):
        """Move ``codes`` and ``scales`` to shared memory (``model.share_memory()``)."""
        if not self._is_whole_storage():
            raise RuntimeError("share_memory_() applies to a quantized weight itself, not to a view of it")
        self.codes.share_memory_()
        self.scales.share_memory_()
        return self

    def is_shared(self):
        return self.codes.is_shared() and self.scales.is_shared()

    def _is_whole_storage(self) -> bool:
        return self._root is None and self._rows is None and not self._codes_view

    # ------------------------------------------------------------ subclass protocol
    def __tensor_flatten__(self):
        inner = ["codes", "scales"] if self._rows is None else ["codes", "scales", "_rows"]
        return inner, (self.fmt, self._stored_shape, self.dtype, self._post)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        fmt, stored_shape, dtype, post = meta
        out = QuantizedTensor(inner["codes"], inner["scales"], fmt, outer_size, dtype, strides=outer_stride)
        out._rows = inner.get("_rows")
        out._stored_shape = stored_shape
        out._post = post
        return out

    def _stable_hash_for_caching(self) -> str:
        """AOTAutograd's cache key for graphs taking this tensor: its layout and eco's own code.

        A compiled graph holds eco's dispatch code traced (dequantize, views); without the code in the key a
        cache written by another eco version would be reused.
        """
        inner = [getattr(self, name) for name in self.__tensor_flatten__()[0]]
        payload = (self.fmt.config(), tuple(self.shape), self.stride(), str(self.dtype), self.requires_grad,
                   tuple(self._stored_shape), repr(self._post), _eco_source_digest(),
                   [(tuple(t.shape), t.stride(), str(t.dtype), t.device.type) for t in inner])
        return hashlib.blake2b(repr(payload).encode(), digest_size=16).hexdigest()

    def __reduce_ex__(self, protocol):
        if not self._is_whole_storage():
            return _clone(aten.clone.default, (self,), {}).__reduce_ex__(protocol)
        # Codes travel as uint8: plain pickle cannot write float8 storages.
        return (_rebuild_quantized, (self.codes.view(torch.uint8), self.scales, self.fmt.config(), tuple(self.shape),
                                     str(self.dtype).removeprefix("torch."), self.requires_grad,
                                     str(self.codes.dtype).removeprefix("torch.")))

    def __deepcopy__(self, memo):
        out = _clone(aten.clone.default, (self,), {})
        if isinstance(out, QuantizedTensor):
            out.requires_grad_(self.requires_grad)
        return out

    # FSDP2 looks these up on a shard (``fully_shard``): gather codes and scales, not dequantized values
    def fsdp_pre_all_gather(self, mesh):
        from .distributed import fsdp_pre_all_gather

        return fsdp_pre_all_gather(self, mesh)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        from .distributed import fsdp_post_all_gather

        return fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, out=out)

    @classmethod
    @torch._disable_dynamo  # runs eagerly (or is traced by AOTAutograd), never compiled as a frame of its own
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(func, args, kwargs)
        if _is_plain_view(func) and isinstance(args[0], QuantizedTensor):
            return _view(args[0], func, args[1:], kwargs)
        return _run_dequantized(func, args, kwargs)


@functools.cache
def _eco_source_digest() -> str:
    """A digest of eco's Python sources (the package and its kernels, found without importing Triton)."""
    kernels = importlib.util.find_spec("eco.kernels")
    folders = [Path(__file__).parent, *map(Path, kernels.submodule_search_locations if kernels else ())]
    digest = hashlib.blake2b(digest_size=16)
    for folder in folders:
        for source in sorted(folder.glob("*.py")):
            digest.update(source.read_bytes())
    return digest.hexdigest()


def _rebuild_quantized(codes, scales, fmt_config, shape, dtype_name, requires_grad, codes_dtype_name=None):
    if codes_dtype_name is not None:
        codes = codes.view(getattr(torch, codes_dtype_name))
    out = QuantizedTensor(codes, scales, format_from_config(fmt_config), shape, getattr(torch, dtype_name))
    if requires_grad:
        out.requires_grad_(True)
    return out


def _check_quantizable(x: torch.Tensor, fmt: QuantFormat) -> None:
    if not x.is_floating_point():
        raise TypeError(f"only floating tensors can be quantized, got {x.dtype}")
    fmt.check_shape(x.shape)
    if x.device.type != "meta" and not torch.isfinite(x).all():
        raise ValueError("cannot quantize a tensor with NaN or inf values")


def _take_rows(fmt: QuantFormat, codes, scales, pick: Callable[[torch.Tensor], torch.Tensor]):
    """``pick`` applied along dim 0 to codes and to the scales that go with those rows.

    Scales are local to dim-0 slices, except the one scale of a tensor-wise 2-D matrix, which every row shares.
    """
    return pick(codes), (scales if fmt.tensorwise and codes.dim() == 2 else pick(scales))


# ---------------------------------------------------------------- views
@functools.cache
def _is_plain_view(func) -> bool:
    """A view op returning one tensor of the input's dtype (``view(dtype)`` reinterprets bits: not one)."""
    schema = func._schema
    return (func.is_view and len(schema.returns) == 1 and str(schema.returns[0].type) == "Tensor"
            and func is not aten.view.dtype)


def _geometry(stored_shape, post: tuple[ViewOp, ...]):
    """Size, strides and storage offset of ``post`` applied to a contiguous tensor of ``stored_shape``
    (what :meth:`QuantizedTensor.dequantize` returns), so the view reports the strides its values will have."""
    try:
        key = (tuple(stored_shape), tuple((func, args, tuple(kwargs.items())) for func, args, kwargs in post))
        return _geometry_of(key)
    except TypeError:  # symbolic sizes (torch.compile with dynamic shapes) are not hashable
        return _replay_on_meta(stored_shape, post)


@functools.lru_cache(maxsize=4096)
def _geometry_of(key):
    stored_shape, post = key
    return _replay_on_meta(stored_shape, tuple((func, args, dict(kwargs)) for func, args, kwargs in post))


def _replay_on_meta(stored_shape, post):
    with _disable_current_modes():
        meta = torch.empty(stored_shape, device="meta")
        for func, args, kwargs in post:
            meta = func(meta, *args, **kwargs)
    return meta.shape, meta.stride(), meta.storage_offset()


def _selects_codes(qt: QuantizedTensor, func, args) -> bool:
    """Whether this view op picks whole dim-0 slices of what ``qt`` reads, so it can act on the codes."""
    if qt._post or qt._rows is not None:
        return False
    ndim = len(qt._stored_shape)
    if func is aten.select.int:
        return args[0] in (0, -ndim) and ndim == 3
    if func is aten.slice.Tensor:
        return (args[0] if args else 0) in (0, -ndim) and ndim in (2, 3)
    return False


def _view(parent: QuantizedTensor, func, args: tuple, kwargs: dict) -> QuantizedTensor:
    """``func(parent, *args, **kwargs)`` for a view op, as a quantized view of ``parent``."""
    op = (func, _frozen(args), dict(kwargs))
    if _selects_codes(parent, func, args):
        codes, scales = _take_rows(parent.fmt, parent.codes, parent.scales, lambda t: func(t, *args, **kwargs))
        shape, _, _ = _geometry(parent._stored_shape, (op,))
        out = QuantizedTensor(codes, scales, parent.fmt, shape, parent.dtype)  # contiguous, like its dequantize()
        if scales is not parent.scales:  # whole scale groups: writes are stored right here, in the parent's codes
            out._codes_view = True
            return out
    else:
        post = parent._post + (op,)
        shape, strides, offset = _geometry(parent._stored_shape, post)
        if (shape, strides, offset) == (parent.shape, parent.stride(), parent.storage_offset()):
            return _alias(parent)  # view(same shape), as_strided to itself (DTensor.to_local): no op to record
        out = QuantizedTensor(parent.codes, parent.scales, parent.fmt, shape, parent.dtype,
                              strides=strides, storage_offset=offset)
        out._rows = parent._rows
        out._stored_shape = parent._stored_shape
        out._post = post
    out._root = parent if parent._root is None else parent._root
    out._chain = parent._chain + (op,)
    return out


def _frozen(args) -> tuple:
    """View op arguments with lists as tuples (a recorded op is part of cache keys)."""
    return tuple(tuple(a) if isinstance(a, list) else a for a in args)


def _alias(src: QuantizedTensor) -> QuantizedTensor:
    """A new tensor object reading and writing the same codes and scales as ``src``."""
    if src._is_whole_storage():
        return QuantizedTensor(src.codes, src.scales, src.fmt, src.shape, src.dtype)
    out = QuantizedTensor(src.codes, src.scales, src.fmt, src.shape, src.dtype,
                          strides=src.stride(), storage_offset=src.storage_offset())
    out._rows, out._stored_shape, out._post = src._rows, src._stored_shape, src._post
    out._root = src if src._root is None else src._root
    out._chain = src._chain
    return out


# ---------------------------------------------------------------- writes
def _store(root: QuantizedTensor, values: torch.Tensor) -> None:
    """Make ``root`` represent ``values`` (its full logical shape): the scale groups whose values changed are
    quantized with round-to-nearest; the others keep their codes and scales bit for bit."""
    if root._rows is not None:
        raise RuntimeError(
            "w[index] of a quantized weight (an index tensor) is a copy that reads the weight's codes; it "
            "cannot be written to. Write into the weight (w.index_put_, w[index] = values), or .clone() the copy"
        )
    if root.device.type == "meta":
        return
    fmt = root.fmt
    old = fmt.grouped(root.dequantize(values.dtype))
    new = fmt.grouped(values.to(root.device))
    changed = ((new != old) & ~(new.isnan() & old.isnan())).any(dim=1)
    if not changed.any():
        return
    if not torch.isfinite(new[changed]).all():
        raise ValueError("cannot store NaN or inf into a quantized weight; its codes were left unchanged")
    codes, scales = _quantize(fmt, values.to(root.device).float())
    if changed.all():
        root.codes.copy_(codes)
        root.scales.copy_(scales)
        return
    groups = changed.numel()
    keep = ~changed.unsqueeze(1)
    old_bytes, new_bytes = root.codes.view(torch.uint8), codes.view(torch.uint8)
    merged = torch.where(keep, old_bytes.reshape(groups, -1), new_bytes.reshape(groups, -1))
    root.codes.copy_(merged.reshape(codes.shape).view(codes.dtype))
    merged_scales = torch.where(keep, root.scales.reshape(groups, 1), scales.reshape(groups, 1))
    root.scales.copy_(merged_scales.reshape(scales.shape))


def _replay(chain: tuple[ViewOp, ...], plain: torch.Tensor) -> torch.Tensor:
    for func, args, kwargs in chain:
        plain = func(plain, *args, **kwargs)
    return plain


@functools.cache
def _write_arguments(func) -> tuple:
    """(position, name, keyword-only) of the arguments ``func`` writes into."""
    return tuple((i, spec.name, spec.kwarg_only) for i, spec in enumerate(func._schema.arguments)
                 if spec.alias_info is not None and spec.alias_info.is_write)


def _written_args(func, args, kwargs) -> list[QuantizedTensor]:
    """The quantized tensors ``func`` writes into (``self`` of an in-place op, ``out=``, foreach lists)."""
    written = []
    for i, name, kwarg_only in _write_arguments(func):
        value = args[i] if i < len(args) and not kwarg_only else kwargs.get(name)
        values = value if isinstance(value, (list, tuple)) else (value,)
        written += [t for t in values if isinstance(t, QuantizedTensor)]
    return written


def _map_tensors(fn, obj):
    """``fn`` applied to every tensor in op arguments (tensors, or lists/tuples/dicts of them)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(fn, x) for x in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(fn, v) for k, v in obj.items()}
    return obj


def _run_dequantized(func, args, kwargs):
    """Run ``func`` on the dequantized values; what it writes into a quantized tensor is stored in the codes."""
    written = _written_args(func, args, kwargs)
    plain_of: dict[int, torch.Tensor] = {}
    fulls: dict[int, tuple[QuantizedTensor, torch.Tensor]] = {}
    for qt in written:  # a write target is a view into its root's dequantized values
        root = qt if qt._root is None else qt._root
        if id(root) not in fulls:
            fulls[id(root)] = (root, root.dequantize())
        plain_of[id(qt)] = _replay(qt._chain, fulls[id(root)][1])

    def unwrap(t):
        if not isinstance(t, QuantizedTensor):
            return t
        return plain_of[id(t)] if id(t) in plain_of else t.dequantize()

    out = func(*_map_tensors(unwrap, args), **_map_tensors(unwrap, kwargs))
    for root, full in fulls.values():
        _store(root, full)
    if written:  # an in-place op returns its target: the quantized tensor, not the scratch values
        back = {id(plain_of[id(qt)]): qt for qt in written}
        out = _map_tensors(lambda t: back.get(id(t), t), out)
    return out


# ---------------------------------------------------------------- op handlers
# Ops whose result is not "the same op on the dequantized values" (or a view). Other modules may add entries
# (``_HANDLERS[op] = fn(func, args, kwargs)``) for ops their integration needs.
_HANDLERS: dict = {}


def _handles(*ops):
    def register(fn):
        for op in ops:
            _HANDLERS[op] = fn
        return fn
    return register


@_handles(aten.detach.default, aten.alias.default)
def _share(func, args, kwargs):
    return _alias(args[0])


@_handles(aten.clone.default)
def _clone(func, args, kwargs):
    """A new quantized tensor with copied codes when the values are whole dim-0 slices; else plain values."""
    src = args[0]
    if src._post:
        return func(src.dequantize(), **kwargs)
    codes, scales = src._read()
    return QuantizedTensor(codes.clone(), scales.clone(), src.fmt, src.shape, src.dtype)


def _quantized_like(func, args, kwargs, make):
    """A new QuantizedTensor of ``args[0]``'s format and shape on the requested device and logical dtype, its
    codes and scales ``make(tensor, device)`` of the source's; a non-float dtype or a recorded view gives what
    ``func`` gives on the dequantized values."""
    src = args[0]
    device = kwargs.get("device") or src.device
    dtype = kwargs.get("dtype") or src.dtype
    if not dtype.is_floating_point or src._post:
        return func(src.dequantize(), **kwargs)
    codes, scales = src._read()
    return QuantizedTensor(make(codes, device), make(scales, device), src.fmt, src.shape, dtype)


@_handles(aten._to_copy.default)
def _to_copy(func, args, kwargs):
    """``.to(device)`` copies codes and scales there; ``.to(dtype)`` changes the logical dtype."""
    return _quantized_like(func, args, kwargs, lambda t, device: t.to(device, copy=True))


@_handles(aten.empty_like.default)
def _empty_like(func, args, kwargs):
    """Uninitialized codes and scales (``model.to_empty(device=...)`` after a meta-device ``quantize_``)."""
    return _quantized_like(func, args, kwargs, lambda t, device: torch.empty_like(t, device=device))


@_handles(aten.copy_.default)
def _copy_(func, args, kwargs):
    """``load_state_dict`` copies into parameters: same-format codes and scales are copied as they are;
    other values are stored through :func:`_store` (round-to-nearest of the groups that change)."""
    dst, src = args[0], args[1]
    if not isinstance(dst, QuantizedTensor):
        return dst.copy_(src.dequantize())
    if (isinstance(src, QuantizedTensor) and src.fmt == dst.fmt and not src._post and not dst._post
            and dst._rows is None and src.shape == dst.shape):
        src_codes, src_scales = src._read()
        root = dst._root
        if root is None or not (dst.fmt.tensorwise and dst.codes.dim() == 2
                                and dst._stored_shape[-2] != root._stored_shape[-2]):
            dst.codes.copy_(src_codes)
            dst.scales.copy_(src_scales)
            return dst
        # Rows of a tensor-wise 2-D matrix (a shard, as DCP loads a checkpoint saved with another sharding):
        # the source's scale becomes the matrix's, so every chunk copied in lands exactly.
        if root.dim() == 2 and root.device.type != "meta":
            src_scales = src_scales.to(dst.device)
            if not torch.equal(dst.scales, src_scales):
                _express_in_scale(root, src_scales)
            dst.codes.copy_(src_codes)
            return dst
    return _run_dequantized(func, args, kwargs)


def _express_in_scale(root: QuantizedTensor, scale: torch.Tensor) -> None:
    """Re-round a tensor-wise matrix to the grid of ``scale`` (round-to-nearest, clamped to the grid)."""
    fmt = root.fmt
    values = root.dequantize(torch.float32)
    grid = fmt.round_nearest((values / scale).clamp(-fmt.rho, fmt.rho))
    root.codes.copy_(fmt.encode(grid))
    root.scales.copy_(scale)


@_handles(aten.index.Tensor)
def _index(func, args, kwargs):
    """``w[ids]`` along dim 0: a quantized tensor that reads rows ``ids`` of the codes when dequantized."""
    qt, indices = args[0], args[1]
    if not (len(indices) == 1 and isinstance(indices[0], torch.Tensor) and not qt._post and qt._rows is None
            and len(qt._stored_shape) in (2, 3)):
        return _run_dequantized(func, args, kwargs)
    rows = indices[0]
    if rows.dtype in (torch.bool, torch.uint8):
        rows = rows.nonzero().squeeze(1)
    if rows.dim() != 1:
        return _run_dequantized(func, args, kwargs)
    out = QuantizedTensor(qt.codes, qt.scales, qt.fmt, (rows.shape[0], *qt._stored_shape[1:]), qt.dtype)
    out._rows = rows.to(qt.codes.device)
    return out


@_handles(aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int)
def _split(func, args, kwargs):
    """``chunk``/``split``/``unbind`` as slices or selects, so each piece is a quantized view."""
    qt = args[0]
    if func is aten.unbind.int:
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        return [_view(qt, aten.select.int, (dim, i), {}) for i in range(qt.shape[dim])]
    dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
    total = qt.shape[dim]
    if func is aten.split.Tensor:
        size = args[1]
        sizes = [min(size, total - start) for start in range(0, total, size)] or [0]
    else:
        sizes = list(args[1])
    out, start = [], 0
    for size in sizes:
        out.append(_view(qt, aten.slice.Tensor, (dim, start, start + size), {}))
        start += size
    return out


# ---------------------------------------------------------------- quantize_
def default_filter(name: str, param: torch.Tensor, module: nn.Module) -> bool:
    """The paper's choice: weights of ``nn.Linear`` and 3-D (fused-expert) weights.

    Embeddings, norms, biases and the output head (``lm_head``, or a Linear
    whose weight is tied to an embedding) stay in high precision.
    """
    leaf = name.rsplit(".", 1)[-1]
    if isinstance(module, nn.Linear) and leaf == "weight":
        return "lm_head" not in name and not name.startswith("output.")
    return param.dim() == 3 and not isinstance(module, (nn.Embedding, nn.Conv1d, nn.Conv2d))


def _with_module_argument(filter_fn: Callable[..., bool]) -> Callable[[str, torch.Tensor, nn.Module], bool]:
    """``filter_fn`` as a ``(name, param, module)`` callable; a 2-argument ``(name, param)`` one ignores the module."""
    try:
        inspect.signature(filter_fn).bind("name", None, None)
    except (TypeError, ValueError):  # takes two arguments (or has no signature to read: assume the two)
        return lambda name, param, module: filter_fn(name, param)
    return filter_fn


@torch.no_grad()
def quantize_(
    model: nn.Module, fmt: QuantFormat,
    filter_fn: Callable[..., bool] | None = None,
) -> nn.Module:
    """Replace selected weights of ``model`` in place by :class:`QuantizedTensor` parameters.

    ``filter_fn(name, param, module) -> bool`` (the arguments of
    :func:`default_filter`, which it replaces; it may call it) selects the
    weights; a ``filter_fn(name, param)`` of two arguments works too. The
    full-precision originals are released. Tied weights (one tensor reached
    under several names) are left alone unless every name selects them.
    Every selected weight is checked before any is replaced, so a weight that
    cannot be quantized leaves the model as it was. A weight already quantized
    in ``fmt`` is left as it is; one quantized in another format is an error
    (quantizing quantized values again would round twice). On the meta device
    the codes and scales are meta tensors: ``model.to_empty(device=...)`` then
    ``load_state_dict`` fill them. Returns ``model``.
    """
    if not isinstance(fmt, QuantFormat):
        raise TypeError(f"fmt must be an eco format such as eco.FP8() or eco.INT4(), got {fmt!r}")
    selects = default_filter if filter_fn is None else _with_module_argument(filter_fn)
    owners: dict[int, list] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for leaf, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module, leaf, f"{module_name}.{leaf}".lstrip(".")))

    selected = []
    for places in owners.values():
        module, leaf, name = places[0]
        param = getattr(module, leaf)
        if not param.is_floating_point():
            continue
        chosen = [selects(n, param, m) for m, _, n in places]
        if not all(chosen):
            continue
        if isinstance(param, QuantizedTensor):
            if param.fmt != fmt:
                raise ValueError(
                    f"{name} is already quantized as {param.fmt}; quantize_ with {fmt} would round its "
                    "quantized values a second time. Quantize the original weights once (rebuild or reload "
                    "the model), or leave this weight out with filter_fn"
                )
            continue
        try:
            _check_quantizable(param, fmt)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{name}: {err} (nothing was quantized)") from None
        selected.append((places, param))

    for places, param in selected:
        qparam = nn.Parameter(QuantizedTensor.from_float(param, fmt), requires_grad=param.requires_grad)
        for mod, lf, _ in places:
            setattr(mod, lf, qparam)
        param._eco_replaced_by_quantize = True  # an optimizer still holding it refuses to step (eco/optim.py)
    from ._transformers_hook import attach_if_transformers_model

    attach_if_transformers_model(model)  # save_pretrained writes codes and scales (eco.hf)
    return model


def quantized_parameters(model: nn.Module):
    """``(name, param)`` for every quantized parameter of ``model``."""
    return [(n, p) for n, p in model.named_parameters() if isinstance(p, QuantizedTensor)]
