"""eco.export: the dequantized form loads into plain transformers; the compact form reloads bit-identically."""

import json

import pytest
import torch
import torch.nn as nn

import eco
from eco.export import COMPACT_FILE

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")


def is_expert(name, param):
    return ".experts." in name


def tiny_mixtral(tie_word_embeddings=False):
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config)


def trained_quantized_mixtral(fmt, tie_word_embeddings=False, steps=3):
    """A quantized model whose codes, scales and plain weights have moved away from their initial values."""
    model = tiny_mixtral(tie_word_embeddings)
    eco.quantize_(model, fmt, filter_fn=is_expert)
    opt = eco.AdamW(model.parameters(), lr=2e-2, seed=0)
    batch = torch.randint(0, 64, (2, 12))
    for _ in range(steps):
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.mark.parametrize("fmt", [eco.INT4(), eco.INT4(group_size=16)], ids=str)
def test_dequantized_export_loads_in_plain_transformers(tmp_path, fmt):
    model = trained_quantized_mixtral(fmt)
    eco.export(model, tmp_path, form="dequantized", dtype=torch.bfloat16)
    assert (tmp_path / "config.json").is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    assert model.config.dtype != torch.bfloat16  # the model's own config is left as it was

    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(plain) is transformers.MixtralForCausalLM
    assert plain.dtype == torch.bfloat16
    assert not any(isinstance(p, eco.QuantizedTensor) for p in plain.parameters())
    # Expert weights are exactly the bf16 rounding of what the quantized model computes with.
    for name, qparam in eco.quantized_parameters(model):
        torch.testing.assert_close(plain.get_parameter(name), qparam.dequantize(torch.bfloat16), rtol=0, atol=0)
    for name, param in model.named_parameters():
        if not isinstance(param, eco.QuantizedTensor):
            torch.testing.assert_close(plain.get_parameter(name), param.detach().bfloat16(), rtol=0, atol=0)
    batch = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        expected = model(batch).logits
        got = plain.float()(batch).logits
    # Only bf16 rounding of the weights separates the two.
    assert (got - expected).abs().max() < 2e-2 * expected.abs().max()


def test_compact_export_reloads_bit_identically(tmp_path):
    model = trained_quantized_mixtral(eco.INT4())
    eco.export(model, tmp_path, form="compact")
    assert (tmp_path / COMPACT_FILE).is_file() and (tmp_path / "config.json").is_file()

    config = transformers.AutoConfig.from_pretrained(tmp_path)
    fresh = transformers.AutoModelForCausalLM.from_config(config)  # unquantized, random weights
    eco.load_compact(fresh, tmp_path)
    saved = dict(model.named_parameters())
    loaded = dict(fresh.named_parameters())
    assert saved.keys() == loaded.keys()
    for name, param in saved.items():
        if isinstance(param, eco.QuantizedTensor):
            assert isinstance(loaded[name], eco.QuantizedTensor) and loaded[name].fmt == param.fmt
            assert torch.equal(loaded[name].codes, param.codes) and torch.equal(loaded[name].scales, param.scales)
            assert loaded[name].requires_grad
        else:
            assert type(loaded[name]) is nn.Parameter and torch.equal(loaded[name], param)
    batch = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert torch.equal(fresh(batch).logits, model(batch).logits)


def test_compact_export_is_smaller_than_the_dequantized_form(tmp_path):
    model = trained_quantized_mixtral(eco.INT4(), steps=1)
    eco.export(model, tmp_path / "compact", form="compact")
    expert_bytes = sum(p.numel() for _, p in eco.quantized_parameters(model))
    with safetensors.safe_open(str(tmp_path / "compact" / COMPACT_FILE), framework="pt") as f:
        codes = [f.get_tensor(k) for k in f.keys() if k.endswith(".codes")]
    assert sum(c.numel() * c.element_size() for c in codes) == expert_bytes // 2  # two INT4 codes per byte


def test_compact_export_into_an_already_quantized_model_and_tied_weights(tmp_path):
    model = trained_quantized_mixtral(eco.INT4(group_size=16), tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    eco.export(model, tmp_path, form="compact")
    fresh = tiny_mixtral(tie_word_embeddings=True)
    eco.quantize_(fresh, eco.INT4(group_size=16), filter_fn=is_expert)
    eco.load_compact(fresh, tmp_path)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    batch = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert torch.equal(fresh(batch).logits, model(batch).logits)


def test_compact_load_refuses_a_different_format_or_shape(tmp_path):
    model = trained_quantized_mixtral(eco.INT4(), steps=1)
    eco.export(model, tmp_path, form="compact")
    other_format = tiny_mixtral()
    eco.quantize_(other_format, eco.INT4(group_size=16), filter_fn=is_expert)
    before = other_format.model.layers[0].mlp.experts.gate_up_proj.codes.clone()
    with pytest.raises(ValueError, match="same format"):
        eco.load_compact(other_format, tmp_path)
    assert torch.equal(other_format.model.layers[0].mlp.experts.gate_up_proj.codes, before)

    config = tiny_mixtral().config
    config.intermediate_size = 16
    with pytest.raises(ValueError, match="shape"):
        eco.load_compact(transformers.MixtralForCausalLM(config), tmp_path)
    with pytest.raises(FileNotFoundError, match="form='compact'"):
        eco.load_compact(tiny_mixtral(), tmp_path / "missing")


def test_export_of_a_plain_module_and_bad_arguments(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    eco.quantize_(model, eco.INT4())
    eco.export(model, tmp_path, form="dequantized", dtype=torch.float32)
    state = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    plain = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    plain.load_state_dict(state)
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x))
    with pytest.raises(ValueError, match="form must be one of"):
        eco.export(model, tmp_path, form="int4")
    with pytest.raises(ValueError, match="floating"):
        eco.export(model, tmp_path, dtype=torch.int8)


def test_dequantized_export_keeps_the_model_dtype_by_default(tmp_path):
    """An fp32 model exports fp32 weights: nothing is rounded (it used to be bf16, logits moved by up to 0.26)."""
    model = trained_quantized_mixtral(eco.INT4())
    assert model.dtype == torch.float32
    eco.export(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float32"
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(p.dtype == torch.float32 and not isinstance(p, eco.QuantizedTensor) for p in plain.parameters())
    batch = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert torch.equal(plain(batch).logits, model(batch).logits)


def test_dequantized_export_of_a_plain_module_keeps_each_dtype(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 4).to(torch.float64))
    eco.quantize_(model, eco.INT4(), filter_fn=lambda name, p: name == "0.weight")
    eco.export(model, tmp_path)
    state = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    assert state["0.weight"].dtype == torch.float32 and state["1.weight"].dtype == torch.float64
    assert torch.equal(state["0.weight"], model[0].weight.dequantize())


def corrupt(tensors, name, how):
    codes, scales = tensors[f"{name}.codes"], tensors[f"{name}.scales"]
    if how == "nan fp8 code":
        codes.view(torch.uint8).view(-1)[3] = 0x7F
    elif how == "int4 code -8":
        codes.view(-1)[3] = 0x08  # low nibble 0: code -8, outside [-7, 7]
    elif how in ("zero scale", "negative scale", "inf scale", "nan scale"):
        scales.view(-1)[0] = {"zero scale": 0.0, "negative scale": -1.0, "inf scale": float("inf"),
                              "nan scale": float("nan")}[how]
    elif how == "codes shape":
        tensors[f"{name}.codes"] = codes[..., :-1].contiguous()
    elif how == "scales shape":
        tensors[f"{name}.scales"] = torch.cat([scales, scales], dim=-1)


@pytest.mark.parametrize("fmt,how", [
    (eco.FP8(), "nan fp8 code"), (eco.INT4(), "int4 code -8"), (eco.INT4(group_size=16), "zero scale"),
    (eco.FP8(), "negative scale"), (eco.INT4(), "inf scale"), (eco.FP8(), "nan scale"),
    (eco.INT4(), "codes shape"), (eco.INT4(group_size=16), "scales shape"),
], ids=lambda v: str(v))
def test_compact_load_validates_codes_and_scales_before_changing_anything(tmp_path, fmt, how):
    model = trained_quantized_mixtral(fmt, steps=1)
    eco.export(model, tmp_path, form="compact")
    file = tmp_path / COMPACT_FILE
    with safetensors.safe_open(str(file), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    corrupt(tensors, "model.layers.1.mlp.experts.down_proj", how)
    safetensors.torch.save_file(tensors, str(file), metadata=metadata)

    fresh = tiny_mixtral()
    before = {name: param.detach().clone() for name, param in fresh.named_parameters()}
    with pytest.raises(ValueError, match="down_proj"):
        eco.load_compact(fresh, tmp_path)
    # Nothing was loaded: every earlier weight (quantized in the file) is still the model's own, unquantized.
    assert not eco.quantized_parameters(fresh)
    for name, param in fresh.named_parameters():
        assert torch.equal(param, before[name]), name


def test_compact_load_checks_plain_tensors_before_changing_anything(tmp_path):
    model = trained_quantized_mixtral(eco.INT4(), steps=1)
    eco.export(model, tmp_path, form="compact")
    config = tiny_mixtral().config
    config.vocab_size = 32  # embeddings and head of another shape; the experts match
    fresh = transformers.MixtralForCausalLM(config)
    with pytest.raises(ValueError, match="(embed_tokens|lm_head).weight: the export has shape"):
        eco.load_compact(fresh, tmp_path)
    assert not eco.quantized_parameters(fresh)


def test_save_checkpoint_replaces_the_file_whole_or_not_at_all(tmp_path):
    path = tmp_path / "ckpt.pt"
    eco.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    assert torch.load(path)["step"] == 1

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        eco.save_checkpoint({"step": 2, "w": torch.zeros(3), "bad": Unpicklable()}, path)
    assert torch.load(path)["step"] == 1  # the last good checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind
    eco.save_checkpoint({"step": 3}, path)
    assert torch.load(path)["step"] == 3
