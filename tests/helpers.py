"""Small shared builders for the tests."""

import importlib.util
from pathlib import Path

import torch
import torch.nn as nn

import eco
from eco.formats import format_from_tag

#: the formats most tests run, by short name (small groups: the tests' tensors are small)
FORMATS = {tag: format_from_tag(tag) for tag in ("fp8-row", "fp8-block32", "int4-tensor", "int4-group32")}


def mlp(sizes=(16, 64, 64, 4), seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def grid_values(qt: eco.QuantizedTensor) -> torch.Tensor:
    """The integer/fp8 grid values (codes as fp32, INT4 unpacked)."""
    return qt.fmt.decode(qt.codes, qt.shape)


def load_example(name: str):
    """Import ``examples/<name>.py`` (examples are scripts, not an installed package)."""
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"eco_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bits(t: torch.Tensor) -> torch.Tensor:
    """An integer view, so that equality is bitwise (NaN == NaN, -0.0 != +0.0)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_bits_equal(actual, expected, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    differ = (bits(actual) != bits(expected)).sum().item()
    assert differ == 0, f"{what}: {differ} of {actual.numel()} elements differ"


def assert_same_training_state(expected_model, expected_opt, actual_model, actual_opt):
    """Two trained copies of a model agree bit for bit: weights (codes and scales) and every optimizer state tensor."""
    for (name, a), (_, b) in zip(expected_model.named_parameters(), actual_model.named_parameters(), strict=True):
        if isinstance(a, eco.QuantizedTensor):
            assert_bits_equal(b.codes, a.codes, f"{name} codes")
            assert_bits_equal(b.scales, a.scales, f"{name} scales")
        else:
            assert_bits_equal(b.data, a.data, name)
        for key, value in expected_opt.state[a].items():
            if isinstance(value, torch.Tensor):
                assert_bits_equal(actual_opt.state[b][key], value, f"{name} {key}")


def traffic_table() -> dict:
    """``eco.kernels.traffic``'s docstring table: ``{(row label, "FP8"|"INT4"): (block/group, row/tensor,
    row/tensor first-pass re-read)}`` in bytes per parameter."""
    import re

    from eco.kernels import traffic

    row = re.compile(r"^((?:AdamW|SGD), [^\n]+?)\s{2,}(FP8|INT4)\s+([\d.]+)\s+([\d.]+) \(\+([\d.]+)\)$", re.M)
    return {(label, fmt): tuple(map(float, values)) for label, fmt, *values in row.findall(traffic.__doc__)}
