"""Fine-tune the tiny Mixture-of-Experts of moe_int4_finetune.py on several processes: FSDP2 shards the INT4
experts, eco.AdamW steps the shards, a distributed checkpoint is saved mid-run and resumed.

Everything distributed is PyTorch's own: ``fully_shard`` (FSDP2) shards every parameter along dim 0; a quantized
expert tensor stays quantized, each rank holding the codes and scales of its experts, and the all-gather before
forward and backward moves codes and scales (half a byte per parameter for INT4 instead of two for bf16).
``eco.AdamW`` updates each rank's shards in place. ``torch.distributed.checkpoint`` (DCP) saves model and
optimizer through ``get_state_dict`` and loads them through ``set_state_dict``, also on another number of ranks.

    torchrun --nproc-per-node 2 examples/fsdp2_finetune.py              # CPUs (gloo) or GPUs (nccl), unchanged
    torchrun --nproc-per-node 2 examples/fsdp2_finetune.py --resume     # continue from the saved checkpoint

By default the run trains ``--steps`` steps, saving a checkpoint after ``--save-at``; then, with
``--check-resume`` (on by default), it builds a fresh model and optimizer, loads that checkpoint, trains the
remaining steps again and checks that every rank ends with the same bits (codes, scales, optimizer states).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import eco
from eco.distributed import local_tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_int4_finetune import (  # noqa: E402 - the tiny MoE, its data and schedule
    ByteTokenizer,
    expert_filter,
    lm_loss,
    lr_at,
    random_batch,
    split_tokens,
    stdlib_corpus,
    tiny_mixtral_config,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--save-at", type=int, default=20, help="save a checkpoint after this many steps")
    p.add_argument("--checkpoint", default=os.path.join(tempfile.gettempdir(), "eco_fsdp2_finetune"),
                   help="DCP checkpoint folder")
    p.add_argument("--resume", action="store_true", help="load --checkpoint and train from the step it was saved at")
    p.add_argument("--no-check-resume", dest="check_resume", action="store_false",
                   help="skip reloading the mid-run checkpoint into a fresh model and comparing the final bits")
    p.add_argument("--rounding", choices=["stochastic", "nearest"], default="stochastic")
    p.add_argument("--group-size", type=int, default=None, help="INT4 group size (default: tensor-wise)")
    p.add_argument("--momentum", default="fp32", help="state format of m: fp32, bf16, int8, fp8 or 8bit")
    p.add_argument("--second-moment", default="fp32", help="state format of v: fp32, bf16, fp8, factored or 8bit")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4, help="per rank")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--bf16", action="store_true", help="MixedPrecisionPolicy(param_dtype=bfloat16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    args = p.parse_args(argv)
    if not 0 < args.save_at < args.steps:
        p.error("--save-at must lie between 0 and --steps")
    return args


def build(args, device):
    """The same tiny Mixtral on every rank (seeded), INT4 experts, FSDP2 per decoder layer, eco.AdamW."""
    from transformers import MixtralForCausalLM

    torch.manual_seed(args.seed)
    config = tiny_mixtral_config(ByteTokenizer.vocab_size, args.hidden, args.layers, args.experts)
    model = MixtralForCausalLM(config).to(device)
    eco.quantize_(model, eco.INT4(group_size=args.group_size), filter_fn=expert_filter)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if args.bf16 else None)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    optimizer = eco.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.1,
                          rounding=args.rounding, momentum=args.momentum, second_moment=args.second_moment,
                          seed=args.seed)
    return model, optimizer


def train(model, optimizer, tokens, args, steps, device, checkpoint_at=None) -> float:
    """Train ``steps`` (a range); each rank draws its own batches, seeded by step and rank (so a resume sees the
    same data). Returns the last step's loss, averaged over the ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    loss = torch.zeros((), device=device)
    for step in steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        generator = torch.Generator().manual_seed(args.seed + 1 + step * world + rank)
        batch = random_batch(tokens, args.batch_size, args.seq_len, generator).to(device)
        loss = lm_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        dist.all_reduce(loss)
        loss /= world
        if args.log_every and (step + 1) % args.log_every == 0 and rank == 0:
            print(f"  step {step + 1:>4}/{args.steps}  loss {loss.item():.4f}", flush=True)
        if checkpoint_at is not None and step + 1 == checkpoint_at:
            save_checkpoint(model, optimizer, step + 1, args.checkpoint)
    return loss.item()


def save_checkpoint(model, optimizer, step: int, path: str) -> None:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd, "trainer": {"step": step}}, checkpoint_id=path)
    if dist.get_rank() == 0:
        size = sum(f.stat().st_size for f in Path(path).iterdir())
        print(f"  saved a checkpoint after step {step} to {path} ({size / 2**20:.2f} MiB on disk)", flush=True)


def load_checkpoint(model, optimizer, path: str) -> int:
    """Load model and optimizer in place (resharded if the checkpoint was saved on another number of ranks)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "trainer": {"step": 0}}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return state["trainer"]["step"]


def fingerprint(model, optimizer) -> list[torch.Tensor]:
    """This rank's shards of everything a step depends on, 1-byte codes and states as bytes."""
    def as_bytes(t):
        return (t.view(torch.uint8) if t.dtype.itemsize == 1 else t).detach().clone()

    out = []
    for p in model.parameters():
        local = local_tensor(p)
        out += [as_bytes(local.codes), local.scales.clone()] if isinstance(local, eco.QuantizedTensor) else [
            as_bytes(local)]
        out += [as_bytes(local_tensor(v)) for v in optimizer.state[p].values() if isinstance(v, torch.Tensor)]
    return out


def report_memory(model, optimizer, world: int) -> None:
    """Bytes each rank holds (eco.memory_report counts a rank's shards), per parameter of the whole model."""
    report = eco.memory_report(model, optimizer)
    total_params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if expert_filter(n, p))
    lines = [f"rank {dist.get_rank()}: {report.total_bytes / 2**20:.3f} MiB static ({report.num_params:,} of "
             f"{total_params:,} parameters, {expert_params:,} of them in INT4 experts): "
             f"{report.total_bytes / total_params:.3f} bytes per model parameter on this rank"]
    for kind, nbytes in report.bytes_by_kind.items():
        lines.append(f"    {kind:<26}{nbytes / total_params:>8.3f} B/param")
    gathered = [None] * world
    dist.all_gather_object(gathered, "\n".join(lines))
    if dist.get_rank() == 0:
        print("\n".join(gathered), flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        tokens, _ = split_tokens(ByteTokenizer().encode(stdlib_corpus()[1]))
        started = time.perf_counter()
        model, optimizer = build(args, device)
        if rank == 0:
            print(f"{world} ranks ({dist.get_backend()}), experts in {eco.INT4(group_size=args.group_size)}, "
                  f"rounding {args.rounding}, states m {args.momentum} / v {args.second_moment}, {args.steps} steps "
                  f"of {args.batch_size} x {args.seq_len} per rank")
        if args.resume:
            start = load_checkpoint(model, optimizer, args.checkpoint)
            if rank == 0:
                print(f"resumed from {args.checkpoint} at step {start}")
            loss = train(model, optimizer, tokens, args, range(start, args.steps), device)
        else:
            loss = train(model, optimizer, tokens, args, range(args.steps), device, checkpoint_at=args.save_at)
        report_memory(model, optimizer, world)
        if rank == 0:
            print(f"final loss {loss:.4f}  ({time.perf_counter() - started:.1f} s)")
        if args.check_resume and not args.resume:
            expected = fingerprint(model, optimizer)
            del model, optimizer
            model, optimizer = build(args, device)
            start = load_checkpoint(model, optimizer, args.checkpoint)
            resumed_loss = train(model, optimizer, tokens, args, range(start, args.steps), device)
            same = all(torch.equal(a, b) for a, b in zip(expected, fingerprint(model, optimizer), strict=True))
            flags = [None] * world
            dist.all_gather_object(flags, same)
            if rank == 0:
                verdict = "bit-identical" if all(flags) else "DIFFERENT"
                print(f"resumed from step {start} in a fresh model and optimizer: final loss {resumed_loss:.4f}, "
                      f"every rank's codes, scales and optimizer states {verdict}")
            if not all(flags):
                return 1
        return 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
