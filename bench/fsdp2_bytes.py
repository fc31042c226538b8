"""Per-rank memory of an FSDP2-sharded MoE with eco's quantized experts, and the bytes each rank all-gathers per
training step, against the same model in bf16 FSDP2 with torch's AdamW.

    torchrun --standalone --nproc-per-node 2 bench/fsdp2_bytes.py [--out bench/results/fsdp2_bytes_ws2.json]

Every figure is measured: static bytes with ``eco.memory_report`` on each rank (a rank's shards: codes, scales,
unquantized parameters, optimizer states), all-gathered bytes by counting what FSDP2's all-gather sends (its
``set_custom_all_gather`` hook) during one forward + backward. Per-parameter figures divide by the parameters of
the whole (unsharded) model or expert set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather

import eco

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from moe_int4_finetune import ByteTokenizer, expert_filter, tiny_mixtral_config  # noqa: E402

ARMS = {
    "bf16 FSDP2, torch AdamW": dict(fmt=None),
    "INT4 tensor-wise, fp32 states": dict(fmt=eco.INT4()),
    "INT4 tensor-wise, bf16 states": dict(fmt=eco.INT4(), momentum="bf16", second_moment="bf16"),
    "INT4 tensor-wise, int8 m, fp8 v": dict(fmt=eco.INT4(), momentum="int8", second_moment="fp8"),
    "INT4 tensor-wise, int8 m, factored v": dict(fmt=eco.INT4(), momentum="int8", second_moment="factored"),
    "INT4 group 32, fp32 states": dict(fmt=eco.INT4(group_size=32)),
    "FP8 row, fp32 states": dict(fmt=eco.FP8()),
}


class CountingAllGather(DefaultAllGather):
    """FSDP2's default all-gather, adding up the bytes this rank sends."""

    def __init__(self):
        self.sent = 0

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        self.sent += input_tensor.numel() * input_tensor.element_size()
        return super().__call__(output_tensor, input_tensor, group, async_op)


def measure(arm: dict, args) -> dict:
    from transformers import MixtralForCausalLM

    torch.manual_seed(0)
    config = tiny_mixtral_config(ByteTokenizer.vocab_size, args.hidden, args.layers, args.experts)
    model = MixtralForCausalLM(config)
    if arm["fmt"] is not None:
        eco.quantize_(model, arm["fmt"], filter_fn=expert_filter)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)  # unquantized weights gather in bf16 in every arm
    expert_units = [layer.mlp.experts for layer in model.model.layers]  # experts: an FSDP unit of their own
    counters = {}
    for module in [*expert_units, *model.model.layers, model]:
        fully_shard(module, mp_policy=policy)
        counters[module] = CountingAllGather()
        module.set_custom_all_gather(counters[module])
    if arm["fmt"] is None:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        optimizer = eco.AdamW(model.parameters(), lr=1e-3, momentum=arm.get("momentum", "fp32"),
                              second_moment=arm.get("second_moment", "fp32"))
    batch = torch.randint(0, ByteTokenizer.vocab_size, (args.batch_size, args.seq_len),
                          generator=torch.Generator().manual_seed(dist.get_rank()))
    model(input_ids=batch, labels=batch).loss.backward()
    gathered = sum(c.sent for c in counters.values())
    gathered_experts = sum(counters[m].sent for m in expert_units)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    experts = [p for n, p in model.named_parameters() if expert_filter(n, p)]
    total_params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for p in experts)
    report = eco.memory_report(model, optimizer)
    expert_report = eco.memory_report(torch.nn.ParameterList(experts),
                                      SimpleNamespace(state={p: optimizer.state[p] for p in experts}))
    return dict(
        params=total_params, expert_params=expert_params, rank_bytes=report.total_bytes,
        rank_bytes_per_param=report.total_bytes / total_params,
        rank_expert_bytes_per_param=expert_report.total_bytes / expert_params,
        rank_bytes_by_kind=report.bytes_by_kind, all_gathered_bytes_per_step=gathered,
        all_gathered_bytes_per_param=gathered / total_params,
        expert_all_gathered_bytes_per_param=gathered_experts / expert_params,
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--out", help="write the results of every rank as JSON here")
    args = p.parse_args(argv)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        results = {name: measure(arm, args) for name, arm in ARMS.items()}
        every_rank = [None] * world
        dist.all_gather_object(every_rank, results)
        if rank == 0:
            first = every_rank[0][next(iter(ARMS))]
            print(f"{world} ranks; tiny Mixtral hidden {args.hidden}, {args.layers} layers, {args.experts} experts: "
                  f"{first['params']:,} parameters, {first['expert_params']:,} in experts")
            print("per parameter of the whole model (all) or of the experts; the rank holding the most; all-gather:"
                  " bytes one rank sends in one forward + backward")
            print(f"{'arm':<38}{'rank B/param':>14}{'experts':>10}{'all-gather B/param':>20}{'experts':>10}")
            for name in ARMS:
                worst = max(every_rank, key=lambda r: r[name]["rank_bytes"])[name]
                print(f"{name:<38}{worst['rank_bytes_per_param']:>14.3f}{worst['rank_expert_bytes_per_param']:>10.3f}"
                      f"{worst['all_gathered_bytes_per_param']:>20.3f}{worst['expert_all_gathered_bytes_per_param']:>10.3f}")
            if args.out:
                Path(args.out).write_text(json.dumps(dict(world_size=world, args=vars(args), ranks=every_rank),
                                                     indent=1, default=str))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
