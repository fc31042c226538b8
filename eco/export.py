"""Export a quantized model to safetensors, load the compact form back, and save checkpoints atomically.

Two forms:

``form="dequantized"`` (default)
    Every weight as an ordinary tensor: what the quantized model computes with, readable by anything. Each
    weight keeps the dtype the model holds it in (a quantized weight its logical dtype) unless ``dtype`` is
    given, so an fp32 model is not rounded. For a ``transformers`` model this goes through the model's own
    ``save_pretrained`` (config, shards, original checkpoint naming), so a plain
    ``AutoModelForCausalLM.from_pretrained(path)`` loads it with no eco installed.

``form="compact"``
    Quantized weights as their ``codes`` and ``scales`` (``<name>.codes``,
    ``<name>.scales``) with the format, logical shape and dtype in the file's
    metadata; every other tensor as it is. About 0.5 byte per INT4 weight.
    :func:`load_compact` puts it back into a model of the same architecture,
    bit-identically. A model config is written next to it when the model has one.

A quantized ``transformers`` model's own ``save_pretrained`` writes its codes and scales too
(see :mod:`eco.hf`); ``from_pretrained`` rebuilds it with eco imported.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from .formats import format_from_config
from .memory import storage_key
from .qparam import QuantizedTensor

COMPACT_FILE = "eco_compact.safetensors"
COMPACT_VERSION = "1"
FORMS = ("dequantized", "compact")


def export(model: nn.Module, path: str | os.PathLike, form: str = "dequantized", *,
           dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` to the folder ``path`` in one of :data:`FORMS`; returns the folder.

    ``dtype`` applies to the dequantized form only: the floating-point dtype of
    every weight in the file, e.g. ``torch.bfloat16`` to halve an fp32 model (non-floating
    buffers are kept as they are). ``None`` keeps each weight's own dtype: nothing is rounded.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be None or a floating torch.dtype such as torch.bfloat16, got {dtype!r}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    if form == "dequantized":
        _export_dequantized(model, folder, dtype)
    else:
        _export_compact(model, folder)
    return folder


def dequantized_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with quantized weights dequantized and floating tensors cast to ``dtype``
    (``None``: each keeps its own dtype)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, QuantizedTensor):
            out[name] = tensor.dequantize(dtype)
        elif isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            out[name] = tensor.detach().to(dtype or tensor.dtype)
        else:
            out[name] = tensor
    return out


def _export_dequantized(model: nn.Module, folder: Path, dtype: torch.dtype | None) -> None:
    state = dequantized_state_dict(model, dtype)
    config = getattr(model, "config", None)
    if hasattr(model, "save_pretrained") and config is not None:
        # The model's own writer: config, sharding, tied weights, original checkpoint naming.
        # It records the dtype of the live parameters; the file holds ``dtype``, so the config says so.
        saved_dtype = getattr(config, "dtype", None)
        with _as_plain_model(model):
            try:
                model.save_pretrained(folder, state_dict=state)
                if dtype is not None:
                    config.dtype = dtype
                    config.save_pretrained(folder)
            finally:
                config.dtype = saved_dtype
        return
    from safetensors.torch import save_file

    save_file(_untie(state), str(folder / "model.safetensors"), metadata={"format": "pt"})


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory: give each name its own copy."""
    seen: set = set()
    out = {}
    for name, tensor in state.items():
        key = storage_key(tensor)
        out[name] = tensor.clone() if key in seen else tensor.contiguous()
        seen.add(key)
    return out


def _export_compact(model: nn.Module, folder: Path) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    quantized: dict[str, dict] = {}
    aliases: dict[str, str] = {}  # tied weights: a later name -> the first name holding the same tensor
    first_name: dict = {}
    for name, tensor in model.state_dict().items():
        inner = tensor.codes if isinstance(tensor, QuantizedTensor) else tensor
        key = (*storage_key(inner), inner.storage_offset(), tuple(inner.shape))  # the same view, not just memory
        if key in first_name:
            aliases[name] = first_name[key]
            continue
        first_name[key] = name
        if isinstance(tensor, QuantizedTensor):
            tensors[f"{name}.codes"] = tensor.codes.contiguous().cpu()
            tensors[f"{name}.scales"] = tensor.scales.contiguous().cpu()
            quantized[name] = {
                "format": tensor.fmt.config(), "shape": list(tensor.shape),
                "dtype": str(tensor.dtype).removeprefix("torch."),
            }
        else:
            tensors[name] = tensor.detach().contiguous().cpu()
    metadata = {
        "format": "pt", "eco_compact_version": COMPACT_VERSION,
        "eco_quantized": json.dumps(quantized), "eco_aliases": json.dumps(aliases),
    }
    save_file(tensors, str(folder / COMPACT_FILE), metadata=metadata)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        with _as_plain_model(model):  # the config describes the architecture; the file carries the formats
            config.save_pretrained(folder)


def _as_plain_model(model: nn.Module):
    """Hide eco's transformers quantizer (see :mod:`eco.hf`) while an export writes ``model``."""
    if getattr(model, "hf_quantizer", None) is None:
        return contextlib.nullcontext()
    from .hf import saved_as_plain_model

    return saved_as_plain_model(model)


@torch.no_grad()
def load_compact(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Load a compact export into ``model`` (same architecture, quantized or not); returns ``model``.

    Weights that were quantized become :class:`QuantizedTensor` parameters holding
    exactly the saved codes and scales; a model quantized beforehand must use the
    same format for them. Everything else is loaded with ``load_state_dict``.
    Everything is checked before the model is changed: names, shapes, formats, and that the codes and
    scales are a valid encoding (:func:`check_codes_and_scales`); a bad file raises and loads nothing.
    """
    from safetensors import safe_open

    file = Path(path)
    if file.is_dir():
        file = file / COMPACT_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found: point load_compact at a folder written by eco.export(form='compact')"
        )
    with safe_open(str(file), framework="pt") as reader:
        metadata = reader.metadata() or {}
        if "eco_compact_version" not in metadata:
            raise ValueError(f"{file} is not an eco compact export (no eco metadata); use eco.export(form='compact')")
        if metadata["eco_compact_version"] != COMPACT_VERSION:
            raise ValueError(f"{file} has compact version {metadata['eco_compact_version']}; this eco reads "
                             f"version {COMPACT_VERSION}")
        stored = {key: reader.get_tensor(key) for key in reader.keys()}
    quantized = json.loads(metadata["eco_quantized"])
    aliases = json.loads(metadata["eco_aliases"])

    params = dict(model.named_parameters(remove_duplicate=False))
    expected = model.state_dict()
    loaded: dict[str, QuantizedTensor] = {}
    for name, info in quantized.items():  # check everything before changing anything
        target = params.get(name)
        if target is None:
            raise KeyError(f"the export holds quantized weight {name!r}, which this model does not have: "
                           "build the model with the same architecture and config")
        if list(target.shape) != info["shape"]:
            raise ValueError(f"{name}: the export has shape {tuple(info['shape'])}, the model "
                             f"{tuple(target.shape)}: build the model from the exported config")
        fmt = format_from_config(info["format"])
        if isinstance(target, QuantizedTensor) and target.fmt != fmt:
            raise ValueError(f"{name} is quantized as {target.fmt} in the model but {fmt} in the export; "
                             "load into an unquantized model or quantize with the same format")
        codes, scales = stored.pop(f"{name}.codes", None), stored.pop(f"{name}.scales", None)
        if codes is None or scales is None:
            raise ValueError(f"{file} lists {name} as quantized but lacks its codes or scales: the file is damaged")
        check_codes_and_scales(name, fmt, target.shape, codes, scales)
        loaded[name] = QuantizedTensor(codes.to(target.device), scales.to(target.device), fmt, info["shape"],
                                       getattr(torch, info["dtype"]))
    for name, tensor in stored.items():
        if name not in expected:
            if strict:
                raise KeyError(f"the export holds {name!r}, which this model does not have: build the model "
                               "with the same architecture and config, or pass strict=False")
            continue
        if isinstance(expected[name], QuantizedTensor):
            raise ValueError(f"{name} is quantized in the model but not in the export: load into an "
                             "unquantized model, or quantize only the weights the export has quantized")
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{name}: the export has shape {tuple(tensor.shape)}, the model "
                             f"{tuple(expected[name].shape)}: build the model from the exported config")
    missing = expected.keys() - loaded.keys() - stored.keys() - aliases.keys()
    if strict and missing:
        raise KeyError(f"the export lacks {sorted(missing)[:5]}: it was written from another architecture "
                       "(or pass strict=False to keep this model's values for them)")

    for name, value in loaded.items():
        target = params[name]
        if not isinstance(target, QuantizedTensor):
            _replace_parameter(model, target, nn.Parameter(value, requires_grad=target.requires_grad))
    state: dict[str, torch.Tensor] = {**loaded, **stored}
    for name, first in aliases.items():
        state[name] = state[first]
    model.load_state_dict(state, strict=strict)
    return model


def check_codes_and_scales(name: str, fmt, shape, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """Raise a ValueError unless ``codes`` and ``scales`` are a valid ``fmt`` encoding of a weight of ``shape``.

    Checked: dtypes and shapes against the format, every code on the format's grid (no NaN FP8 code, no
    INT4 code -8), every scale finite and positive. Loaders call it before they change anything.
    """
    shape = tuple(shape)
    fmt.check_shape(shape)
    code_dtype = fmt.encode(torch.zeros(1, 2)).dtype
    if codes.dtype != code_dtype or tuple(codes.shape) != tuple(fmt.code_shape(shape)):
        raise ValueError(f"{name}: {fmt} codes of a {shape} weight are {code_dtype} of shape "
                         f"{tuple(fmt.code_shape(shape))}, got {codes.dtype} of shape {tuple(codes.shape)}: "
                         "the file was saved with another format or shape; quantize the model the same way")
    if scales.dtype != torch.float32 or tuple(scales.shape) != tuple(fmt.scale_shape(shape)):
        raise ValueError(f"{name}: {fmt} scales of a {shape} weight are float32 of shape "
                         f"{tuple(fmt.scale_shape(shape))}, got {scales.dtype} of shape {tuple(scales.shape)}: "
                         "the file was saved with another format or shape; quantize the model the same way")
    grid = fmt.decode(codes, shape)
    if not bool((grid.abs() <= fmt.rho).all()):  # NaN fails the comparison too
        bad = int((~(grid.abs() <= fmt.rho)).sum())
        raise ValueError(f"{name}: {bad} codes are NaN or outside {fmt}'s range [-{fmt.rho:g}, {fmt.rho:g}]: "
                         "the file is damaged; load an earlier checkpoint")
    if not bool((torch.isfinite(scales) & (scales > 0)).all()):
        raise ValueError(f"{name}: scales must be finite and positive, got {scales.min().item()} .. "
                         f"{scales.max().item()}: the file is damaged; load an earlier checkpoint")


def save_checkpoint(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` that never leaves ``path`` half-written.

    The object is written to a temporary file next to ``path``, flushed to disk, and renamed over ``path``
    (``os.replace``, atomic): a crash or an error while saving leaves the previous checkpoint intact.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    return path


def _replace_parameter(model: nn.Module, old: nn.Parameter, new: nn.Parameter) -> None:
    """Put ``new`` wherever ``old`` is registered (every module that shares it)."""
    for module in model.modules():
        for leaf, param in list(module.named_parameters(recurse=False)):
            if param is old:
                setattr(module, leaf, new)


__all__ = ["export", "load_compact", "save_checkpoint", "check_codes_and_scales", "dequantized_state_dict", "FORMS",
           "COMPACT_FILE"]
