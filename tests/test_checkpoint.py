"""Save a quantized MoE model and its eco optimizer mid-run, load both into fresh objects, resume:
the result is bit-identical to a run that was never interrupted (nearest rounding; stochastic
rounding too, because the optimizer's generator state travels in its state_dict)."""

import pytest
import torch

import eco

transformers = pytest.importorskip("transformers")


def is_expert(name, param):
    return ".experts." in name


def fresh_model_and_optimizer(rounding, seed, fmt=None):
    """What a new process builds before loading a checkpoint (same config, same quantization)."""
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )
    torch.manual_seed(seed)  # a different seed: nothing may depend on it after loading
    model = transformers.MixtralForCausalLM(config)
    eco.quantize_(model, fmt or eco.INT4(), filter_fn=is_expert)
    opt = eco.AdamW(model.parameters(), lr=2e-2, weight_decay=0.1, rounding=rounding, seed=seed)
    return model, opt



def batch(step):
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(step))


def run(model, opt, steps):
    for step in steps:
        b = batch(step)
        model(input_ids=b, labels=b).loss.backward()
        opt.step()
        opt.zero_grad()


def snapshot(model, opt):
    """Every number that defines the training state: codes, scales, plain weights, moments."""
    out = {}
    for name, p in model.named_parameters():
        if isinstance(p, eco.QuantizedTensor):
            out[name + ".codes"], out[name + ".scales"] = p.codes.clone(), p.scales.clone()
        else:
            out[name] = p.detach().clone()
    for i, p in enumerate(opt.param_groups[0]["params"]):
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                out[f"state{i}.{key}"] = value.clone()
    return out


def assert_identical(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"differ after resume: {different[:5]}"


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_resume_from_saved_model_and_optimizer_is_bit_identical(tmp_path, rounding):
    model, opt = fresh_model_and_optimizer(rounding, seed=0)
    run(model, opt, range(0, 4))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.save(opt.state_dict(), tmp_path / "optim.pt")
    run(model, opt, range(4, 8))
    uninterrupted = snapshot(model, opt)

    resumed_model, resumed_opt = fresh_model_and_optimizer(rounding, seed=123)
    resumed_model.load_state_dict(torch.load(tmp_path / "model.pt"))  # weights_only=True, the default
    resumed_opt.load_state_dict(torch.load(tmp_path / "optim.pt"))
    assert all(isinstance(p, eco.QuantizedTensor) for n, p in resumed_model.named_parameters() if is_expert(n, p))
    run(resumed_model, resumed_opt, range(4, 8))
    assert_identical(snapshot(resumed_model, resumed_opt), uninterrupted)


def test_stochastic_resume_depends_on_the_saved_generator(tmp_path):
    """The check above can fail: without the saved generator state, stochastic rounding draws differently."""
    model, opt = fresh_model_and_optimizer("stochastic", seed=0)
    run(model, opt, range(0, 4))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    saved = opt.state_dict()
    run(model, opt, range(4, 6))
    uninterrupted = snapshot(model, opt)

    resumed_model, resumed_opt = fresh_model_and_optimizer("stochastic", seed=123)
    resumed_model.load_state_dict(torch.load(tmp_path / "model.pt"))
    saved = {**saved, "param_groups": [dict(g) for g in saved["param_groups"]]}
    del saved["param_groups"][0]["eco_generator_state"]
    resumed_opt.load_state_dict(saved)
    run(resumed_model, resumed_opt, range(4, 6))
    resumed = snapshot(resumed_model, resumed_opt)
    assert any(not torch.equal(resumed[k], uninterrupted[k]) for k in resumed if k.endswith(".codes"))


def test_loading_into_a_model_quantized_differently_is_refused(tmp_path):
    model, opt = fresh_model_and_optimizer("nearest", seed=0)
    run(model, opt, range(0, 2))
    other_model, other_opt = fresh_model_and_optimizer("nearest", seed=0, fmt=eco.INT4(group_size=16))
    with pytest.raises(ValueError, match="format"):
        other_opt.load_state_dict(opt.state_dict())
