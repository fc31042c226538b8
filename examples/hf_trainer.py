"""The stock Hugging Face ``Trainer`` driving ``eco.AdamW``; a mid-run checkpoint resumed in a fresh process.

The eco optimizer goes in through the Trainer's own mechanism for custom
optimizers, ``optimizer_cls_and_kwargs``: the Trainer still builds the param
groups (no weight decay on norms and biases), the LR scheduler
(``lr_scheduler_type``, ``warmup_steps``), gradient accumulation and clipping.

Nothing else changes, checkpoints included: the model's ``save_pretrained``
writes each quantized weight as its codes and scales (``import eco`` registers
a ``transformers`` quantizer for that, see eco/hf.py), the Trainer's resume
loads them back bit-identically, and ``AutoModelForCausalLM.from_pretrained``
of a checkpoint folder rebuilds the quantized model. The optimizer, scheduler
and RNG states are saved by the Trainer as usual (``eco.AdamW.state_dict``
carries the stochastic-rounding generator). For plain weights that any
``transformers`` loads, without eco: ``eco.export(model, path)``.

    python examples/hf_trainer.py [--model PATH] [--dataset FILE] [--steps 40]

trains straight through, then resumes from the mid-run checkpoint in a fresh
Python process (this script with ``--resume-from``), and checks that both runs'
final checkpoints hold the same bits: weights, and every optimizer state.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import eco

EXPERT_CONTAINERS = {"experts", "shared_expert", "shared_experts"}


def expert_filter(name: str, param: torch.Tensor) -> bool:
    """Expert weight matrices only (the same rule as examples/moe_int4_finetune.py)."""
    parts = name.split(".")
    return any(p in EXPERT_CONTAINERS for p in parts[:-1]) and param.dim() in (2, 3) and "bias" not in parts[-1]


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
    """Quantize the experts to INT4 and wire eco.AdamW into a stock Trainer with a cosine schedule."""
    from transformers import Trainer, TrainingArguments

    if not eco.quantized_parameters(model):
        eco.quantize_(model, eco.INT4(), filter_fn=expert_filter)
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=2,
        weight_decay=0.1, max_grad_norm=1.0, save_strategy="steps", save_steps=save_steps, logging_steps=save_steps,
        report_to="none", use_cpu=True, seed=seed, data_seed=seed, dataloader_num_workers=0, disable_tqdm=True,
    )
    optimizer = (eco.AdamW, dict(lr=lr, betas=(0.9, 0.98), eps=1e-9, rounding=rounding, seed=seed))
    return Trainer(model=model, args=args, train_dataset=dataset, optimizer_cls_and_kwargs=optimizer)


def checkpoint_tensors(folder) -> dict[str, torch.Tensor]:
    """What a Trainer checkpoint folder holds as tensors: the model file and every optimizer state."""
    from safetensors.torch import load_file

    folder = Path(folder)
    out = {f"model/{k}": v for k, v in load_file(str(folder / "model.safetensors")).items()}
    optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
    for index, state in optimizer["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"optimizer/{index}/{key}"] = value
    return out


def differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors differ in any bit (or exist on one side only)."""
    def same(x, y):
        bits = lambda t: t.flatten().view(torch.uint8)  # noqa: E731
        return x.dtype == y.dtype and x.shape == y.shape and torch.equal(bits(x), bits(y))

    return sorted(a.keys() ^ b.keys()) + [k for k in sorted(a.keys() & b.keys()) if not same(a[k], b[k])]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Hugging Face Trainer + eco.AdamW, INT4 experts, resume")
    parser.add_argument("--model", help="local Hugging Face MoE checkpoint (default: a tiny Mixtral from a config)")
    parser.add_argument("--dataset", help="UTF-8 text file (default: the stdlib's os.py source)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save-steps", type=int, help="checkpoint every N steps (default: steps / 2)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rounding", choices=["nearest", "stochastic"], default="stochastic")
    parser.add_argument("--workdir", help="where checkpoints go (default: a temporary folder)")
    parser.add_argument("--resume-from", help="(internal) resume from this checkpoint into --workdir and exit")
    args = parser.parse_args(argv)
    args.save_steps = args.save_steps or max(1, args.steps // 2)
    return args


def trainer_from_args(args, output_dir):
    text = Path(args.dataset or os.__file__).read_text(encoding="utf-8")
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        tokens = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
        model = AutoModelForCausalLM.from_pretrained(args.model)
    else:
        tokens = byte_tokens(text)
        model = tiny_mixtral(seed=1 if args.resume_from else 0)  # resuming may not depend on the initial weights
    return build_trainer(model, TokenWindows(tokens, args.seq_len), output_dir, max_steps=args.steps,
                         save_steps=args.save_steps, lr=args.lr, rounding=args.rounding, batch_size=args.batch_size,
                         grad_accum=args.grad_accum)


def main(argv=None):
    """Returns (the straight-through trainer, its workdir, the differences between both final checkpoints)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # shared CPU cores: extra OpenMP threads spin and slow every op
    if args.resume_from:
        trainer_from_args(args, args.workdir).train(resume_from_checkpoint=args.resume_from)
        return None

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        straight = trainer_from_args(args, workdir / "straight")
        straight.train()
        mid, final = f"checkpoint-{args.save_steps}", f"checkpoint-{args.steps}"
        # A fresh process: nothing survives but the checkpoint folder.
        subprocess.run([sys.executable, __file__, *argv, "--workdir", str(workdir / "resumed"),
                        "--resume-from", str(workdir / "straight" / mid)], check=True)
        differ = differences(checkpoint_tensors(workdir / "straight" / final),
                             checkpoint_tensors(workdir / "resumed" / final))
        losses = [entry["loss"] for entry in straight.state.log_history if "loss" in entry]
        print(f"training loss (logged every {args.save_steps} steps): {', '.join(f'{x:.4f}' for x in losses)}")
        print(f"resumed from {mid} in a fresh process: {final} bit-identical (weights and optimizer states): "
              f"{not differ}" + (f"; differ: {differ[:5]}" if differ else ""))
        print(eco.memory_report(straight.model, straight.optimizer))
        return straight, workdir, differ


if __name__ == "__main__":
    result = main()
    raise SystemExit(0 if result is None or not result[2] else 1)
