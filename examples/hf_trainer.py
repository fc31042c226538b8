"""The Hugging Face ``Trainer`` driving ``eco.AdamW``, with a checkpoint saved mid-run and resumed.

The eco optimizer goes in through the Trainer's own mechanism for custom
optimizers, ``optimizer_cls_and_kwargs``: the Trainer still builds the param
groups (no weight decay on norms and biases), the LR scheduler
(``lr_scheduler_type``, ``warmup_steps``), gradient accumulation and clipping.

One thing changes: checkpoints. ``save_pretrained`` cannot write quantized
weights (safetensors needs real storage), so :class:`EcoTrainer` saves the
model in eco's compact form (codes + scales, ``eco.export(form="compact")``)
and loads it back bit-identically on resume. The optimizer, scheduler and RNG
states are saved by the Trainer as usual (``eco.AdamW.state_dict`` carries the
stochastic-rounding generator). When training is done, ``eco.export(model, path)``
writes bf16 weights that plain ``transformers`` loads.

    python examples/hf_trainer.py [--model PATH] [--dataset FILE] [--steps 40]

runs the same training twice, once straight through and once stopped at the
mid-run checkpoint and resumed in a fresh Trainer with a fresh model, and
checks that both end bit-identical.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

import eco
from eco.export import COMPACT_FILE

EXPERT_CONTAINERS = {"experts", "shared_expert", "shared_experts"}


def expert_filter(name: str, param: torch.Tensor) -> bool:
    """Expert weight matrices only (the same rule as examples/moe_int4_finetune.py)."""
    parts = name.split(".")
    return any(p in EXPERT_CONTAINERS for p in parts[:-1]) and param.dim() in (2, 3) and "bias" not in parts[-1]


def _trainer_class():
    from transformers import Trainer
    from transformers.trainer import TRAINING_ARGS_NAME

    class EcoTrainer(Trainer):
        """A ``Trainer`` whose model checkpoints are eco compact exports (quantized weights kept exactly)."""

        def _save(self, output_dir: str | None = None, state_dict=None) -> None:
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            if not self.args.should_save:
                return
            eco.export(self.model, output_dir, form="compact")
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
            eco.load_compact(model if model is not None else self.model, resume_from_checkpoint)

    return EcoTrainer


class TokenWindows(torch.utils.data.Dataset):
    """Fixed consecutive windows of a token sequence, as causal-LM examples (labels = inputs)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        usable = (len(tokens) // seq_len) * seq_len
        if usable == 0:
            raise ValueError(f"the text has {len(tokens)} tokens, fewer than one window of {seq_len}")
        self.windows = tokens[:usable].reshape(-1, seq_len)

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def byte_tokens(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def tiny_mixtral(vocab_size: int = 256, hidden: int = 32, seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=512, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return MixtralForCausalLM(config)


def build_trainer(model, dataset, output_dir, *, max_steps: int, save_steps: int, lr: float = 3e-3,
                  rounding: str = "stochastic", batch_size: int = 4, grad_accum: int = 2, seed: int = 0):
    """Quantize the experts to INT4 and wire eco.AdamW into a Trainer with a cosine schedule."""
    from transformers import TrainingArguments

    if not eco.quantized_parameters(model):
        eco.quantize_(model, eco.INT4(), filter_fn=expert_filter)
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=2,
        weight_decay=0.1, max_grad_norm=1.0, save_strategy="steps", save_steps=save_steps, logging_steps=save_steps,
        report_to="none", use_cpu=True, seed=seed, data_seed=seed, dataloader_num_workers=0, disable_tqdm=True,
    )
    optimizer = (eco.AdamW, dict(lr=lr, betas=(0.9, 0.98), eps=1e-9, rounding=rounding, seed=seed))
    return _trainer_class()(model=model, args=args, train_dataset=dataset, optimizer_cls_and_kwargs=optimizer)


def weights(model) -> dict[str, torch.Tensor]:
    """Codes, scales and plain weights: what must match after resuming."""
    out = {}
    for name, p in model.named_parameters():
        if isinstance(p, eco.QuantizedTensor):
            out[name + ".codes"], out[name + ".scales"] = p.codes.clone(), p.scales.clone()
        else:
            out[name] = p.detach().clone()
    return out


def straight_and_resumed(make_model, dataset, workdir, *, max_steps: int, save_steps: int, **kwargs):
    """Train straight through, then resume a fresh model and Trainer from the mid-run checkpoint.

    Returns (straight-through trainer, resumed trainer, whether the final weights are bit-identical).
    """
    workdir = Path(workdir)
    straight = build_trainer(make_model(), dataset, workdir / "straight", max_steps=max_steps,
                             save_steps=save_steps, **kwargs)
    straight.train()
    checkpoint = workdir / "straight" / f"checkpoint-{save_steps}"
    if not (checkpoint / COMPACT_FILE).is_file():
        raise RuntimeError(f"no mid-run checkpoint in {checkpoint}")
    resumed = build_trainer(make_model(), dataset, workdir / "resumed", max_steps=max_steps,
                            save_steps=save_steps, **kwargs)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    a, b = weights(straight.model), weights(resumed.model)
    identical = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return straight, resumed, identical


def main(argv=None):
    parser = argparse.ArgumentParser(description="Hugging Face Trainer + eco.AdamW, INT4 experts, resume")
    parser.add_argument("--model", help="local Hugging Face MoE checkpoint (default: a tiny Mixtral from a config)")
    parser.add_argument("--dataset", help="UTF-8 text file (default: the stdlib's os.py source)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rounding", choices=["nearest", "stochastic"], default="stochastic")
    parser.add_argument("--workdir", help="where checkpoints go (default: a temporary folder)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # shared CPU cores: extra OpenMP threads spin and slow every op

    text = Path(args.dataset or os.__file__).read_text(encoding="utf-8")
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        tokens = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
        make_model = lambda: AutoModelForCausalLM.from_pretrained(args.model)
    else:
        tokens = byte_tokens(text)
        make_model = tiny_mixtral
    dataset = TokenWindows(tokens, args.seq_len)

    with tempfile.TemporaryDirectory() as tmp:
        straight, resumed, identical = straight_and_resumed(
            make_model, dataset, args.workdir or tmp, max_steps=args.steps, save_steps=args.steps // 2,
            lr=args.lr, rounding=args.rounding,
        )
        losses = [entry["loss"] for entry in straight.state.log_history if "loss" in entry]
        print(f"training loss (logged every {args.steps // 2} steps): {', '.join(f'{x:.4f}' for x in losses)}")
        print(f"resumed from checkpoint-{args.steps // 2} in a fresh Trainer: final weights bit-identical: {identical}")
        print(eco.memory_report(straight.model, straight.optimizer))
    return identical


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
