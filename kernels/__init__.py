"""Fused Triton kernels for the ECO step (installed as ``eco.kernels``).

Not built yet (issue 3): ``supports`` says no for every tensor, so the
optimizer runs the plain-torch reference path everywhere.
"""

from __future__ import annotations

import torch


def unavailable_reason() -> str:
    return "the fused Triton kernels are not built yet"


def supports(param: torch.Tensor) -> bool:
    """Whether the kernels can run this parameter's step."""
    return False
