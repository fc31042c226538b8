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
def _one_thread():
    """Tests run many small ops; extra OpenMP threads only spin (10x slower on busy shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
