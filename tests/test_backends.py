"""The backend boundary (``eco.backends``): one contract, one selection point, one reader of ECO_BACKEND."""

import inspect
import warnings

import pytest
import torch

import eco
from eco import backends, compiled, kernels, reference


@pytest.mark.parametrize("module", [reference, compiled, kernels], ids=lambda m: m.__name__)
def test_every_backend_implements_the_contract(module):
    """Same functions, same parameter names, kinds and defaults as :class:`eco.backends.Backend`."""
    for name, member in inspect.getmembers(backends.Backend, inspect.isfunction):
        if name.startswith("_"):
            continue
        expected = list(inspect.signature(member).parameters.values())[1:]  # without self
        actual = list(inspect.signature(getattr(module, name)).parameters.values())
        assert [(p.name, p.kind, p.default) for p in actual] == [(p.name, p.kind, p.default) for p in expected], name


def test_eco_backend_is_validated_with_the_valid_choices(monkeypatch):
    monkeypatch.setenv("ECO_BACKEND", "cuda")
    with pytest.raises(ValueError, match="ECO_BACKEND='cuda'.*'reference'"):
        backends.select("auto", torch.zeros(2))
    with pytest.raises(ValueError, match="ECO_BACKEND='cuda'"):
        eco.AdamW([torch.nn.Parameter(torch.zeros(2))])
    monkeypatch.delenv("ECO_BACKEND")
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.select("gpu", torch.zeros(2))


def test_eco_backend_overrides_an_explicit_choice_and_says_so_once(monkeypatch):
    monkeypatch.setattr(backends, "_WARNED", set())
    monkeypatch.setenv("ECO_BACKEND", "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.select("auto", torch.zeros(2)) is reference  # overriding "auto" is silent
    with pytest.warns(RuntimeWarning, match="ECO_BACKEND=reference overrides backend='compiled'"):
        assert backends.select("compiled", torch.zeros(2)) is reference
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.select("compiled", torch.zeros(2)) is reference  # once


def test_codec_is_the_formats_torch_code_off_cuda():
    x = torch.randn(4, 64)
    fmt = eco.FP8(group_size=32)
    assert backends.select_codec(fmt, x.dtype, x) is reference
    codes, scales = backends.quantize(x, fmt)
    expected_codes, expected_scales = fmt.quantize(x)
    assert torch.equal(codes.view(torch.uint8), expected_codes.view(torch.uint8))
    assert torch.equal(scales, expected_scales)
    assert torch.equal(backends.dequantize(codes, scales, fmt, x.shape, torch.bfloat16),
                       fmt.dequantize(codes, scales, x.shape, torch.bfloat16))


def test_filter_fn_takes_the_arguments_of_default_filter_or_two():
    """``filter_fn(name, param, module)`` like ``default_filter``; a 2-argument filter keeps working."""
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 32))

    seen = []
    three = eco.quantize_(make(), eco.FP8(), filter_fn=lambda name, p, module: (
        seen.append(type(module)), name == "1.weight")[1])
    two = eco.quantize_(make(), eco.FP8(), filter_fn=lambda name, p: name == "1.weight")
    for model in (three, two):
        assert [n for n, _ in eco.quantized_parameters(model)] == ["1.weight"]
    assert set(seen) == {torch.nn.Linear}
