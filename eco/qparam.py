"""The quantized weight, and ``quantize_`` that puts it into a model.

``QuantizedTensor`` is a wrapper tensor subclass: to the model it looks like a
floating tensor of its logical shape and dtype, while it only holds ``codes``
and ``scales``. Any op the model runs on it sees the dequantized values
(``__torch_dispatch__``), so ``nn.Linear``, ``F.linear``, matmuls and
``transformers``-style fused experts (``w[expert]``) run unchanged. Indexing
along dim 0 (selecting experts) dequantizes only the selected slice, because
scales are local to dim-0 slices. Autograd sits above dispatch, so ``.grad``
arrives as an ordinary tensor of the logical dtype.

The optimizer updates ``codes`` and ``scales`` in place; the quantized weight
knows nothing about optimizers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map

from . import backends
from .formats import QuantFormat, format_from_config

aten = torch.ops.aten


class QuantizedTensor(torch.Tensor):
    """A weight stored as ``codes`` + ``scales`` in a :class:`~eco.formats.QuantFormat`."""

    codes: torch.Tensor
    scales: torch.Tensor
    fmt: QuantFormat

    @staticmethod
    def __new__(cls, codes, scales, fmt, shape, dtype, requires_grad=False):
        return torch.Tensor._make_wrapper_subclass(
            cls, torch.Size(shape), dtype=dtype, device=codes.device, requires_grad=requires_grad
        )

    def __init__(self, codes, scales, fmt, shape, dtype, requires_grad=False):
        self.codes = codes
        self.scales = scales
        self.fmt = fmt

    # ------------------------------------------------------------ construction
    @classmethod
    def from_float(cls, x: torch.Tensor, fmt: QuantFormat, rounding: str = "nearest", generator=None):
        """Quantize ``x``; the result's logical dtype is ``x.dtype``."""
        if not x.is_floating_point():
            raise TypeError(f"only floating tensors can be quantized, got {x.dtype}")
        if not torch.isfinite(x).all():
            raise ValueError("cannot quantize a tensor with NaN or inf values")
        codes, scales = backends.quantize(x.detach(), fmt, rounding, generator)
        return cls(codes, scales, fmt, x.shape, x.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The represented values as an ordinary tensor (logical dtype by default)."""
        return backends.dequantize(self.codes, self.scales, self.fmt, self.shape, dtype or self.dtype)

    def _with(self, codes, scales, shape=None, dtype=None) -> QuantizedTensor:
        return QuantizedTensor(codes, scales, self.fmt, self.shape if shape is None else shape, dtype or self.dtype)

    def __repr__(self):
        return f"QuantizedTensor({self.fmt}, shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    # ------------------------------------------------------------ subclass protocol
    def __tensor_flatten__(self):
        return ["codes", "scales"], (self.fmt, self.shape, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        fmt, shape, dtype = meta
        return QuantizedTensor(inner["codes"], inner["scales"], fmt, shape, dtype)

    def __reduce_ex__(self, protocol):
        return (_rebuild_quantized, (self.codes, self.scales, self.fmt.config(), tuple(self.shape),
                                     str(self.dtype).removeprefix("torch."), self.requires_grad))

    def __deepcopy__(self, memo):
        out = self._with(self.codes.clone(), self.scales.clone())
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
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(func, args, kwargs)
        # Everything else: run the op on the dequantized values. An in-place op
        # (``w.mul_(2)``, ``nn.init.zeros_(w)``) is re-quantized into the codes, not lost.
        def unwrap(t):
            return t.dequantize() if isinstance(t, QuantizedTensor) else t
        plain_args, plain_kwargs = tree_map(unwrap, args), tree_map(unwrap, kwargs)
        out = func(*plain_args, **plain_kwargs)
        for spec, arg, plain in zip(func._schema.arguments, args, plain_args, strict=False):
            if isinstance(arg, QuantizedTensor) and spec.alias_info is not None and spec.alias_info.is_write:
                _store_(arg, plain)
                if out is plain:
                    out = arg
        return out


def _rebuild_quantized(codes, scales, fmt_config, shape, dtype_name, requires_grad):
    out = QuantizedTensor(codes, scales, format_from_config(fmt_config), shape, getattr(torch, dtype_name))
    if requires_grad:
        out.requires_grad_(True)
    return out


# ---------------------------------------------------------------- op handlers
_HANDLERS: dict = {}


def _handles(*ops):
    def register(fn):
        for op in ops:
            _HANDLERS[op] = fn
        return fn
    return register


@_handles(aten.detach.default, aten.alias.default)
def _share(func, args, kwargs):
    return args[0]._with(args[0].codes, args[0].scales)


@_handles(aten.clone.default)
def _clone(func, args, kwargs):
    return args[0]._with(args[0].codes.clone(), args[0].scales.clone())


@_handles(aten._to_copy.default)
def _to_copy(func, args, kwargs):
    """``.to(device)`` moves codes and scales; ``.to(dtype)`` changes the logical dtype."""
    src = args[0]
    device = kwargs.get("device") or src.device
    dtype = kwargs.get("dtype") or src.dtype
    if not dtype.is_floating_point:
        return func(src.dequantize(), **kwargs)
    return src._with(src.codes.to(device), src.scales.to(device), dtype=dtype)


def _store_(dst: QuantizedTensor, values: torch.Tensor) -> None:
    """Quantize ``values`` (round to nearest) into ``dst``'s codes and scales."""
    if not torch.isfinite(values).all():
        raise ValueError("cannot store NaN or inf into a quantized weight; its codes were left unchanged")
    codes, scales = backends.quantize(values.to(dst.device).float(), dst.fmt)
    dst.codes.copy_(codes)
    dst.scales.copy_(scales)


@_handles(aten.copy_.default)
def _copy_(func, args, kwargs):
    """``load_state_dict`` copies into parameters: take codes and scales, or quantize a float source."""
    dst, src = args[0], args[1]
    if isinstance(dst, QuantizedTensor):
        if isinstance(src, QuantizedTensor) and src.fmt == dst.fmt:
            dst.codes.copy_(src.codes)
            dst.scales.copy_(src.scales)
        else:
            _store_(dst, src.dequantize() if isinstance(src, QuantizedTensor) else src)
        return dst
    return dst.copy_(src.dequantize())


def _index_dim0(qt: QuantizedTensor, index) -> QuantizedTensor:
    """A quantized view of ``qt[index]`` along dim 0; valid because scales are per dim-0 slice."""
    return qt._with(qt.codes[index], qt.scales[index], shape=qt.codes[index].shape[:-1] + qt.shape[-1:])


@_handles(aten.select.int)
def _select(func, args, kwargs):
    qt, dim, index = args[0], args[1], args[2]
    if dim in (0, -qt.dim()) and qt.dim() == 3:
        return _index_dim0(qt, index).dequantize()
    return func(qt.dequantize(), dim, index)


@_handles(aten.index.Tensor)
def _index(func, args, kwargs):
    qt, indices = args[0], args[1]
    if qt.dim() == 3 and len(indices) == 1 and indices[0] is not None:
        return _index_dim0(qt, indices[0]).dequantize()
    return func(qt.dequantize(), indices)


@_handles(aten.slice.Tensor)
def _slice(func, args, kwargs):
    qt = args[0]
    dim = args[1] if len(args) > 1 else 0
    if qt.dim() == 3 and dim in (0, -3):
        start = args[2] if len(args) > 2 else None
        end = args[3] if len(args) > 3 else None
        step = args[4] if len(args) > 4 else 1
        return _index_dim0(qt, slice(start, end, step)).dequantize()
    return func(qt.dequantize(), *args[1:], **kwargs)


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
    Returns ``model``.
    """
    if not isinstance(fmt, QuantFormat):
        raise TypeError(f"fmt must be an eco format such as eco.FP8() or eco.INT4(), got {fmt!r}")
    selects = default_filter if filter_fn is None else _with_module_argument(filter_fn)
    owners: dict[int, list] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for leaf, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module, leaf, f"{module_name}.{leaf}".lstrip(".")))

    for places in owners.values():
        module, leaf, name = places[0]
        param = getattr(module, leaf)
        if isinstance(param, QuantizedTensor) or not param.is_floating_point():
            continue
        chosen = [selects(n, param, m) for m, _, n in places]
        if not all(chosen):
            continue
        fmt.check_shape(param.shape)
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
