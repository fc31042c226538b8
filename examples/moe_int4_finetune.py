"""Fine-tune a Mixture-of-Experts causal LM with INT4 expert weights and no master copy (ECO).

The paper's headline use (DeepSeek-MoE-16B, INT4 tensor-wise experts): only the
expert weights are quantized; attention, router, norms, embeddings and the head
train in high precision as usual. ``eco.AdamW`` updates both kinds of parameter.

Default, offline (nothing is downloaded): a small Mixtral-style model built from
a config is pre-trained briefly in high precision on Python source code from the
standard library, saved, then fine-tuned on English prose (the stdlib's pydoc
topics): a domain shift, so fine-tuning has something to learn. Every arm starts
from the same saved checkpoint with the same data, learning rate and seed:

    int4-master     INT4 experts with an fp32 master copy (the baseline ECO removes)
    eco-nearest     ECO, round-to-nearest
    eco-stochastic  ECO, stochastic rounding
    eco-stochastic-lowbit  ECO, stochastic rounding, 8-bit momentum + factored second moment
    naive           no master copy, no error feedback, round-to-nearest
    naive-stochastic  no master copy, no error feedback, stochastic rounding
    naive-stochastic-lowbit  naive-stochastic with 8-bit momentum + factored second moment

    python examples/moe_int4_finetune.py
    python examples/moe_int4_finetune.py --seeds 3   # every arm with fine-tuning seeds 0, 1, 2

A real checkpoint on your GPU (any local Mixtral / Qwen-MoE / DeepSeek-MoE /
OLMoE checkpoint, fused 3-D experts or a list of Linear experts):

    python examples/moe_int4_finetune.py --model /path/to/checkpoint --dataset my.txt \\
        --arms eco-stochastic --steps 1000 --lr 1e-5 --batch-size 8 --seq-len 1024 --export out/
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import eco

ARMS = {
    "int4-master": dict(master_weights=True, rounding="nearest"),
    "eco-nearest": dict(rounding="nearest"),
    "eco-stochastic": dict(rounding="stochastic"),
    "eco-stochastic-lowbit": dict(rounding="stochastic", momentum="8bit", second_moment="factored"),
    "naive": dict(error_feedback=False, rounding="nearest"),
    "naive-stochastic": dict(error_feedback=False, rounding="stochastic"),
    "naive-stochastic-lowbit": dict(error_feedback=False, rounding="stochastic", momentum="8bit",
                                    second_moment="factored"),
}
BASELINE_ARM = "int4-master"
# Module names that hold experts: Mixtral/Qwen-MoE/OLMoE/DeepSeek ``experts``,
# and the always-on shared experts of Qwen-MoE (``shared_expert``) and DeepSeek-MoE (``shared_experts``).
EXPERT_CONTAINERS = {"experts", "shared_expert", "shared_experts"}


def expert_filter(name: str, param: torch.Tensor) -> bool:
    """``filter_fn`` for ``eco.quantize_``: expert weight matrices only (fused 3-D or per-expert Linear).

    Routers (``gate``, ``shared_expert_gate``), biases, attention, norms,
    embeddings and the head stay in high precision, as in the paper.
    """
    parts = name.split(".")
    in_experts = any(part in EXPERT_CONTAINERS for part in parts[:-1])
    return in_experts and param.dim() in (2, 3) and "bias" not in parts[-1]


# ---------------------------------------------------------------- data
def stdlib_corpus() -> tuple[str, str]:
    """Two deterministic parts of the Python standard library's source text.

    Pre-training: the top-level ``*.py`` modules (code), sorted by name.
    Fine-tuning: the English prose of ``pydoc_data/topics.py`` (the language reference topics).
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    topics_file = stdlib / "pydoc_data" / "topics.py"
    if not topics_file.is_file():
        raise FileNotFoundError(
            f"{topics_file} is missing from this Python installation; pass --dataset FILE with your own text"
        )
    code = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py")))
    topics = _literal_assignment(topics_file.read_text(encoding="utf-8"), "topics")
    prose = "\n".join(topics[key] for key in sorted(topics))
    return code, prose


def _literal_assignment(source: str, name: str):
    """The literal value assigned to ``name`` in ``source``, read without executing anything."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise ValueError(f"no literal assignment to {name!r} found")


class ByteTokenizer:
    """Bytes as tokens (vocabulary 256): needs no download and covers any text."""

    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def split_tokens(tokens: torch.Tensor, eval_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Train on the first part, evaluate on the held-out tail."""
    cut = int(len(tokens) * (1 - eval_fraction))
    return tokens[:cut], tokens[cut:]


def random_batch(tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=generator)
    return torch.stack([tokens[s: s + seq_len] for s in starts.tolist()])


def eval_batches(tokens: torch.Tensor, batch_size: int, seq_len: int, num_batches: int) -> list[torch.Tensor]:
    """Fixed, evenly spaced windows of the held-out text: the same for every arm."""
    count = batch_size * num_batches
    if len(tokens) < seq_len + 1:
        raise ValueError(f"the evaluation text has {len(tokens)} tokens, fewer than --seq-len {seq_len}")
    starts = torch.linspace(0, len(tokens) - seq_len - 1, count).long().tolist()
    windows = torch.stack([tokens[s: s + seq_len] for s in starts])
    return list(windows.split(batch_size))


# ---------------------------------------------------------------- model
def tiny_mixtral_config(vocab_size: int, hidden: int, layers: int, experts: int):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=2,
        max_position_embeddings=1024, tie_word_embeddings=False, router_aux_loss_coef=0.0,
    )


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss


@torch.no_grad()
def evaluate(model, batches: list[torch.Tensor], device) -> float:
    model.eval()
    losses = [lm_loss(model, b.to(device)).item() for b in batches]
    model.train()
    return sum(losses) / len(losses)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 0.1x peak (the paper's schedule)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, optimizer, tokens, args, total: int, seed: int, device, log_prefix: str) -> None:
    """The loop every arm shares: same batches (seeded), schedule and clipping."""
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(total):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, group["initial_lr"], args.warmup)
        batch = random_batch(tokens, args.batch_size, args.seq_len, generator).to(device)
        loss = lm_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.log_every and (step + 1) % args.log_every == 0:
            print(f"  {log_prefix} step {step + 1:>4}/{total}  loss {loss.item():.4f}", flush=True)


def set_initial_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["initial_lr"] = lr


# ---------------------------------------------------------------- memory
def expert_memory(model, optimizer) -> eco.MemoryReport:
    """``eco.memory_report`` restricted to the expert weights and their optimizer state."""
    experts = torch.nn.ParameterList([p for n, p in model.named_parameters() if expert_filter(n, p)])
    state_view = SimpleNamespace(state={p: optimizer.state[p] for p in experts if p in optimizer.state})
    return eco.memory_report(experts, state_view)


MEMORY_SETTINGS = [
    # (label, quantize the experts?, optimizer factory)
    ("fp32 weights + torch AdamW (fp32 states)", False,
     lambda params: torch.optim.AdamW(params, lr=1e-3)),
    ("INT4 + fp32 master, fp32 states", True,
     lambda params: eco.AdamW(params, lr=1e-3, master_weights=True)),
    ("ECO INT4, fp32 states", True, lambda params: eco.AdamW(params, lr=1e-3)),
    ("ECO INT4, bf16 states", True, lambda params: eco.AdamW(params, lr=1e-3, state_dtype=torch.bfloat16)),
    ("ECO INT4, 8-bit m + 8-bit v", True,
     lambda params: eco.AdamW(params, lr=1e-3, momentum="8bit", second_moment="8bit")),
    ("ECO INT4, 8-bit m + factored v", True,
     lambda params: eco.AdamW(params, lr=1e-3, momentum="8bit", second_moment="factored")),
]


def memory_table(args) -> list[tuple[str, eco.MemoryReport]]:
    """Static bytes per expert parameter in each setting, measured with eco.memory_report after one step."""
    from transformers import MixtralForCausalLM

    rows = []
    for label, quantize, make_optimizer in MEMORY_SETTINGS:
        torch.manual_seed(args.seed)
        model = MixtralForCausalLM(tiny_mixtral_config(ByteTokenizer.vocab_size, args.hidden, args.layers,
                                                       args.experts))
        if quantize:
            eco.quantize_(model, eco.INT4(group_size=args.group_size), filter_fn=expert_filter)
        optimizer = make_optimizer(model.parameters())
        batch = torch.randint(0, ByteTokenizer.vocab_size, (2, 16))
        lm_loss(model, batch).backward()
        optimizer.step()
        rows.append((label, expert_memory(model, optimizer)))
    print(f"static memory of the expert weights + their optimizer state, {eco.INT4(group_size=args.group_size)}")
    print(f"{'setting':<44}{'bytes/param':>12}{'GB per 1e9 expert params':>26}")
    for label, report in rows:
        print(f"{label:<44}{report.bytes_per_param:>12.3f}{report.bytes_per_param:>26.2f}")
    return rows


# ---------------------------------------------------------------- arms
def finetune_arm(arm: str, load_model, train_tokens, eval_sets, args, device, seed: int) -> dict:
    """Fine-tune one arm from the saved checkpoint; ``seed`` sets the data order and the rounding draws."""
    model = load_model()
    eco.quantize_(model, eco.INT4(group_size=args.group_size), filter_fn=expert_filter)
    quantized = eco.quantized_parameters(model)
    if not quantized:
        raise ValueError("no expert weights were found to quantize: is this a Mixture-of-Experts model?")
    expert_params = sum(p.numel() for _, p in quantized)
    total_params = sum(p.numel() for p in model.parameters())
    print(f"  {arm}: {expert_params:,} of {total_params:,} parameters ({100 * expert_params / total_params:.1f}%) "
          f"are expert weights, now {quantized[0][1].fmt}")
    start_loss = evaluate(model, eval_sets, device)
    options = dict(ARMS[arm])
    if "momentum" not in options:  # an arm that names its state formats keeps them; the others take --state-dtype
        options["state_dtype"] = args.state_dtype
    optimizer = eco.AdamW(
        model.parameters(), lr=args.lr, betas=(args.beta1, 0.98), eps=1e-9, weight_decay=args.weight_decay,
        seed=seed, **options,
    )
    set_initial_lr(optimizer, args.lr)
    started = time.perf_counter()
    train(model, optimizer, train_tokens, args, args.steps, seed=seed + 1, device=device,
          log_prefix=f"{arm} (seed {seed})")
    seconds = time.perf_counter() - started
    result = dict(
        arm=arm, seed=seed, start_loss=start_loss, final_loss=evaluate(model, eval_sets, device), seconds=seconds,
        model_report=eco.memory_report(model, optimizer), expert_report=expert_memory(model, optimizer),
        quantized=len(quantized),
    )
    if args.export and arm != BASELINE_ARM:
        out = Path(args.export) / (arm if seed == args.seed else f"{arm}-seed{seed}")
        eco.export(model, out / "bf16", form="dequantized", dtype=torch.bfloat16)
        eco.export(model, out / "compact", form="compact")
        print(f"  {arm}: exported to {out}/bf16 (plain transformers) and {out}/compact (codes + scales)")
    return result


def summarize(results: list[dict]) -> list[dict]:
    """One row per arm over its seeds: mean and spread of the final loss, and the gap of the means to the baseline."""
    arms = list(dict.fromkeys(r["arm"] for r in results))
    rows = []
    for arm in arms:
        runs = [r for r in results if r["arm"] == arm]
        finals = [r["final_loss"] for r in runs]
        mean = sum(finals) / len(finals)
        std = (sum((f - mean) ** 2 for f in finals) / (len(finals) - 1)) ** 0.5 if len(finals) > 1 else 0.0
        rows.append(dict(arm=arm, seeds=len(runs), start_loss=runs[0]["start_loss"], final_loss=mean,
                         final_loss_std=std, seconds=sum(r["seconds"] for r in runs) / len(runs),
                         expert_bytes_per_param=runs[0]["expert_report"].bytes_per_param,
                         model_bytes_per_param=runs[0]["model_report"].bytes_per_param))
    base = next((r["final_loss"] for r in rows if r["arm"] == BASELINE_ARM), None)
    for row in rows:
        row["gap"] = (row["final_loss"] - base) / base if base is not None else None
    return rows


def print_table(results: list[dict]) -> None:
    rows = summarize(results)
    seeds = max(r["seeds"] for r in rows)
    loss_header = "final loss" if seeds == 1 else f"final loss (mean ± sd, {seeds} seeds)"
    width, loss_width = max(24, max(len(r["arm"]) for r in rows) + 2), len(loss_header) + 2
    header = (f"{'arm':<{width}}{'start loss':>11}{loss_header:>{loss_width}}{'gap vs master':>15}"
              f"{'experts B/param':>17}{'model B/param':>15}{'time s':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        gap = f"{100 * r['gap']:+.2f}%" if r["gap"] is not None else "n/a"
        loss = f"{r['final_loss']:.4f}" if seeds == 1 else f"{r['final_loss']:.4f} ± {r['final_loss_std']:.4f}"
        print(f"{r['arm']:<{width}}{r['start_loss']:>11.4f}{loss:>{loss_width}}{gap:>15}"
              f"{r['expert_bytes_per_param']:>17.3f}{r['model_bytes_per_param']:>15.3f}{r['seconds']:>8.1f}")


# ---------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="local Hugging Face MoE checkpoint (default: a tiny Mixtral pre-trained here)")
    p.add_argument("--dataset", help="UTF-8 text file to fine-tune on (default: the stdlib's pydoc topics)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="with --model: run the checkpoint's own modeling code (DeepSeek-MoE-16B's original\n"
                        "checkpoint keeps its experts as a ModuleList of MLPs in remote code)")
    p.add_argument("--byte-tokens", action="store_true",
                   help="with --model: tokens are raw bytes (a model saved by this script has no tokenizer)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--group-size", type=int, default=None, help="INT4 group size (default: tensor-wise, the paper)")
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps per arm")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1 (beta2 is 0.98, as in the paper)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--state-dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--seed", type=int, default=0, help="seed of the pre-training and of the first fine-tuning run")
    p.add_argument("--seeds", type=int, default=1,
                   help="fine-tune every arm with seeds --seed .. --seed+N-1 (data order, rounding draws) from the\n"
                        "same pre-trained model, and report the mean and spread")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--memory-table", action="store_true",
                   help="only print the measured bytes/param of the expert weights in each memory setting")
    p.add_argument("--export", help="folder: export each ECO/naive arm's model in both eco.export forms")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: on shared cores, extra OpenMP threads spin and slow\n"
                        "every op by an order of magnitude; raise it on an idle machine)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                   help="dtype of the model's unquantized weights (default: bf16 on CUDA, fp32 on CPU)")
    tiny = p.add_argument_group("the default tiny model (ignored with --model)")
    tiny.add_argument("--hidden", type=int, default=64)
    tiny.add_argument("--layers", type=int, default=4)
    tiny.add_argument("--experts", type=int, default=8)
    tiny.add_argument("--pretrain-steps", type=int, default=400)
    tiny.add_argument("--pretrain-lr", type=float, default=2e-3)
    tiny.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "eco_moe_int4_finetune"),
                      help="where the pre-trained tiny model is saved (and reused when its settings match)")
    args = p.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    if args.seeds < 1:
        p.error(f"--seeds must be at least 1, got {args.seeds}")
    args.state_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.state_dtype]
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    args.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    return args


def pretrained_tiny_model(args, device, code_tokens: torch.Tensor) -> str:
    """Pre-train the tiny Mixtral in high precision on code and save it; reuse a saved one with the same settings."""
    from transformers import MixtralForCausalLM

    tag = f"h{args.hidden}-l{args.layers}-e{args.experts}-s{args.pretrain_steps}-lr{args.pretrain_lr}-seed{args.seed}"
    path = Path(args.workdir) / f"pretrained-{tag}"
    if (path / "config.json").is_file():
        print(f"reusing the pre-trained model in {path}")
        return str(path)
    torch.manual_seed(args.seed)
    config = tiny_mixtral_config(ByteTokenizer.vocab_size, args.hidden, args.layers, args.experts)
    model = MixtralForCausalLM(config).to(device)
    print(f"pre-training a tiny Mixtral ({sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{args.experts} experts) in fp32 on stdlib code for {args.pretrain_steps} steps")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, betas=(0.9, 0.98), weight_decay=0.1)
    set_initial_lr(optimizer, args.pretrain_lr)
    started = time.perf_counter()
    train(model, optimizer, code_tokens, args, args.pretrain_steps, seed=args.seed + 100, device=device,
          log_prefix="pretrain")
    print(f"  pre-training took {time.perf_counter() - started:.1f} s")
    model.save_pretrained(path)
    return str(path)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.memory_table:
        return memory_table(args)
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    if args.model and not args.byte_tokens:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        encode = lambda text: torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    else:
        encode = ByteTokenizer().encode
    finetune_text = None
    if args.model:
        model_path = args.model
    else:
        code_text, finetune_text = stdlib_corpus()
        model_path = pretrained_tiny_model(args, device, encode(code_text))
    if args.dataset:
        finetune_text = Path(args.dataset).read_text(encoding="utf-8")
    elif finetune_text is None:
        finetune_text = stdlib_corpus()[1]
    train_tokens, eval_tokens = split_tokens(encode(finetune_text))
    eval_sets = eval_batches(eval_tokens, args.batch_size, args.seq_len, args.eval_batches)

    def load_model():
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=args.dtype,
                                                     trust_remote_code=args.trust_remote_code)
        return model.to(device)

    print(f"fine-tuning on {len(train_tokens):,} tokens ({args.steps} steps x {args.batch_size} x {args.seq_len}), "
          f"experts in {eco.INT4(group_size=args.group_size)}, lr {args.lr}, arms: {', '.join(args.arms)}")
    results = [finetune_arm(arm, load_model, train_tokens, eval_sets, args, device, seed)
               for seed in range(args.seed, args.seed + args.seeds) for arm in args.arms]
    print()
    print(f"held-out loss after fine-tuning ({len(eval_sets) * args.batch_size} windows of {args.seq_len} tokens); "
          "B/param = static bytes per parameter from eco.memory_report (weights + optimizer state)")
    print_table(results)
    print(f"\ntotal wall time {time.perf_counter() - started:.1f} s")
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
