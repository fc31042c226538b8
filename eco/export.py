"""Export a quantized model to safetensors, and load the compact form back.

Two forms:

``form="dequantized"`` (default)
    Every weight as an ordinary tensor of ``dtype`` (bf16 by default): what
    the quantized model computes with, readable by anything. For a
    ``transformers`` model this goes through the model's own
    ``save_pretrained`` (config, shards, checkpoint naming), so a plain
    ``AutoModelForCausalLM.from_pretrained(path)`` loads it with no eco installed.

``form="compact"``
    Quantized weights as their ``codes`` and ``scales`` (``<name>.codes``,
    ``<name>.scales``) with the format, logical shape and dtype in the file's
    metadata; every other tensor as it is. About 0.5 byte per INT4 weight.
    :func:`load_compact` puts it back into a model of the same architecture,
    bit-identically. A model config is written next to it when the model has one.

``model.save_pretrained`` itself does not accept quantized weights
(safetensors needs real storage); use :func:`export`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from .formats import format_from_config
from .qparam import QuantizedTensor

COMPACT_FILE = "eco_compact.safetensors"
COMPACT_VERSION = "1"
FORMS = ("dequantized", "compact")


def export(model: nn.Module, path: str | os.PathLike, form: str = "dequantized", *,
           dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write ``model`` to the folder ``path`` in one of :data:`FORMS`; returns the folder.

    ``dtype`` applies to the dequantized form only: the floating-point dtype of
    every weight in the file (non-floating buffers are kept as they are).
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    if form == "dequantized":
        _export_dequantized(model, folder, dtype)
    else:
        _export_compact(model, folder)
    return folder


def dequantized_state_dict(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with quantized weights dequantized and floating tensors cast to ``dtype``."""
    out = {}
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, QuantizedTensor):
            out[name] = tensor.dequantize(dtype)
        elif isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            out[name] = tensor.detach().to(dtype)
        else:
            out[name] = tensor
    return out


def _export_dequantized(model: nn.Module, folder: Path, dtype: torch.dtype) -> None:
    state = dequantized_state_dict(model, dtype)
    config = getattr(model, "config", None)
    if hasattr(model, "save_pretrained") and config is not None:
        # The model's own writer: config, sharding, tied weights, original checkpoint naming.
        # It records the dtype of the live parameters; the file holds ``dtype``, so the config says so.
        saved_dtype = getattr(config, "dtype", None)
        try:
            model.save_pretrained(folder, state_dict=state)
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
        key = (tensor.device, tensor.untyped_storage().data_ptr())
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
        key = (inner.device, inner.untyped_storage().data_ptr(), inner.storage_offset(), tuple(inner.shape))
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
        config.save_pretrained(folder)


@torch.no_grad()
def load_compact(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Load a compact export into ``model`` (same architecture, quantized or not); returns ``model``.

    Weights that were quantized become :class:`QuantizedTensor` parameters holding
    exactly the saved codes and scales; a model quantized beforehand must use the
    same format for them. Everything else is loaded with ``load_state_dict``.
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
    formats = {name: format_from_config(info["format"]) for name, info in quantized.items()}
    for name, info in quantized.items():  # check everything before changing anything
        target = params.get(name)
        if target is None:
            raise KeyError(f"the export holds quantized weight {name!r}, which this model does not have: "
                           "build the model with the same architecture and config")
        if list(target.shape) != info["shape"]:
            raise ValueError(f"{name}: the export has shape {tuple(info['shape'])}, the model "
                             f"{tuple(target.shape)}: build the model from the exported config")
        if isinstance(target, QuantizedTensor) and target.fmt != formats[name]:
            raise ValueError(f"{name} is quantized as {target.fmt} in the model but {formats[name]} in the export; "
                             "load into an unquantized model or quantize with the same format")
    state: dict[str, torch.Tensor] = {}
    for name, info in quantized.items():
        target = params[name]
        codes = stored.pop(f"{name}.codes").to(target.device)
        scales = stored.pop(f"{name}.scales").to(target.device)
        loaded = QuantizedTensor(codes, scales, formats[name], info["shape"], getattr(torch, info["dtype"]))
        if not isinstance(target, QuantizedTensor):
            _replace_parameter(model, target, nn.Parameter(loaded, requires_grad=target.requires_grad))
        state[name] = loaded
    state.update(stored)
    for name, first in aliases.items():
        state[name] = state[first]
    model.load_state_dict(state, strict=strict)
    return model


def _replace_parameter(model: nn.Module, old: nn.Parameter, new: nn.Parameter) -> None:
    """Put ``new`` wherever ``old`` is registered (every module that shares it)."""
    for module in model.modules():
        for leaf, param in list(module.named_parameters(recurse=False)):
            if param is old:
                setattr(module, leaf, new)


__all__ = ["export", "load_compact", "dequantized_state_dict", "FORMS", "COMPACT_FILE"]
