"""examples/hf_trainer.py's core path: the Trainer drives eco.AdamW (scheduler, gradient accumulation,
clipping), saves a mid-run checkpoint in eco's compact form, and a fresh Trainer resumes from it to
the same bits as an uninterrupted run."""


import pytest
import torch

import eco
from tests.helpers import load_example

pytest.importorskip("transformers")
pytest.importorskip("accelerate")


hf_trainer = load_example("hf_trainer")


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_trainer_resumes_bit_identically_from_a_compact_checkpoint(tmp_path, rounding):
    tokens = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
    dataset = hf_trainer.TokenWindows(tokens, seq_len=32)
    straight, resumed, identical = hf_trainer.straight_and_resumed(
        hf_trainer.tiny_mixtral, dataset, tmp_path, max_steps=6, save_steps=3, lr=2e-2, rounding=rounding,
        batch_size=2, grad_accum=2,
    )
    assert isinstance(straight.optimizer.optimizer if hasattr(straight.optimizer, "optimizer")
                      else straight.optimizer, eco.AdamW)
    assert straight.state.global_step == resumed.state.global_step == 6
    # The scheduler drove the learning rate (warmup, then cosine decay).
    rates = [e["learning_rate"] for e in straight.state.log_history if "learning_rate" in e]
    assert len(rates) == 2 and rates[1] < rates[0]
    # The checkpoint holds quantized weights, not dequantized copies.
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    at_checkpoint = hf_trainer.weights(eco.load_compact(hf_trainer.tiny_mixtral(seed=1), checkpoint))
    assert any(k.endswith(".codes") for k in at_checkpoint)
    final = hf_trainer.weights(straight.model)
    # Training went on after the checkpoint (so matching at the end is not trivial) ...
    assert any(not torch.equal(at_checkpoint[k], final[k]) for k in final if k.endswith(".codes"))
    # ... and the resumed run ends on exactly the same bits.
    assert identical
