"""eco: training in FP8 and INT4 without full-precision master weights (ECO)."""

import torch as _torch

from . import _transformers_hook
from . import distributed as _distributed  # noqa: F401 - registers the FSDP2 ops of QuantizedTensor
from .export import export, load_compact, save_checkpoint
from .formats import FP8, INT4, QuantFormat
from .memory import MemoryReport, memory_report
from .optim import SGD, AdamW
from .qparam import QuantizedTensor, _rebuild_quantized, quantize_, quantized_parameters
from .release import GradientRelease, release_gradients

__version__ = "0.1.0"

# torch.load(weights_only=True), the default, accepts quantized weights.
_torch.serialization.add_safe_globals([_rebuild_quantized])
# save_pretrained / from_pretrained of quantized transformers models (eco.hf), registered lazily.
_transformers_hook.install()

__all__ = [
    "FP8", "INT4", "QuantFormat", "QuantizedTensor", "quantize_", "quantized_parameters",
    "AdamW", "SGD", "GradientRelease", "release_gradients", "memory_report", "MemoryReport", "export",
    "load_compact", "save_checkpoint",
]
