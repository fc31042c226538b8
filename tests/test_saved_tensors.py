"""A matmul with a quantized weight saves the quantized weight, never a dequantized copy (issue 15).

The census (``torch.autograd.graph.saved_tensors_hooks``) counts the bytes of
ordinary floating tensors saved for backward that are shaped like a quantized
weight matrix or one expert of it (trailing dims ``(rows, cols)`` or
``(cols, rows)``) and are not the storage of a model parameter: a dequantized
weight, a dequantized expert, or a gathered stack of experts. Codes (1-byte
float8/uint8) and scales are what the quantized weight holds anyway and are
not counted. Every path a model takes to a quantized matmul is covered, eager
and under ``torch.compile``; the gradients equal those of the same model with
the dequantized weights as ordinary parameters, bit for bit, and compiling
adds no graph break to what the unquantized model has.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from functorch.compile import min_cut_rematerialization_partition, nop
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters
from torch.utils.checkpoint import checkpoint

import eco

transformers = pytest.importorskip("transformers")


def census(model: nn.Module, run) -> tuple[int, int]:
    """(bytes of dequantized weight copies saved for backward, quantized elements); runs backward."""
    matrices, elements = set(), 0
    for _, p in eco.quantized_parameters(model):
        rows, cols = p.shape[-2:]
        matrices |= {(rows, cols), (cols, rows)}
        elements += p.numel()
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()
                      if not isinstance(p, eco.QuantizedTensor)}
    copies = {}

    def pack(t):
        if (type(t) is torch.Tensor and t.is_floating_point() and t.element_size() >= 2 and t.dim() >= 2
                and tuple(t.shape[-2:]) in matrices and t.untyped_storage().data_ptr() not in param_storages):
            copies[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run(model)
    loss.backward()
    return sum(copies.values()), elements


# ---------------------------------------------------------------- the paths
class PerExpertLinears(nn.Module):
    """Experts as a list of ``nn.Linear`` (Switch Transformers, shared experts), softly routed."""

    def __init__(self, dim=32, hidden=48, experts=2):
        super().__init__()
        self.router = nn.Linear(dim, experts, bias=False)
        self.up = nn.ModuleList(nn.Linear(dim, hidden) for _ in range(experts))
        self.down = nn.ModuleList(nn.Linear(hidden, dim, bias=False) for _ in range(experts))

    def forward(self, x):
        gates = self.router(x).softmax(-1)
        out = torch.zeros_like(x)
        for e, (up, down) in enumerate(zip(self.up, self.down, strict=True)):
            out = out + gates[..., e:e + 1] * down(F.silu(up(x)))
        return out


class LoraStack(nn.Module):
    """Frozen quantized base weights (requires_grad=False) with trainable low-rank adapters."""

    def __init__(self, dim=48, rank=4, layers=2):
        super().__init__()
        self.base = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.a = nn.ParameterList(nn.Parameter(torch.randn(rank, dim) / dim) for _ in range(layers))
        self.b = nn.ParameterList(nn.Parameter(torch.randn(dim, rank) / rank) for _ in range(layers))

    def forward(self, x):
        for base, a, b in zip(self.base, self.a, self.b, strict=True):
            x = torch.tanh(base(x) + x @ a.t() @ b.t())
        return x


class CheckpointedStack(nn.Module):
    def __init__(self, layers: nn.Sequential):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        h = checkpoint(lambda t: self.layers[1](self.layers[0](t)), x, use_reentrant=False)
        return checkpoint(self.layers[2], h, use_reentrant=False)


def tiny_mixtral(implementation, experts):
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    config._experts_implementation = implementation
    return transformers.MixtralForCausalLM(config)


def tokens():
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def inputs(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(2))


def dense_loss(*shape):
    x = inputs(*shape).requires_grad_()  # a leaf: its gradient makes autograd save the weights
    return lambda m: m(x.to(next(m.parameters()).dtype)).float().square().sum()


def linear_case():
    return nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 48, bias=False)), None, dense_loss(2, 3, 48)


def per_expert_case():
    return PerExpertLinears(), None, dense_loss(5, 32)


def lora_case():
    model = LoraStack()
    for layer in model.base:
        layer.requires_grad_(False)
    return model, None, dense_loss(6, 48)


def mixtral_case(implementation, experts=4):
    def build():
        ids = tokens()
        return (tiny_mixtral(implementation, experts), lambda n, p: "experts" in n,
                lambda m: m(input_ids=ids).logits.float().square().mean())
    return build


CASES = {
    "linear": linear_case,
    "per-expert-linears": per_expert_case,
    "lora-frozen-base": lora_case,
    "mixtral-eager": mixtral_case("eager", experts=2),  # a graph per routed expert under torch.compile
    "mixtral-batched_mm": mixtral_case("batched_mm"),
    "mixtral-grouped_mm": mixtral_case("grouped_mm"),
}
FORMATS = {"fp8": eco.FP8(), "int4-g16": eco.INT4(group_size=16), "int4-tensor": eco.INT4()}


def build(case, fmt, dtype):
    """The quantized model, its twin with the dequantized weights as ordinary parameters, and the loss."""
    torch.manual_seed(0)
    model, filter_fn, run = CASES[case]()
    model = eco.quantize_(model.to(dtype), fmt, filter_fn=filter_fn)
    assert eco.quantized_parameters(model)
    twin = copy.deepcopy(model)
    for name, p in eco.quantized_parameters(twin):
        owner, _, leaf = name.rpartition(".")
        setattr(twin.get_submodule(owner), leaf, nn.Parameter(p.dequantize(), requires_grad=p.requires_grad))
    return model, twin, run


def gradients(model, run):
    for p in model.parameters():
        p.grad = None
    run(model).backward()
    return [p.grad for p in model.parameters()]


def assert_equal_gradients(model, grads, expected):
    for (name, _), a, b in zip(model.named_parameters(), grads, expected, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            assert type(a) is torch.Tensor and a.dtype == b.dtype and torch.equal(a, b), name


# ---------------------------------------------------------------- eager
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_eager_saves_no_dequantized_weight_and_gradients_are_unchanged(case, dtype, fmt, monkeypatch):
    model, twin, run = build(case, FORMATS[fmt], dtype)
    with monkeypatch.context() as views_dequantized:  # as before views stayed quantized: the census sees copies
        views_dequantized.setattr(eco.qparam, "_is_plain_view", lambda func: False, raising=False)
        views_dequantized.delitem(eco.qparam._HANDLERS, torch.ops.aten.index.Tensor)
        saved, _ = census(copy.deepcopy(model), run)
        assert saved > 0
    saved, elements = census(model, run)
    assert saved == 0, f"{saved / elements:.2f} bytes per quantized element saved as dequantized copies"
    assert_equal_gradients(model, gradients(model, run), gradients(twin, run))


def test_the_census_sees_a_dequantized_copy():
    """A model that dequantizes its weight itself (no quantized view reaches the matmul) is caught."""
    model = eco.quantize_(nn.Linear(48, 64), eco.FP8())
    saved, elements = census(model, lambda m: F.linear(inputs(3, 48).requires_grad_(), m.weight.dequantize()).sum())
    assert saved == elements * 4


@pytest.mark.parametrize("case", ["linear", "mixtral-grouped_mm"])
def test_activation_checkpointing(case):
    model, _, run = build(case, eco.INT4(group_size=16), torch.float32)
    reference = copy.deepcopy(model)
    if case == "linear":
        model = CheckpointedStack(model)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        reference.train()
    saved, _ = census(model, run)
    assert saved == 0
    assert_equal_gradients(model, gradients(model, run), gradients(reference, run))


# ---------------------------------------------------------------- torch.compile
@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# What decides the saved tensors is AOTAutograd's partition (inductor's min-cut partitioner), not the code
# inductor then generates: most cases run the partitioned graphs as they are, which spares the C++ builds.
PARTITIONED = aot_autograd(fw_compiler=nop, bw_compiler=nop, partition_fn=min_cut_rematerialization_partition)


def compiled_census(model, run, backend="inductor"):
    """census() of the compiled model, its gradients, and the graph breaks compiling it took."""
    torch._dynamo.reset()  # graph breaks are counted per compile; the twin's shares the model's code objects
    counters.clear()
    compiled = torch.compile(model, backend=backend)
    saved, elements = census(model, lambda m: run(compiled))
    return saved, elements, [p.grad for p in model.parameters()], sum(counters["graph_break"].values())


@pytest.mark.parametrize("case,dtype,backend", [
    ("linear", torch.float32, "inductor"), ("linear", torch.bfloat16, PARTITIONED),
    ("per-expert-linears", torch.float32, PARTITIONED), ("lora-frozen-base", torch.float32, PARTITIONED),
    ("mixtral-eager", torch.float32, PARTITIONED), ("mixtral-batched_mm", torch.float32, PARTITIONED),
    ("mixtral-grouped_mm", torch.float32, PARTITIONED), ("mixtral-grouped_mm", torch.bfloat16, "inductor"),
], ids=lambda v: v if isinstance(v, str) else str(v) if isinstance(v, torch.dtype) else "partitioned")
def test_compiled_saves_no_dequantized_weight_and_adds_no_graph_break(case, dtype, backend, fresh_dynamo):
    model, twin, run = build(case, eco.FP8(), dtype)
    _, _, expected, breaks_twin = compiled_census(twin, run, backend)
    saved, elements, grads, breaks = compiled_census(model, run, backend)
    assert saved == 0, f"{saved / elements:.2f} bytes per quantized element saved as dequantized copies"
    assert breaks == breaks_twin
    assert_equal_gradients(model, grads, expected)


def test_compiled_with_activation_checkpointing(fresh_dynamo):
    model, twin, run = build("linear", eco.FP8(), torch.float32)
    model, twin = CheckpointedStack(model), CheckpointedStack(twin)
    _, _, expected, _ = compiled_census(twin, run, PARTITIONED)
    saved, _, grads, breaks = compiled_census(model, run, PARTITIONED)
    assert saved == 0 and breaks == 0
    assert_equal_gradients(model, grads, expected)
