"""Test setup shared by every test module.

Triton reads TRITON_INTERPRET when a kernel is defined, so it is set here,
before anything imports ``eco.kernels``: without a GPU, kernels run under
Triton's CPU interpreter.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
