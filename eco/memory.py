"""Bytes-per-parameter accounting from the tensors that actually exist.

Nothing here is a formula of what should exist: every figure is the byte size
of a live tensor (``numel * element_size``), each storage counted once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .distributed import local_tensor
from .qparam import QuantizedTensor

# Row order of the printed table.
KINDS = (
    "weight codes", "weight scales", "unquantized params", "master weights",
    "momentum (m)", "momentum scales", "second moment (v)", "second moment scales",
    "second moment (factored)", "other optimizer state",
)
_STATE_KIND = {
    "exp_avg": "momentum (m)", "momentum_buffer": "momentum (m)",
    "exp_avg_scale": "momentum scales", "momentum_buffer_scale": "momentum scales",
    "exp_avg_sq": "second moment (v)", "exp_avg_sq_scale": "second moment scales",
    "exp_avg_sq_row": "second moment (factored)", "exp_avg_sq_col": "second moment (factored)",
    "exp_avg_sq_mean": "second moment (factored)",
    "master": "master weights",
}


@dataclass
class MemoryReport:
    """Static memory of a model and its optimizer, by kind; gradients are listed apart."""

    num_params: int
    bytes_by_kind: dict[str, int] = field(default_factory=dict)
    gradient_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_kind.values())

    @property
    def bytes_per_param(self) -> float:
        return self.total_bytes / max(self.num_params, 1)

    def per_param(self, kind: str) -> float:
        return self.bytes_by_kind.get(kind, 0) / max(self.num_params, 1)

    def as_dict(self) -> dict:
        return {
            "num_params": self.num_params, "total_bytes": self.total_bytes,
            "bytes_per_param": self.bytes_per_param, "bytes_by_kind": dict(self.bytes_by_kind),
            "gradient_bytes": self.gradient_bytes,
        }

    def __str__(self) -> str:
        lines = [f"{'kind':<24}{'MiB':>12}{'bytes/param':>14}"]
        for kind in KINDS:
            if kind in self.bytes_by_kind:
                b = self.bytes_by_kind[kind]
                lines.append(f"{kind:<24}{b / 2**20:>12.3f}{b / max(self.num_params, 1):>14.3f}")
        lines.append(f"{'total (static)':<24}{self.total_bytes / 2**20:>12.3f}{self.bytes_per_param:>14.3f}")
        lines.append(f"{'gradients (transient)':<24}{self.gradient_bytes / 2**20:>12.3f}"
                     f"{self.gradient_bytes / max(self.num_params, 1):>14.3f}")
        lines.append(f"parameters: {self.num_params:,}")
        return "\n".join(lines)


def storage_key(t: torch.Tensor) -> tuple:
    """Equal for tensors that share memory (views of one storage)."""
    return (t.device, t.untyped_storage().data_ptr())


def inner_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold ``t``'s bytes: ``t`` itself, or, for a wrapper subclass (a QuantizedTensor,
    torchao's low-bit optimizer states), the tensors it flattens to, which hold its bytes."""
    if not is_traceable_wrapper_subclass(t):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [inner for name in names for inner in inner_tensors(getattr(t, name))]


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MemoryReport:
    """Count the bytes of weights (codes, scales, unquantized params) and optimizer state.

    Of a sharded model (FSDP2: ``DTensor`` parameters and states), the bytes and parameters of this rank's shards.
    """
    seen: set = set()
    report = MemoryReport(num_params=0)

    def add(kind: str, t: torch.Tensor) -> None:
        for inner in inner_tensors(t):
            key = storage_key(inner)
            if key not in seen:
                seen.add(key)
                report.bytes_by_kind[kind] = report.bytes_by_kind.get(kind, 0) + inner.untyped_storage().nbytes()

    for param in dict.fromkeys(model.parameters()):
        p = local_tensor(param)
        report.num_params += p.numel()
        if isinstance(p, QuantizedTensor):
            add("weight codes", p.codes)
            add("weight scales", p.scales)
        else:
            add("unquantized params", p)
        if param.grad is not None:
            grad = local_tensor(param.grad)
            report.gradient_bytes += grad.numel() * grad.element_size()
    if optimizer is not None:
        for state in optimizer.state.values():
            for key, value in state.items():
                value = local_tensor(value)
                if isinstance(value, torch.Tensor) and (value.numel() > 1 or key in _STATE_KIND):
                    add(_STATE_KIND.get(key, "other optimizer state"), value)
    return report
