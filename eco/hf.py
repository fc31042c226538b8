"""Quantized ``transformers`` models through plain ``save_pretrained``, ``from_pretrained`` and the ``Trainer``.

safetensors stores plain tensors only, so ``transformers`` serializes weights of another kind through a
quantizer registered for a ``quant_method`` (``transformers.quantizers.register_quantizer``), the way torchao's
tensor-subclass weights are saved: the quantizer flattens them into plain tensors on save and a load operation
rebuilds them. eco registers one for ``quant_method: "eco"`` (on ``import eco`` when transformers is
imported, see :mod:`eco._transformers_hook`), and :func:`eco.quantize_` attaches it to a ``PreTrainedModel``.

On disk, a quantized weight ``<name>`` is two tensors, ``<name>_codes`` and ``<name>_scales`` (an underscore,
not a dot: transformers' key patterns treat a dot as the end of a name), and config.json says::

    "quantization_config": {"quant_method": "eco", "weights": {"<name>": {"name": "int4", "group_size": null}}}

``from_pretrained`` of such a folder (with eco imported) rebuilds the quantized model bit-exactly. For a plain
bf16 checkpoint that any ``transformers`` loads, use :func:`eco.export` (or ``model.dequantize()``).

The files use the model's own parameter names (fused experts such as ``mlp.experts.gate_up_proj``), not the
original checkpoint layout that ``save_pretrained`` converts plain models back to: codes and scales belong to
the fused tensor. It is also what the ``Trainer`` needs to resume: it reads ``model.safetensors`` back with
``model.load_state_dict``, which knows only the model's own names; a load_state_dict pre-hook folds
``<name>_codes`` / ``<name>_scales`` back into the quantized weight.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .export import check_codes_and_scales
from .formats import format_from_config
from .qparam import QuantizedTensor

QUANT_METHOD = "eco"
CODES_SUFFIX = "_codes"
SCALES_SUFFIX = "_scales"
_NO_CONVERSIONS = object()  # the model had no ``_weight_conversions`` attribute before eco attached


class EcoConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of an eco model: the format of every quantized weight, by name."""

    def __init__(self, weights: dict[str, dict] | None = None, **kwargs):
        self.quant_method = QUANT_METHOD
        self.weights = dict(weights or {})


class EcoHfQuantizer(HfQuantizer):
    """Saves quantized weights as codes + scales and rebuilds them on ``from_pretrained``."""

    quantization_config: EcoConfig

    def __init__(self, quantization_config: EcoConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.conversions_before = _NO_CONVERSIONS

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # eco trains the quantized weights themselves

    @property
    def is_qat_trainable(self) -> bool:
        return True

    # ------------------------------------------------------------------ save
    def get_state_dict_and_metadata(self, model):
        """``model.state_dict()`` with each quantized weight as ``<name>_codes`` and ``<name>_scales``.

        Runs before save_pretrained writes any file, so whatever it refuses leaves no partial folder.
        It also records the current format of every quantized weight in the config saved next to them.
        """
        state: dict[str, torch.Tensor] = {}
        weights: dict[str, dict] = {}
        written: set[int] = set()
        for name, tensor in model.state_dict().items():
            if not isinstance(tensor, QuantizedTensor):
                state[name] = tensor
                continue
            if id(tensor.codes) in written:  # a tied weight: transformers ties it again on load
                continue
            if tensor.codes.is_meta:
                raise ValueError(f"{name} has no data (meta device): load or initialize the model before saving it")
            written.add(id(tensor.codes))
            state[name + CODES_SUFFIX] = tensor.codes
            state[name + SCALES_SUFFIX] = tensor.scales
            weights[name] = tensor.fmt.config()
        self.quantization_config.weights = weights
        model.config.quantization_config = self.quantization_config
        return state, {}

    # ------------------------------------------------------------------ load
    def validate_environment(self, *args, **kwargs):
        if not self.pre_quantized:
            raise ValueError("from_pretrained does not quantize with eco: load the model, then call "
                             "eco.quantize_(model, fmt); save_pretrained then writes an eco checkpoint")

    @property
    def serialized_names(self) -> dict[str, list[str]]:
        """``{leaf: [leaf_codes, leaf_scales]}`` for the leaf name of every quantized weight in the checkpoint."""
        if not self.pre_quantized:
            return {}
        leaves = sorted({name.rpartition(".")[2] for name in self.quantization_config.weights})
        return {leaf: [leaf + CODES_SUFFIX, leaf + SCALES_SUFFIX] for leaf in leaves}

    def get_load_operations(self) -> dict:
        return {"deserialize": _deserialize_op()}

    def format_of(self, model, name: str):
        """The saved format of ``name`` (as the loaded model names it), or None if it was not quantized."""
        weights = self.quantization_config.weights
        prefix = getattr(model, "base_model_prefix", "") or ""
        for candidate in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")):
            if candidate in weights:
                return format_from_config(weights[candidate])
        return None

    def _process_model_after_weight_loading(self, model, **kwargs):
        """Refuse a model whose quantized weights were not all in the checkpoint (transformers would
        leave them randomly initialized), then set the model up as :func:`eco.quantize_` does."""
        missing = [name for name, param in model.named_parameters()
                   if self.format_of(model, name) is not None and not isinstance(param, QuantizedTensor)]
        if missing:
            raise ValueError(f"the checkpoint's config lists quantized weights whose codes and scales are not in "
                             f"its files: {missing[:5]}; the folder is incomplete, save it again")
        attach(model, self)
        model.is_quantized = False  # eco weights change dtype with .to()/.float() like plain ones
        return model

    def _dequantize(self, model, dtype=None):
        """``model.dequantize()``: every quantized weight becomes a plain parameter of its values."""
        if isinstance(dtype, str):  # transformers passes config.dtype, which may be a name
            dtype = getattr(torch, dtype)
        plain: dict[int, nn.Parameter] = {}
        for module in model.modules():
            for leaf, param in list(module.named_parameters(recurse=False)):
                if isinstance(param, QuantizedTensor):
                    if id(param) not in plain:
                        values = param.dequantize(dtype if dtype is not None else param.dtype)
                        plain[id(param)] = nn.Parameter(values, requires_grad=param.requires_grad)
                    setattr(module, leaf, plain[id(param)])
        return model

    def remove_quantization_config(self, model):
        super().remove_quantization_config(model)
        if self.conversions_before is not _NO_CONVERSIONS:
            model._weight_conversions = self.conversions_before


def register() -> None:
    """Make transformers know ``quant_method: "eco"`` (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(EcoConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(EcoHfQuantizer)


def attach(model, quantizer: EcoHfQuantizer | None = None) -> None:
    """Give a quantized ``PreTrainedModel`` what save_pretrained and the Trainer's resume need (idempotent).

    - ``model.hf_quantizer``: save_pretrained asks it for the state dict to write (codes and scales);
    - ``model._weight_conversions = []``: save_pretrained writes the model's own names (see module docstring);
      the conversions it had are kept on the quantizer and restored by ``model.dequantize()``;
    - a load_state_dict pre-hook that reads ``<name>_codes`` / ``<name>_scales``.
    """
    register()
    current = getattr(model, "hf_quantizer", None)
    if current is not None and not isinstance(current, EcoHfQuantizer):
        raise ValueError(f"the model is already quantized by transformers ({type(current).__name__}); "
                         "eco quantizes a model loaded in full precision")
    if quantizer is None:
        quantizer = current or EcoHfQuantizer(EcoConfig(), pre_quantized=True)
    if quantizer.conversions_before is _NO_CONVERSIONS:
        # What from_pretrained used to read the model, less eco's own load operation.
        conversions = [c for c in getattr(model, "_weight_conversions", None) or []
                       if not any(isinstance(op, _deserialize_op()) for op in getattr(c, "operations", ()))]
        if conversions:
            quantizer.conversions_before = conversions
    model.hf_quantizer = quantizer
    model.config.quantization_config = quantizer.quantization_config
    model._weight_conversions = []
    if not getattr(model, "_eco_load_hook", False):
        model.register_load_state_dict_pre_hook(_fold_codes_and_scales)
        model._eco_load_hook = True


@contextlib.contextmanager
def saved_as_plain_model(model) -> Iterator[None]:
    """Within the block, save_pretrained writes ``model`` as transformers would without eco (original
    checkpoint layout, no quantization_config): for :func:`eco.export`, which passes the weights itself."""
    quantizer = getattr(model, "hf_quantizer", None)
    if not isinstance(quantizer, EcoHfQuantizer):
        yield
        return
    config = model.config
    conversions = model.__dict__.get("_weight_conversions")
    del model.hf_quantizer
    vars(config).pop("quantization_config", None)
    if quantizer.conversions_before is _NO_CONVERSIONS:
        model.__dict__.pop("_weight_conversions", None)
    else:
        model._weight_conversions = quantizer.conversions_before
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        config.quantization_config = quantizer.quantization_config
        model._weight_conversions = conversions


def _fold_codes_and_scales(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                           error_msgs) -> None:
    """load_state_dict pre-hook: ``<name>_codes`` + ``<name>_scales`` -> a QuantizedTensor at ``<name>``.

    Everything is checked before the state dict is changed; a bad entry raises (nothing is loaded).
    """
    folded = {}
    for name, param in module.named_parameters():
        if not isinstance(param, QuantizedTensor):
            continue
        key = prefix + name
        codes, scales = state_dict.get(key + CODES_SUFFIX), state_dict.get(key + SCALES_SUFFIX)
        if codes is None and scales is None:
            continue
        if codes is None or scales is None:
            raise ValueError(f"the state dict has only one of {key}{CODES_SUFFIX} and {key}{SCALES_SUFFIX}: it "
                             "is incomplete, or one shard of a sharded checkpoint (save_pretrained shards above "
                             "max_shard_size, 50GB by default) whose shards split them; from_pretrained reads "
                             "every shard at once and loads it")
        check_codes_and_scales(key, param.fmt, param.shape, codes, scales)
        folded[key] = QuantizedTensor(codes, scales, param.fmt, param.shape, param.dtype)
    for key, value in folded.items():
        del state_dict[key + CODES_SUFFIX], state_dict[key + SCALES_SUFFIX]
        state_dict[key] = value


_DESERIALIZE_OP = None


def _deserialize_op():
    """The load operation class; built on first use because transformers' loading module imports late."""
    global _DESERIALIZE_OP
    if _DESERIALIZE_OP is None:
        from transformers.core_model_loading import ConversionOps

        class EcoDeserialize(ConversionOps):
            """``<name>_codes`` + ``<name>_scales`` from the checkpoint -> the QuantizedTensor ``<name>``."""

            def __init__(self, hf_quantizer: EcoHfQuantizer):
                self.hf_quantizer = hf_quantizer

            def convert(self, input_dict, source_patterns=None, target_patterns=None, *, model=None,
                        full_layer_name=None, **kwargs):
                parts = {}
                for pattern, tensors in input_dict.items():
                    tensor = tensors[0] if isinstance(tensors, list) else tensors
                    parts[SCALES_SUFFIX if pattern.endswith(SCALES_SUFFIX) else CODES_SUFFIX] = tensor
                if len(parts) != 2:
                    raise ValueError(f"{full_layer_name}: the checkpoint has {sorted(input_dict)}, it needs both "
                                     f"{CODES_SUFFIX} and {SCALES_SUFFIX}")
                fmt = self.hf_quantizer.format_of(model, full_layer_name)
                if fmt is None:
                    raise ValueError(f"{full_layer_name} has codes and scales in the checkpoint but no format in "
                                     "its config.json quantization_config")
                empty = model.get_parameter(full_layer_name)  # the meta-device parameter: shape and dtype
                codes, scales = parts[CODES_SUFFIX], parts[SCALES_SUFFIX]
                check_codes_and_scales(full_layer_name, fmt, empty.shape, codes, scales)
                return {full_layer_name: QuantizedTensor(codes, scales, fmt, empty.shape, empty.dtype)}

        _DESERIALIZE_OP = EcoDeserialize
    return _DESERIALIZE_OP


__all__ = ["EcoConfig", "EcoHfQuantizer", "attach", "register", "saved_as_plain_model", "QUANT_METHOD"]
