"""Quantized weights behave like weights to the model's own code."""

import copy
import io
import re

import pytest
import torch
import torch.nn as nn

import eco


class TinyBlockModel(nn.Module):
    """Embedding, a block with norm + linears + fused 3-D experts indexed per expert, and an output head."""

    def __init__(self, vocab=32, dim=16, experts=4, hidden=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * hidden, dim) / dim**0.5)
        self.down_proj = nn.Parameter(torch.randn(experts, dim, hidden) / hidden**0.5)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens, expert_ids):
        h = self.proj(self.norm(self.embed(tokens)))
        out = torch.zeros_like(h)
        for e in expert_ids.unique().tolist():  # transformers-style: index the fused tensor per expert
            mask = expert_ids == e
            gate, up = nn.functional.linear(h[mask], self.gate_up_proj[e]).chunk(2, dim=-1)
            out[mask] = nn.functional.linear(nn.functional.silu(gate) * up, self.down_proj[e])
        return self.lm_head(h + out)


def batch():
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 32, (2, 6), generator=gen), torch.tensor([[0, 1, 1, 3, 0, 1], [1, 0, 3, 3, 1, 0]])


def test_default_filter_quantizes_block_linears_and_experts_only():
    model = eco.quantize_(TinyBlockModel(), eco.INT4(group_size=16))
    quantized = {name for name, _ in eco.quantized_parameters(model)}
    assert quantized == {"proj.weight", "gate_up_proj", "down_proj"}
    assert type(model.embed.weight) is nn.Parameter and type(model.lm_head.weight) is nn.Parameter


def test_filter_fn_overrides_the_default():
    model = eco.quantize_(TinyBlockModel(), eco.FP8(), filter_fn=lambda name, p: name == "lm_head.weight")
    assert {name for name, _ in eco.quantized_parameters(model)} == {"lm_head.weight"}


def test_forward_matches_dequantized_model_and_grads_are_plain_tensors():
    model = eco.quantize_(TinyBlockModel(), eco.FP8())
    reference = copy.deepcopy(model)
    for name, p in eco.quantized_parameters(reference):
        module_name, _, leaf = name.rpartition(".")
        owner = reference.get_submodule(module_name) if module_name else reference
        setattr(owner, leaf, nn.Parameter(p.dequantize()))
    tokens, experts = batch()
    out = model(tokens, experts)
    torch.testing.assert_close(out, reference(tokens, experts))
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert type(p.grad) is torch.Tensor and p.grad.dtype == p.dtype and p.grad.shape == p.shape, name
    # Experts 0, 1, 3 were routed to; expert 2 was not.
    assert model.gate_up_proj.grad[[0, 1, 3]].abs().sum(dim=(1, 2)).gt(0).all()
    assert model.gate_up_proj.grad[2].abs().sum() == 0


def test_expert_indexing_gives_quantized_views_that_dequantize_only_the_selected_experts(monkeypatch):
    qt = eco.QuantizedTensor.from_float(torch.randn(4, 8, 16), eco.INT4())
    one, some, sliced = qt[2], qt[torch.tensor([0, 3])], qt[1:3]
    for view in (one, some, sliced):
        assert isinstance(view, eco.QuantizedTensor)
    # Select and slice are views of the codes themselves; no codes were copied.
    assert one.codes.untyped_storage().data_ptr() == qt.codes.untyped_storage().data_ptr()
    assert sliced.codes.untyped_storage().data_ptr() == qt.codes.untyped_storage().data_ptr()
    calls = []
    original = eco.qparam._dequantize

    def spy(fmt, codes, scales, shape, dtype):
        calls.append(tuple(shape))
        return original(fmt, codes, scales, shape, dtype)

    monkeypatch.setattr(eco.qparam, "_dequantize", spy)
    values = [one.dequantize(), some.dequantize(), sliced.dequantize()]
    assert calls == [(8, 16), (2, 8, 16), (2, 8, 16)]
    full = qt.dequantize()
    for value, expected in zip(values, (full[2], full[[0, 3]], full[1:3]), strict=True):
        assert type(value) is torch.Tensor and torch.equal(value, expected)


def test_state_dict_round_trip_through_torch_save():
    model = eco.quantize_(TinyBlockModel(), eco.INT4(group_size=16))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf)  # weights_only=True by default
    fresh = eco.quantize_(TinyBlockModel(), eco.INT4(group_size=16))
    fresh.load_state_dict(loaded)
    for (name, a), (_, b) in zip(eco.quantized_parameters(model), eco.quantized_parameters(fresh), strict=True):
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales), name


def test_load_float_state_dict_into_quantized_model_quantizes_it():
    float_model = TinyBlockModel()
    model = eco.quantize_(copy.deepcopy(float_model), eco.FP8())
    model.proj.weight.codes.zero_()
    model.load_state_dict(float_model.state_dict())
    expected = eco.QuantizedTensor.from_float(float_model.proj.weight.detach(), eco.FP8())
    assert torch.equal(model.proj.weight.codes.view(torch.uint8), expected.codes.view(torch.uint8))


def test_deepcopy_is_independent():
    model = eco.quantize_(TinyBlockModel(), eco.FP8())
    clone = copy.deepcopy(model)
    clone.proj.weight.codes.zero_()
    assert model.proj.weight.codes.float().abs().sum() > 0
    assert clone.proj.weight.requires_grad


def test_to_device_and_dtype_keep_codes():
    model = eco.quantize_(TinyBlockModel(), eco.FP8())
    codes = model.proj.weight.codes.clone()
    model.to("cpu")
    model.to(torch.bfloat16)
    w = model.proj.weight
    assert isinstance(w, eco.QuantizedTensor) and w.dtype == torch.bfloat16 and w.device.type == "cpu"
    assert torch.equal(w.codes.view(torch.uint8), codes.view(torch.uint8))
    assert w.dequantize().dtype == torch.bfloat16
    tokens, experts = batch()
    assert model(tokens, experts).dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to move to")
def test_to_cuda_moves_codes_and_scales():
    model = eco.quantize_(TinyBlockModel(), eco.FP8()).cuda()
    assert model.proj.weight.codes.is_cuda and model.proj.weight.scales.is_cuda


def test_tied_weights_stay_tied_or_unquantized():
    model = TinyBlockModel()
    model.lm_head.weight = model.embed.weight
    eco.quantize_(model, eco.FP8())
    assert model.lm_head.weight is model.embed.weight and type(model.embed.weight) is nn.Parameter


def test_an_eco_step_changes_the_forward():
    model = eco.quantize_(TinyBlockModel(), eco.FP8())
    opt = eco.AdamW(model.parameters(), lr=1e-2, rounding="nearest")
    tokens, experts = batch()
    before = model(tokens, experts).detach()
    model(tokens, experts).square().mean().backward()
    opt.step()
    assert not torch.equal(model(tokens, experts), before)


def test_in_place_ops_are_requantized_not_lost():
    w = eco.QuantizedTensor.from_float(torch.randn(4, 32), eco.FP8())
    before = w.dequantize()
    with torch.no_grad():
        w.mul_(0.5)
    torch.testing.assert_close(w.dequantize(), before * 0.5)
    lin = eco.quantize_(nn.Linear(32, 4), eco.INT4(group_size=16))
    nn.init.zeros_(lin.weight)
    assert not lin.weight.dequantize().any()
    with pytest.raises(ValueError, match="NaN or inf"), torch.no_grad():
        lin.weight.add_(float("nan"))
    assert not lin.weight.dequantize().any()


SHARE_MEMORY_SCRIPT = """
import torch, torch.nn as nn, torch.multiprocessing as mp, eco

def zero_codes(model):
    with torch.no_grad():
        model[0].weight.zero_()

for fmt in (eco.FP8(), eco.INT4(group_size=16)):
    model = eco.quantize_(nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 32)), fmt)
    model.share_memory()
    for name, p in eco.quantized_parameters(model):
        assert isinstance(p, eco.QuantizedTensor) and isinstance(p, nn.Parameter), name
        assert p.codes.is_shared() and p.scales.is_shared() and p.is_shared(), name
    child = mp.get_context("fork").Process(target=zero_codes, args=(model,))
    child.start()
    child.join()
    assert child.exitcode == 0
    assert not model[0].weight.dequantize().any(), "the child's write did not reach the shared codes"
print("ok")
"""


def test_share_memory_shares_codes_and_scales():
    """``model.share_memory()`` segfaulted on quantized weights (a crash must fail this test, not pytest)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", SHARE_MEMORY_SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-2000:])


def test_quantize_checks_every_weight_before_replacing_any():
    model = nn.Sequential(nn.Linear(32, 16), nn.Linear(24, 8))  # 24 columns: not a multiple of 16
    originals = list(model.parameters())
    with pytest.raises(ValueError) as error:
        eco.quantize_(model, eco.INT4(group_size=16))
    assert all(a is b for a, b in zip(model.parameters(), originals, strict=True))
    assert re.search(r"1\.weight.*group size 16.*nothing was quantized", str(error.value))
    model = nn.Sequential(nn.Linear(32, 16), nn.Linear(32, 8))
    with torch.no_grad():
        model[1].weight[0, 0] = float("inf")
    originals = list(model.parameters())
    with pytest.raises(ValueError) as error:
        eco.quantize_(model, eco.INT4(group_size=16))
    assert all(a is b for a, b in zip(model.parameters(), originals, strict=True))
    assert re.search(r"1\.weight.*NaN or inf.*nothing was quantized", str(error.value))


def test_quantize_on_the_meta_device_then_to_empty_and_load():
    float_model = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 32))
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 32))
    eco.quantize_(model, eco.FP8())
    assert all(p.codes.is_meta and p.scales.is_meta for _, p in eco.quantized_parameters(model))
    model.to_empty(device="cpu")
    assert len(eco.quantized_parameters(model)) == 2
    model.load_state_dict(float_model.state_dict())
    expected = eco.quantize_(float_model, eco.FP8())
    for (name, a), (_, b) in zip(eco.quantized_parameters(model), eco.quantized_parameters(expected), strict=True):
        assert not a.codes.is_meta and a.requires_grad, name
        assert torch.equal(a.codes.view(torch.uint8), b.codes.view(torch.uint8)) and torch.equal(a.scales, b.scales)


def test_quantize_again_same_format_is_a_no_op_other_format_is_an_error():
    model = eco.quantize_(TinyBlockModel(), eco.FP8())
    weight = model.proj.weight
    eco.quantize_(model, eco.FP8())
    assert model.proj.weight is weight
    with pytest.raises(ValueError, match=r"already quantized as FP8\(row\)"):
        eco.quantize_(model, eco.INT4(group_size=16))
    assert model.proj.weight is weight and model.proj.weight.fmt == eco.FP8()


@pytest.mark.parametrize("fmt", [eco.FP8(), eco.INT4(group_size=16)], ids=str)
def test_plain_pickle_round_trip(fmt):
    import pickle

    model = eco.quantize_(TinyBlockModel(), fmt)
    clone = pickle.loads(pickle.dumps(model))
    for (name, a), (_, b) in zip(eco.quantized_parameters(model), eco.quantized_parameters(clone), strict=True):
        assert b.codes.dtype == a.codes.dtype and b.fmt == a.fmt and b.requires_grad, name
        assert torch.equal(a.codes.view(torch.uint8), b.codes.view(torch.uint8)) and torch.equal(a.scales, b.scales)


def test_checkpoints_pickled_before_codes_travelled_as_uint8_still_load():
    qt = eco.QuantizedTensor.from_float(torch.randn(4, 32), eco.FP8())
    old = eco.qparam._rebuild_quantized(qt.codes, qt.scales, qt.fmt.config(), (4, 32), "float32", True)
    assert old.codes.dtype == torch.float8_e4m3fn and torch.equal(old.dequantize(), qt.dequantize())


def test_compile_cache_key_covers_layout_and_eco_code(monkeypatch):
    """AOTAutograd caches compiled graphs by this key: a graph traced through another eco version must miss."""
    w = eco.QuantizedTensor.from_float(torch.randn(4, 32), eco.FP8())
    key = w._stable_hash_for_caching()
    assert key == eco.QuantizedTensor.from_float(torch.randn(4, 32), eco.FP8())._stable_hash_for_caching()
    assert key != eco.QuantizedTensor.from_float(torch.randn(4, 32), eco.FP8(block_size=16))._stable_hash_for_caching()
    assert key != w.t()._stable_hash_for_caching()
    monkeypatch.setattr(eco.qparam, "_eco_source_digest", lambda: "another eco")
    assert key != w._stable_hash_for_caching()
