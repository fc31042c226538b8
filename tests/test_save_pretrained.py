"""A quantized transformers model through plain save_pretrained / from_pretrained / load_state_dict (eco.hf):
codes and scales on disk, the quantized model back bit-exactly, bad files refused before anything changes."""

import json
import subprocess
import sys

import pytest
import torch

import eco

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors.torch")


def is_quantized_here(name, param):
    return ".experts." in name or name.endswith("self_attn.q_proj.weight")


def tiny_mixtral(seed=0):
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.MixtralForCausalLM(config)


def trained(fmt, seed=0):
    model = tiny_mixtral(seed)
    eco.quantize_(model, fmt, filter_fn=is_quantized_here)
    opt = eco.AdamW(model.parameters(), lr=2e-2, seed=0)
    batch = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def assert_same_model(expected, actual):
    assert [n for n, _ in expected.named_parameters()] == [n for n, _ in actual.named_parameters()]
    for (name, a), (_, b) in zip(expected.named_parameters(), actual.named_parameters(), strict=True):
        if isinstance(a, eco.QuantizedTensor):
            assert isinstance(b, eco.QuantizedTensor) and b.fmt == a.fmt and b.dtype == a.dtype, name
            assert torch.equal(b.codes.view(torch.uint8), a.codes.view(torch.uint8)), name
            assert torch.equal(b.scales, a.scales), name
        else:
            assert not isinstance(b, eco.QuantizedTensor) and torch.equal(b, a), name


FORMATS = [eco.INT4(), eco.INT4(group_size=16), eco.FP8(), eco.FP8(block_size=16)]


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_save_pretrained_then_from_pretrained_is_bit_exact(tmp_path, fmt):
    model = trained(fmt)
    model.save_pretrained(tmp_path)  # raised "data pointer on an invalid python storage" and left a partial folder
    config = json.loads((tmp_path / "config.json").read_text())
    quantized = [n for n, _ in eco.quantized_parameters(model)]
    assert config["quantization_config"] == {"quant_method": "eco", "weights": {n: fmt.config() for n in quantized}}
    files = safetensors.load_file(str(tmp_path / "model.safetensors"))
    for name in quantized:  # codes and scales only: no dequantized copy
        assert name not in files and torch.equal(files[name + "_codes"].view(torch.uint8),
                                                 model.get_parameter(name).codes.view(torch.uint8))

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert_same_model(model, loaded)
    batch = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, model(batch).logits)
    # It trains on (the Trainer's quantized-model check passes) and saves again to the same files.
    loaded.save_pretrained(tmp_path / "again")
    again = safetensors.load_file(str(tmp_path / "again" / "model.safetensors"))
    assert again.keys() == files.keys()
    assert all(torch.equal(again[k].view(torch.uint8), files[k].view(torch.uint8)) for k in files)
    transformers.trainer_utils.validate_quantization_for_training(loaded)


def test_a_trainer_style_load_state_dict_of_the_saved_file(tmp_path):
    """The stock Trainer resumes with ``model.load_state_dict(load_file(model.safetensors), strict=False)``."""
    model = trained(eco.INT4())
    model.save_pretrained(tmp_path)
    files = safetensors.load_file(str(tmp_path / "model.safetensors"))
    fresh = tiny_mixtral(seed=1)
    eco.quantize_(fresh, eco.INT4(), filter_fn=is_quantized_here)
    result = fresh.load_state_dict(files, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    assert_same_model(model, fresh)


@pytest.mark.parametrize("how", ["other format", "nan scale", "codes only"])
def test_a_bad_file_is_refused_before_anything_is_loaded(tmp_path, how):
    model = trained(eco.INT4())
    model.save_pretrained(tmp_path)
    files = safetensors.load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.1.mlp.experts.down_proj"
    if how == "nan scale":
        files[name + "_scales"].view(-1)[0] = float("nan")
    elif how == "codes only":
        del files[name + "_scales"]
    fresh = tiny_mixtral(seed=1)
    eco.quantize_(fresh, eco.INT4(group_size=16) if how == "other format" else eco.INT4(),
                  filter_fn=is_quantized_here)
    before = {k: v.clone() for k, v in safetensors.load_file(str(tmp_path / "model.safetensors")).items()
              if not k.endswith(("_codes", "_scales"))}
    with pytest.raises(ValueError, match="down_proj" if how != "other format" else "another format"):
        fresh.load_state_dict(files, strict=False)
    assert not any(torch.equal(fresh.get_parameter(k), v) for k, v in before.items() if "norm" not in k)

    if how == "nan scale":  # from_pretrained refuses it too (eco's message is in transformers' load report)
        safetensors.save_file(files, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(RuntimeError, match="CONVERSION"):
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_a_failing_save_writes_nothing(tmp_path):
    model = trained(eco.INT4())
    weight = model.model.layers[0].mlp.experts.down_proj
    weight.codes = torch.empty_like(weight.codes, device="meta")  # a weight that was never materialized
    with pytest.raises(ValueError, match="down_proj has no data"):
        model.save_pretrained(tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())


def test_dequantize_and_export_give_plain_checkpoints(tmp_path):
    model = trained(eco.FP8())
    model.save_pretrained(tmp_path / "eco")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "eco")
    # eco.export of a loaded model: the original checkpoint layout (per-expert weights), no quantization_config.
    eco.export(loaded, tmp_path / "export")
    assert "quantization_config" not in json.loads((tmp_path / "export" / "config.json").read_text())
    exported = safetensors.load_file(str(tmp_path / "export" / "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in exported
    assert loaded.hf_quantizer is not None and eco.quantized_parameters(loaded)  # unchanged by the export
    # model.dequantize(): a plain model, saved and loaded as any other.
    values = {n: p.dequantize() for n, p in eco.quantized_parameters(loaded)}
    loaded.dequantize()
    assert not eco.quantized_parameters(loaded) and getattr(loaded, "hf_quantizer", None) is None
    loaded.save_pretrained(tmp_path / "plain")
    assert "quantization_config" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    for name, value in values.items():
        assert torch.equal(plain.get_parameter(name), value), name


def test_from_pretrained_in_a_fresh_process_with_eco_imported_first(tmp_path):
    """``import eco`` registers its quantizer without importing transformers; from_pretrained finds it."""
    model = trained(eco.INT4())
    model.save_pretrained(tmp_path)
    codes = model.model.layers[0].mlp.experts.gate_up_proj.codes
    torch.save(codes, tmp_path / "codes.pt")
    script = (
        "import sys, torch, eco\n"
        "assert 'transformers.quantizers.auto' not in sys.modules\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
        "weight = model.model.layers[0].mlp.experts.gate_up_proj\n"
        f"assert isinstance(weight, eco.QuantizedTensor) and torch.equal(weight.codes, torch.load({str(tmp_path)!r} "
        "+ '/codes.pt'))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
