"""examples/moe_int4_finetune.py end to end at toy size: pre-train, save, fine-tune arms, table, export,
and the --model / --dataset path on the checkpoint it saved."""


import pytest
import torch

import eco
from tests.helpers import load_example

transformers = pytest.importorskip("transformers")


example = load_example("moe_int4_finetune")
TOY = ["--hidden", "32", "--layers", "1", "--experts", "4", "--batch-size", "2", "--seq-len", "32",
       "--eval-batches", "1", "--log-every", "0", "--pretrain-steps", "3", "--steps", "3", "--threads", "1"]


def test_default_pipeline_at_toy_size(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        results = example.main(TOY + ["--workdir", str(tmp_path / "work"), "--export", str(tmp_path / "out"),
                                      "--arms", "int4-master,eco-stochastic,naive,eco-stochastic-lowbit"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert [r["arm"] for r in results] == ["int4-master", "eco-stochastic", "naive", "eco-stochastic-lowbit"]
    for arm in ("int4-master", "eco-stochastic", "naive"):
        assert arm in out
    assert "gap vs master" in out and "+0.00%" in out
    by_arm = {r["arm"]: r for r in results}
    # Every arm starts from the same saved checkpoint and evaluation set.
    assert len({r["start_loss"] for r in results}) == 1
    assert all(r["final_loss"] == r["final_loss"] for r in results)  # finite, not NaN
    # Tensor-wise INT4 experts with fp32 moments: 0.5 (codes) + 8 (m, v), plus 4 for a master copy.
    assert by_arm["eco-stochastic"]["expert_report"].bytes_per_param == pytest.approx(8.5, abs=0.01)
    assert by_arm["int4-master"]["expert_report"].bytes_per_param == pytest.approx(12.5, abs=0.01)
    # 8-bit m (a byte and a 128-element block scale) and a factored v (row and column sums per expert matrix).
    assert 1.5 < by_arm["eco-stochastic-lowbit"]["expert_report"].bytes_per_param < 1.8
    # The exported ECO model loads into plain transformers and matches the compact reload.
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "eco-stochastic" / "bf16")
    assert plain.dtype == torch.bfloat16
    compact = transformers.AutoModelForCausalLM.from_config(plain.config)
    eco.load_compact(compact, tmp_path / "out" / "eco-stochastic" / "compact")
    for name, qparam in eco.quantized_parameters(compact):
        assert torch.equal(plain.get_parameter(name), qparam.dequantize(torch.bfloat16))


def test_model_and_dataset_options(tmp_path):
    example.main(TOY + ["--workdir", str(tmp_path / "work"), "--arms", "eco-nearest"])
    checkpoint = next((tmp_path / "work").glob("pretrained-*"))
    text = tmp_path / "mine.txt"
    text.write_text("fine-tune on my own text, please. " * 200)
    results = example.main(TOY + ["--model", str(checkpoint), "--byte-tokens", "--dataset", str(text),
                                  "--arms", "eco-stochastic", "--group-size", "16"])
    assert results[0]["quantized"] == 2  # gate_up_proj and down_proj of the one layer
    with pytest.raises(SystemExit):
        example.main(["--arms", "eco-magic"])


def test_seeds_give_one_row_per_arm_with_the_spread(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        results = example.main(TOY + ["--workdir", str(tmp_path / "work"), "--seeds", "2",
                                      "--arms", "int4-master,naive-stochastic-lowbit"])
    finally:
        torch.set_num_threads(threads)
    assert [(r["arm"], r["seed"]) for r in results] == [
        ("int4-master", 0), ("naive-stochastic-lowbit", 0), ("int4-master", 1), ("naive-stochastic-lowbit", 1)]
    # Two seeds draw different data orders and roundings.
    assert results[0]["final_loss"] != results[2]["final_loss"]
    rows = {r["arm"]: r for r in example.summarize(results)}
    master = [r["final_loss"] for r in results if r["arm"] == "int4-master"]
    assert rows["int4-master"]["seeds"] == 2 and rows["int4-master"]["final_loss"] == pytest.approx(sum(master) / 2)
    assert rows["int4-master"]["gap"] == 0.0
    assert 1.5 < rows["naive-stochastic-lowbit"]["expert_bytes_per_param"] < 1.8
    assert "mean ± sd, 2 seeds" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        example.main(["--seeds", "0"])


def test_memory_table_has_the_low_bit_state_rows(capsys):
    rows = dict(example.main(["--memory-table", "--hidden", "32", "--layers", "1", "--experts", "4"]))
    assert rows["ECO INT4, 8-bit m + factored v"].bytes_per_param < rows["ECO INT4, 8-bit m + 8-bit v"].bytes_per_param
    assert rows["ECO INT4, 8-bit m + 8-bit v"].bytes_per_param < rows["ECO INT4, bf16 states"].bytes_per_param


def test_expert_filter_names():
    f, w2, w3 = example.expert_filter, torch.zeros(4, 4), torch.zeros(2, 4, 4)
    assert f("model.layers.0.mlp.experts.gate_up_proj", w3)                      # Mixtral, Qwen-MoE, OLMoE (5.x)
    assert f("model.layers.0.mlp.experts.3.w1.weight", w2)                       # per-expert Linear
    assert f("model.layers.1.mlp.shared_experts.down_proj.weight", w2)           # DeepSeek-MoE shared experts
    assert f("model.layers.1.mlp.shared_expert.up_proj.weight", w2)              # Qwen-MoE shared expert
    assert not f("model.layers.1.mlp.shared_expert_gate.weight", w2)             # a router
    assert not f("model.layers.0.mlp.gate.weight", w2)                           # the router
    assert not f("model.layers.0.mlp.experts.gate_up_proj_bias", w2)             # biases stay
    assert not f("model.layers.0.self_attn.q_proj.weight", w2)
    assert not f("lm_head.weight", w2)
