"""examples/hf_trainer.py's core path: the stock ``transformers.Trainer`` drives eco.AdamW (scheduler, gradient
accumulation, clipping), its own checkpoints hold the quantized weights (``save_pretrained``), and a fresh
process resumed from the mid-run checkpoint ends on the same bits as an uninterrupted run."""

import random

import pytest
import torch
from safetensors.torch import load_file

import eco
from tests.helpers import load_example

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


hf_trainer = load_example("hf_trainer")


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_stock_trainer_resumes_in_a_fresh_process_bit_identically(tmp_path, rounding):
    text = tmp_path / "text.txt"
    text.write_text("".join(random.Random(0).choices("abcdefgh ijklmnop\n", k=4096)))
    straight, workdir, differ = hf_trainer.main([
        "--dataset", str(text), "--steps", "6", "--save-steps", "3", "--seq-len", "32", "--batch-size", "2",
        "--grad-accum", "2", "--lr", "2e-2", "--rounding", rounding, "--workdir", str(tmp_path / "work"),
    ])
    assert type(straight) is transformers.Trainer
    optimizer = straight.optimizer.optimizer if hasattr(straight.optimizer, "optimizer") else straight.optimizer
    assert isinstance(optimizer, eco.AdamW)
    assert straight.state.global_step == 6
    # The scheduler drove the learning rate (warmup, then cosine decay).
    rates = [e["learning_rate"] for e in straight.state.log_history if "learning_rate" in e]
    assert len(rates) == 2 and rates[1] < rates[0]

    # The checkpoint holds quantized weights (codes and scales), not dequantized copies ...
    mid, final = workdir / "straight" / "checkpoint-3", workdir / "straight" / "checkpoint-6"
    files = load_file(str(mid / "model.safetensors"))
    expert_names = [n for n, _ in eco.quantized_parameters(straight.model)]
    assert expert_names and all(n + "_codes" in files and n not in files for n in expert_names)
    # ... and from_pretrained rebuilds the quantized model from it, bit-exactly.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(final)
    assert [n for n, _ in eco.quantized_parameters(reloaded)] == expert_names
    for (name, a), (_, b) in zip(straight.model.named_parameters(), reloaded.named_parameters(), strict=True):
        if isinstance(a, eco.QuantizedTensor):
            assert b.fmt == a.fmt and torch.equal(b.codes, a.codes) and torch.equal(b.scales, a.scales), name
        else:
            assert torch.equal(b, a), name

    # Training went on after the checkpoint (so matching at the end is not trivial) ...
    at_mid, at_final = hf_trainer.checkpoint_tensors(mid), hf_trainer.checkpoint_tensors(final)
    assert any(not torch.equal(at_mid[k], at_final[k]) for k in at_mid if k.endswith("_codes"))
    # ... and the run resumed in a fresh process ends on exactly the same bits: weights and optimizer states.
    assert (workdir / "resumed" / "checkpoint-6").is_dir()
    assert any(k.startswith("optimizer/") for k in at_final)
    assert differ == []


def test_checkpoint_comparison_sees_a_one_bit_difference(tmp_path):
    """The bit-identity check above can fail: a single flipped code bit is reported."""
    a = {"model/w_codes": torch.tensor([1, 2, 3], dtype=torch.uint8), "optimizer/0/step": torch.tensor(3.0)}
    b = {"model/w_codes": torch.tensor([1, 2, 7], dtype=torch.uint8), "optimizer/0/step": torch.tensor(3.0)}
    assert hf_trainer.differences(a, b) == ["model/w_codes"]
    assert hf_trainer.differences(a, {**a, "extra": torch.zeros(1)}) == ["extra"]
    assert hf_trainer.differences(a, dict(a)) == []
