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


def _lighter_interpreter() -> None:
    """Drop two per-operation costs of Triton's interpreter that do not change what a kernel computes.

    It re-patches ``triton.language`` on every call of a ``@triton.jit``
    helper (a third of the kernel tests' time), although the kernel's own
    launch has patched it already; and it wraps every 32-bit integer add and
    multiply in an overflow check whose assertion tests the truth of a handle
    object, so it never fires. Patching once per launch and turning the check
    off leave every result as it was (the kernel tests compare bits).
    """
    try:
        import dataclasses
        import inspect

        import triton.language as tl
        from triton.runtime import interpreter

        real_patch, real_call = interpreter._patch_lang, interpreter.GridExecutor.__call__
        builder = interpreter.interpreter_builder
        builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)
    except (ImportError, AttributeError, TypeError):  # another Triton: run it as it is
        return
    patched = set()

    def patch_once(fn):
        langs = {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}
        if langs <= patched:
            return interpreter._LangPatchScope()
        patched.update(langs)
        return real_patch(fn)

    def launch(self, *args, **kwargs):
        patched.clear()
        try:
            return real_call(self, *args, **kwargs)
        finally:
            patched.clear()

    interpreter._patch_lang = patch_once
    interpreter.GridExecutor.__call__ = launch


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _lighter_interpreter()


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
