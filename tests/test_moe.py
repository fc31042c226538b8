"""INT4 experts in transformers Mixture-of-Experts models: fused 3-D experts (Mixtral) and
per-expert Linear modules (Switch Transformers' ``experts.expert_<i>``).

Only expert weights are quantized; every routed expert gets a gradient; a few dozen
ECO steps lower the loss while the high-precision parameters train as usual.
"""

import copy

import pytest
import torch

import eco
from tests.helpers import load_example

transformers = pytest.importorskip("transformers")


expert_filter = load_example("moe_int4_finetune").expert_filter


def tiny_mixtral(experts_implementation: str = "eager", num_experts: int = 8):
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=num_experts, num_experts_per_tok=2, max_position_embeddings=64,
        tie_word_embeddings=False, router_aux_loss_coef=0.0,
    )
    config._experts_implementation = experts_implementation
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config)


def tiny_switch():
    config = transformers.SwitchTransformersConfig(
        vocab_size=64, d_model=32, d_ff=32, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
        num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_experts=4, expert_capacity=64,
        router_z_loss_coef=0.0, router_aux_loss_coef=0.0, decoder_start_token_id=0, pad_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.SwitchTransformersForConditionalGeneration(config)


def mixtral_loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


def switch_loss(model, batch):
    return model(input_ids=batch, labels=batch.flip(1)).loss


MODELS = {
    "mixtral-fused": (tiny_mixtral, mixtral_loss, lambda: torch.randint(0, 64, (4, 16))),
    "switch-linear": (tiny_switch, switch_loss, lambda: torch.randint(1, 64, (4, 16))),
}


def expert_names(model):
    return {n for n, p in model.named_parameters() if expert_filter(n, p)}


@pytest.mark.parametrize("kind", list(MODELS))
def test_only_expert_weights_are_quantized(kind):
    build, _, _ = MODELS[kind]
    model = build()
    wanted = expert_names(model)
    assert wanted, "the filter found no expert weights"
    eco.quantize_(model, eco.INT4(), filter_fn=expert_filter)
    quantized = {n for n, _ in eco.quantized_parameters(model)}
    assert quantized == wanted
    for name in quantized:
        assert "experts" in name.split(".")
    # Routers, attention, norms, embeddings and the head stay plain.
    plain = {n for n, p in model.named_parameters() if not isinstance(p, eco.QuantizedTensor)}
    assert any("router" in n or n.endswith("gate.weight") for n in plain)
    assert any("embed" in n or "shared" in n for n in plain)
    if kind == "mixtral-fused":
        assert all(p.dim() == 3 for _, p in eco.quantized_parameters(model))
        # Tensor-wise INT4 on a fused tensor: one scale per expert.
        assert all(p.scales.shape == (p.shape[0], 1, 1) for _, p in eco.quantized_parameters(model))
    else:
        assert all(p.dim() == 2 for _, p in eco.quantized_parameters(model))


def _routed_experts_mixtral(model, batch):
    """A loss that depends on every position, and {layer: expert ids that received at least one token}.

    (The LM loss ignores the last position's logits, so its experts would rightly get no gradient.)
    """
    routed, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        def hook(module, args, output, i=i):
            routed[i] = set(output[2].flatten().tolist())
        hooks.append(layer.mlp.gate.register_forward_hook(hook))
    loss = model(input_ids=batch).logits.square().mean()
    for h in hooks:
        h.remove()
    return loss, routed


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_fused_experts_gradients_reach_exactly_the_routed_experts(implementation):
    model = tiny_mixtral(implementation, num_experts=16)
    eco.quantize_(model, eco.INT4(), filter_fn=expert_filter)
    batch = torch.randint(0, 64, (1, 3))  # 3 tokens x top-2 over 16 experts: some experts get nothing
    loss, routed = _routed_experts_mixtral(model, batch)
    loss.backward()
    some_unrouted = False
    for i, layer in enumerate(model.model.layers):
        for param in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
            assert isinstance(param, eco.QuantizedTensor)
            assert type(param.grad) is torch.Tensor and param.grad.dtype == torch.float32
            per_expert = param.grad.abs().sum(dim=(1, 2))
            for expert in range(per_expert.numel()):
                if expert in routed[i]:
                    assert per_expert[expert] > 0, f"layer {i} expert {expert} was routed to but got no gradient"
                else:
                    some_unrouted = True
                    assert per_expert[expert] == 0
    assert some_unrouted


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_quantized_fused_experts_compute_with_the_dequantized_weights(implementation):
    model = tiny_mixtral(implementation)
    eco.quantize_(model, eco.INT4(group_size=16), filter_fn=expert_filter)
    plain = copy.deepcopy(model)
    for layer in plain.model.layers:
        experts = layer.mlp.experts
        experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj.dequantize())
        experts.down_proj = torch.nn.Parameter(experts.down_proj.dequantize())
    assert not eco.quantized_parameters(plain)
    batch = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(model(batch).logits, plain(batch).logits, rtol=1e-5, atol=1e-5)


def test_per_expert_linear_gradients_reach_the_routed_experts():
    model = tiny_switch()
    eco.quantize_(model, eco.INT4(), filter_fn=expert_filter)
    routed, hooks = {}, []
    for name, module in model.named_modules():
        if name.endswith("mlp.router"):
            def hook(module, args, output, name=name):
                routed[name.removesuffix(".router")] = set(output[0].argmax(-1).flatten().tolist())
            hooks.append(module.register_forward_hook(hook))
    batch = torch.randint(1, 64, (2, 8))
    switch_loss(model, batch).backward()
    for h in hooks:
        h.remove()
    assert routed
    for mlp_name, experts in routed.items():
        for expert in experts:
            weight = model.get_parameter(f"{mlp_name}.experts.expert_{expert}.wi.weight")
            assert isinstance(weight, eco.QuantizedTensor)
            assert weight.grad is not None and weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_eco_steps_lower_the_loss_and_plain_params_train(kind, rounding):
    build, loss_fn, make_batch = MODELS[kind]
    model = build()
    eco.quantize_(model, eco.INT4(), filter_fn=expert_filter)
    plain_before = {n: p.detach().clone() for n, p in model.named_parameters()
                    if not isinstance(p, eco.QuantizedTensor)}
    codes_before = {n: p.codes.clone() for n, p in eco.quantized_parameters(model)}
    opt = eco.AdamW(model.parameters(), lr=3e-2, weight_decay=0.0, rounding=rounding, seed=0)
    batch = make_batch()
    losses = []
    for _ in range(30):
        loss = loss_fn(model, batch)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.7 * losses[0], losses
    # Experts moved on the INT4 grid and are still quantized.
    assert any(not torch.equal(p.codes, codes_before[n]) for n, p in eco.quantized_parameters(model))
    # Non-expert parameters trained as ordinary fp32 tensors.
    moved = [n for n, p in model.named_parameters()
             if n in plain_before and p.requires_grad and not torch.equal(p, plain_before[n])]
    assert any("attn" in n or "Attention" in n or "self_attn" in n or "SelfAttention" in n for n in moved), moved
    assert all(p.dtype == torch.float32 and type(p) is torch.nn.Parameter
               for n, p in model.named_parameters() if n in plain_before)


def tiny_family(name):
    """Other transformers MoE families: fused routed experts plus shared experts as plain Linear modules."""
    if name == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(
            vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
            shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_experts=4, num_experts_per_tok=2,
        )
    else:
        config = transformers.DeepseekV2Config(
            vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1,
            num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1,
        )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2"])
def test_other_families_with_shared_experts(family):
    model = tiny_family(family)
    eco.quantize_(model, eco.INT4(), filter_fn=expert_filter)
    quantized = dict(eco.quantized_parameters(model))
    assert any(p.dim() == 3 for p in quantized.values())                       # routed experts, fused
    assert any(".shared_expert" in n and p.dim() == 2 for n, p in quantized.items())  # shared experts, Linear
    assert not any("gate.weight" in n and "proj" not in n for n in quantized)  # routers stay plain
    opt = eco.AdamW(model.parameters(), lr=1e-2, seed=0)
    batch = torch.randint(0, 64, (2, 8))
    losses = []
    for _ in range(15):
        loss = model(input_ids=batch, labels=batch).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.5 * losses[0], losses
