"""Memory/loss benchmark: the paper's Table 1 arms at small scale, one command.

Trains the same small byte-level decoder-only transformer once per *arm*
(optimizer setup) with the same initial weights, data order and
hyper-parameters, and reports final validation loss next to the static
bytes/param that :func:`eco.memory_report` measures. Entry points: the
``eco-bench`` console script and ``python bench/memory_loss.py`` (the same)::

    python bench/memory_loss.py            # default run
    python bench/memory_loss.py --quick    # smoke run
    python bench/memory_loss.py --help

Arms (``--format fp8`` or ``int4``; quantized arms quantize the block linears
with :func:`eco.quantize_`, embeddings, norms and head stay fp32):

=============  ==========================================================
``master``     fp32 weights, ``torch.optim.AdamW`` (the high-precision baseline)
``master-rtn`` quantized weights + fp32 master copy, round-to-nearest
``master-sr``  quantized weights + fp32 master copy, stochastic rounding
``naive-rtn``  no master copy, no error feedback, round-to-nearest
``naive-sr``   no master copy, no error feedback, stochastic rounding
``eco-rtn``    ECO, round-to-nearest
``eco-sr``     ECO, stochastic rounding
``eco-sr-lowbit`` ECO, stochastic rounding, 8-bit m + factored v (``momentum="8bit", second_moment="factored"``)
``eco-sr-8bit`` ECO, stochastic rounding, 8-bit m + 8-bit v (``momentum="8bit", second_moment="8bit"``)
``eco-sr:M/V``  ECO, stochastic rounding, m in format M and v in format V (e.g. ``eco-sr:fp8/factored``)
``bnb8bit``    peer: bitsandbytes ``AdamW8bit`` on bf16 weights (when importable)
``optimi-kahan`` peer: torch-optimi ``AdamW`` with Kahan summation on bf16 weights
``torchao4bit`` peer: torchao ``AdamW4bit`` (4-bit m and v) on bf16 weights (when importable)
=============  ==========================================================

Each run happens in a fresh process, so its peak resident memory (RSS) is its
own; on a small model that figure is dominated by the Python/torch runtime,
and the static bytes/param column is the one that shows what ECO removes.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import multiprocessing
import os
import resource
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 256  # byte-level tokens

# ------------------------------------------------------------------ arms

QUANTIZED_ARMS = {
    # name: (label suffix, eco.AdamW keyword arguments)
    "master-rtn": ("+ master, RTN", dict(master_weights=True, rounding="nearest")),
    "master-sr": ("+ master, SR", dict(master_weights=True, rounding="stochastic")),
    "naive-rtn": ("naive (no master), RTN", dict(error_feedback=False, rounding="nearest")),
    "naive-sr": ("naive (no master), SR", dict(error_feedback=False, rounding="stochastic")),
    "eco-rtn": ("ECO, RTN", dict(rounding="nearest")),
    "eco-sr": ("ECO, SR", dict(rounding="stochastic")),
    "eco-sr-lowbit": ("ECO, SR, 8-bit m + factored v",
                      dict(rounding="stochastic", momentum="8bit", second_moment="factored")),
    "eco-sr-8bit": ("ECO, SR, 8-bit m + 8-bit v",
                    dict(rounding="stochastic", momentum="8bit", second_moment="8bit")),
}
STATE_ARM_PREFIX = "eco-sr:"  # "eco-sr:M/V": ECO-SR with momentum=M, second_moment=V
PEER_ARMS = {
    # name: (label, module that must be importable)
    "bnb8bit": ("bitsandbytes AdamW8bit, bf16 weights", "bitsandbytes"),
    "optimi-kahan": ("optimi AdamW + Kahan, bf16 weights", "optimi"),
    "torchao4bit": ("torchao AdamW4bit, bf16 weights", "torchao"),
}
ALL_ARMS = ("master", *QUANTIZED_ARMS, *PEER_ARMS)


def state_arm_options(arm: str) -> dict | None:
    """The ``eco.AdamW`` options of a ``"eco-sr:M/V"`` arm, or None for any other arm name."""
    if not arm.startswith(STATE_ARM_PREFIX):
        return None
    momentum, _, second_moment = arm[len(STATE_ARM_PREFIX):].partition("/")
    if not momentum or not second_moment:
        raise ValueError(f"a state-format arm is spelled {STATE_ARM_PREFIX}M/V (e.g. eco-sr:int8/factored), "
                         f"got {arm!r}")
    return dict(rounding="stochastic", momentum=momentum, second_moment=second_moment)


def check_state_arm(arm: str) -> None:
    """Raise ValueError now (not in a worker process later) if a ``"eco-sr:M/V"`` arm names an unknown format."""
    options = state_arm_options(arm)
    if options is not None:
        from eco import states

        states.momentum_format(options["momentum"])
        states.second_moment_format(options["second_moment"])


def quantized_arm_options(arm: str) -> dict | None:
    """``eco.AdamW`` keyword arguments of a quantized-weight arm, or None for another arm."""
    if arm in QUANTIZED_ARMS:
        return dict(QUANTIZED_ARMS[arm][1])
    return state_arm_options(arm)


def arm_label(arm: str, fmt_name: str) -> str:
    if arm == "master":
        return "fp32 master weights (torch AdamW)"
    if arm in QUANTIZED_ARMS:
        return f"{fmt_name.upper()} {QUANTIZED_ARMS[arm][0]}"
    if arm.startswith(STATE_ARM_PREFIX):
        return f"{fmt_name.upper()} ECO, SR, m/v {arm[len(STATE_ARM_PREFIX):]}"
    return PEER_ARMS[arm][0]


def peer_unavailable_reason(arm: str) -> str | None:
    """Why a peer arm cannot run here, or None when it can."""
    module = PEER_ARMS[arm][1]
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed (pip install 'eco-optim[peers]')"
    try:
        __import__(module)
    except Exception as exc:  # a broken install must not stop the benchmark
        return f"{module} failed to import: {type(exc).__name__}: {exc}"
    return None


# ------------------------------------------------------------------ settings

@dataclasses.dataclass
class BenchConfig:
    """Every knob of a run; the same values apply to every arm."""

    steps: int = 300
    warmup: int = 30
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at min_lr_ratio * lr (the paper's 0.1x)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip: float = 1.0
    batch_size: int = 16
    seq_len: int = 64
    d_model: int = 256  # 3.30M params, 95.5% of them in the quantized block linears
    n_layers: int = 4
    n_heads: int = 4
    eval_every: int = 25
    eval_batches: int = 4  # validation batches along the way
    final_eval_batches: int = 32  # validation batches for the final loss (the same windows for every run)
    format: str = "fp8"
    state_dtype: str = "bfloat16"  # optimizer states of the no-master arms (naive, ECO)
    arms: tuple[str, ...] = ALL_ARMS
    seeds: int = 3
    # and every "eco-sr:M/V" arm:
    multi_seed_arms: tuple[str, ...] = ("master", "eco-sr", "eco-sr-lowbit", "eco-sr-8bit")
    device: str = "cpu"
    threads: int = 0  # 0: all cores
    data: str | None = None
    out: str = "bench/results"
    name: str = "memory_loss"
    progress: bool = True
    reuse: str | None = None  # results JSON of an earlier run whose format-independent runs are taken over


PRESETS = {
    "default": {},
    "quick": dict(steps=60, warmup=6, d_model=128, n_layers=2, batch_size=8, seq_len=64, eval_every=20,
                  eval_batches=2, final_eval_batches=4, seeds=2, name="memory_loss_quick"),
}


# ------------------------------------------------------------------ data

def stdlib_files() -> list[Path]:
    """Every ``*.py`` of the running Python's standard library, sorted (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def load_corpus(data: str | None, val_every: int = 10) -> tuple[np.ndarray, np.ndarray, str]:
    """Byte tokens ``(train, val, description)``.

    Default corpus: the standard library's source, every ``val_every``-th file
    (in sorted order) held out for validation. ``data``: one text file, its
    last 10% held out.
    """
    if data is not None:
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"--data {data}: no such file; pass a text file (UTF-8 or any bytes)")
        raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
        cut = int(len(raw) * 0.9)
        train, val, desc = raw[:cut], raw[cut:], f"{path.name} (last 10% held out)"
    else:
        files = stdlib_files()
        if len(files) < val_every * 2:
            raise RuntimeError(f"found only {len(files)} standard-library files; pass --data FILE instead")
        train_parts, val_parts = [], []
        for i, f in enumerate(files):
            (val_parts if i % val_every == 0 else train_parts).append(f.read_bytes())
        train = np.frombuffer(b"".join(train_parts), dtype=np.uint8)
        val = np.frombuffer(b"".join(val_parts), dtype=np.uint8)
        desc = (f"Python {sys.version.split()[0]} standard library source ({len(files)} files, "
                f"every {val_every}th held out)")
    return train, val, desc


def check_corpus(train: np.ndarray, val: np.ndarray, seq_len: int) -> None:
    for name, arr in (("training", train), ("validation", val)):
        if len(arr) <= seq_len + 1:
            raise ValueError(f"the {name} split has {len(arr)} bytes, fewer than seq_len+1={seq_len + 1}; "
                             "use a larger --data file or a smaller --seq-len")


def windows(tokens: np.ndarray, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets for windows starting at ``starts``."""
    idx = starts.numpy()[:, None] + np.arange(seq_len + 1)[None, :]
    chunk = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return chunk[:, :-1], chunk[:, 1:]


# ------------------------------------------------------------------ model

class Block(nn.Module):
    """Pre-norm transformer block; its four ``nn.Linear`` are what ``eco.quantize_`` quantizes."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(d_model, bias=False)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.norm2 = nn.LayerNorm(d_model, bias=False)
        self.fc1 = nn.Linear(d_model, 4 * d_model, bias=False)
        self.fc2 = nn.Linear(4 * d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ByteLM(nn.Module):
    """A small decoder-only language model over bytes (embedding and ``lm_head`` stay high precision)."""

    def __init__(self, d_model: int, n_layers: int, n_heads: int, seq_len: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
        self.tok_emb = nn.Embedding(VOCAB, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model, bias=False)
        self.lm_head = nn.Linear(d_model, VOCAB, bias=False)
        for name, p in self.named_parameters():
            if p.dim() >= 2:  # GPT-2 init; residual projections scaled by depth
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("proj.weight", "fc2.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


# ------------------------------------------------------------------ one run

def forward(model: nn.Module, tokens: torch.Tensor, upcast: bool) -> torch.Tensor:
    """Logits; ``upcast`` computes in fp32 from bf16 weights (as the quantized arms compute from their codes)."""
    if not upcast:
        return model(tokens)
    params = {name: p.float() for name, p in model.named_parameters()}
    return torch.func.functional_call(model, params, (tokens,))


def lr_at(step: int, cfg: BenchConfig) -> float:
    """Linear warmup to ``lr`` then cosine decay to ``min_lr_ratio * lr`` (step counts from 1)."""
    if step <= cfg.warmup:
        return cfg.lr * step / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms); the same split for every arm."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_arm(arm: str, cfg: BenchConfig, seed: int, device: torch.device):
    """The model (same initial weights for a given seed) and optimizer of one arm."""
    import eco

    torch.manual_seed(seed)
    model = ByteLM(cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.seq_len)
    common = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if arm == "master":
        model.to(device)
        return model, torch.optim.AdamW(param_groups(model, cfg.weight_decay), **common)
    options = quantized_arm_options(arm)
    if options is not None:
        fmt = eco.FP8() if cfg.format == "fp8" else eco.INT4(group_size=128)
        model.to(device)
        eco.quantize_(model, fmt)
        if "momentum" not in options:
            # Master-weight arms keep the usual fp32 states; the no-master arms the low-memory setting.
            options["state_dtype"] = (torch.float32 if options.get("master_weights")
                                      else getattr(torch, cfg.state_dtype))
        opt = eco.AdamW(param_groups(model, cfg.weight_decay), **common, seed=seed, **options)
        return model, opt
    model.to(device=device, dtype=torch.bfloat16)
    groups = param_groups(model, cfg.weight_decay)
    if arm == "bnb8bit":
        import bitsandbytes as bnb

        return model, bnb.optim.AdamW8bit(groups, **common)
    if arm == "optimi-kahan":
        import optimi

        return model, optimi.AdamW(groups, **common, kahan_sum=True)
    if arm == "torchao4bit":
        import torchao.optim

        return model, torchao.optim.AdamW4bit(groups, **common)
    raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ALL_ARMS)}")


@torch.no_grad()
def evaluate(model: nn.Module, val: np.ndarray, starts: torch.Tensor, cfg: BenchConfig, device, upcast: bool) -> float:
    model.eval()
    losses = []
    for chunk in starts.split(cfg.batch_size):
        x, y = windows(val, chunk, cfg.seq_len)
        logits = forward(model, x.to(device), upcast)
        losses.append(F.cross_entropy(logits.float().reshape(-1, VOCAB), y.to(device).reshape(-1)).item())
    model.train()
    return float(np.mean(losses))


def run_arm(arm: str, seed: int, cfg_dict: dict, data_dir: str) -> dict:
    """Train one arm with one seed; returns its curves and measurements. Runs in its own process."""
    import eco

    cfg = BenchConfig(**cfg_dict)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    train = np.load(Path(data_dir) / "train.npy", mmap_mode="r")
    val = np.load(Path(data_dir) / "val.npy", mmap_mode="r")
    # Same data order for every arm of a seed; one validation set for every run.
    batch_gen = torch.Generator().manual_seed(1000 + seed)
    val_starts = torch.randint(0, len(val) - cfg.seq_len - 1, (cfg.final_eval_batches * cfg.batch_size,),
                               generator=torch.Generator().manual_seed(12345))
    curve_starts = val_starts[: cfg.eval_batches * cfg.batch_size]
    model, opt = build_arm(arm, cfg, seed, device)
    upcast = arm in PEER_ARMS  # bf16 weights, fp32 compute: only the weight storage differs between arms
    rss_before_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    steps, train_loss, eval_steps, val_loss = [], [], [0], [evaluate(model, val, curve_starts, cfg, device, upcast)]
    report, diverged, skipped = None, False, 0
    label = arm_label(arm, cfg.format)
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, desc=f"{label} (seed {seed})"[:60], leave=False, dynamic_ncols=True,
                   file=sys.stderr)
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            if isinstance(group["lr"], torch.Tensor):  # torchao keeps lr as a tensor, updated in place
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        x, y = windows(train, torch.randint(0, len(train) - cfg.seq_len - 1, (cfg.batch_size,),
                                            generator=batch_gen), cfg.seq_len)
        logits = forward(model, x.to(device), upcast)
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), y.to(device).reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if report is None:  # after the first step every optimizer state exists
            report = eco.memory_report(model, opt)
        value = loss.item()
        steps.append(step)
        train_loss.append(value)
        skipped = getattr(opt, "skipped_steps", 0)
        if not math.isfinite(value) or value > math.log(VOCAB) + 2 or skipped > 10:
            diverged = True
        if step % cfg.eval_every == 0 or step == cfg.steps or diverged:
            eval_steps.append(step)
            val_loss.append(evaluate(model, val, curve_starts, cfg, device, upcast))
            diverged = diverged or not math.isfinite(val_loss[-1])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}", val=f"{val_loss[-1]:.3f}")
        if diverged:
            break
    final_val_loss = float("nan") if diverged else evaluate(model, val, val_starts, cfg, device, upcast)
    wall = time.perf_counter() - start
    if bar is not None:
        bar.close()
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = dict(
        arm=arm, label=label, seed=seed, steps=steps, train_loss=train_loss, eval_steps=eval_steps,
        val_loss=val_loss, final_val_loss=final_val_loss, diverged=diverged,
        skipped_steps=skipped, memory=report.as_dict(), static_bytes_per_param=report.bytes_per_param,
        peak_rss_mib=peak_rss_mib, rss_before_training_mib=rss_before_mib, wall_s=wall,
    )
    if device.type == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


# ------------------------------------------------------------------ many runs

#: settings that do not change what a run computes (output, scheduling, which arms and formats are run)
_NOT_TRAINING = {"format", "arms", "seeds", "multi_seed_arms", "threads", "out", "name", "progress", "reuse"}


def format_independent(arm: str) -> bool:
    """The fp32 master and peer arms never quantize: the same run for ``--format fp8`` and ``int4``."""
    return arm == "master" or arm in PEER_ARMS


def reusable_runs(cfg: BenchConfig) -> dict[tuple[str, int], dict]:
    """``{(arm, seed): result}`` of the format-independent runs in ``cfg.reuse`` (a results JSON), which must
    come from the same training settings."""
    if not cfg.reuse:
        return {}
    earlier = json.loads(Path(cfg.reuse).read_text())
    ours = json.loads(json.dumps(dataclasses.asdict(cfg), default=_json_default))
    differ = sorted(k for k in ours if k not in _NOT_TRAINING and earlier["config"].get(k) != ours[k])
    if differ:
        raise ValueError(f"--reuse {cfg.reuse}: its runs used other settings ({', '.join(differ)}); rerun them "
                         "instead")
    return {(r["arm"], r["seed"]): r for r in earlier["runs"] if format_independent(r["arm"])}


def plan_runs(cfg: BenchConfig) -> tuple[list[tuple[str, int]], list[str]]:
    """The ``(arm, seed)`` runs to do, and a printed line for every peer arm skipped."""
    runs, notes = [], []
    for arm in cfg.arms:
        if arm in PEER_ARMS:
            reason = peer_unavailable_reason(arm)
            if reason is not None:
                notes.append(f"skipping peer arm {arm} ({PEER_ARMS[arm][0]}): {reason}")
                continue
        multi_seed = arm in cfg.multi_seed_arms or arm.startswith(STATE_ARM_PREFIX)
        seeds = range(cfg.seeds) if multi_seed else range(1)
        runs.extend((arm, seed) for seed in seeds)
    return runs, notes


def summarize(runs: list[dict], baseline: str = "master") -> list[dict]:
    """One row per arm: mean/spread of the final validation loss over seeds, gap to ``baseline``."""
    by_arm: dict[str, list[dict]] = {}
    for r in runs:
        by_arm.setdefault(r["arm"], []).append(r)
    rows = []
    for arm, rs in by_arm.items():
        finals = [r["final_val_loss"] for r in rs]
        finite = [f for f in finals if math.isfinite(f)]
        rows.append(dict(
            arm=arm, label=rs[0]["label"], seeds=len(rs), diverged=sum(r["diverged"] for r in rs),
            final_val_loss=statistics.mean(finite) if len(finite) == len(finals) else float("nan"),
            final_val_loss_std=statistics.stdev(finite) if len(finite) > 1 else 0.0,
            final_val_loss_min=min(finite, default=float("nan")), final_val_loss_max=max(finite, default=float("nan")),
            static_bytes_per_param=rs[0]["static_bytes_per_param"],
            peak_rss_mib=max(r["peak_rss_mib"] for r in rs), wall_s=statistics.mean(r["wall_s"] for r in rs),
        ))
    base = next((row["final_val_loss"] for row in rows if row["arm"] == baseline), float("nan"))
    for row in rows:
        row["gap_pct"] = 100 * (row["final_val_loss"] / base - 1) if math.isfinite(base) else float("nan")
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| arm | final val loss | gap to master | static bytes/param | peak RSS (MiB) | wall time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["diverged"]:
            loss, gap = f"diverged ({row['diverged']}/{row['seeds']} seeds)", "-"
        else:
            loss = f"{row['final_val_loss']:.4f}"
            if row["seeds"] > 1:
                loss += (f" ± {row['final_val_loss_std']:.4f} ({row['seeds']} seeds, "
                         f"{row['final_val_loss_min']:.4f}-{row['final_val_loss_max']:.4f})")
            gap = f"{row['gap_pct']:+.2f}%"
        lines.append(f"| {row['label']} | {loss} | {gap} | {row['static_bytes_per_param']:.2f} | "
                     f"{row['peak_rss_mib']:.0f} | {row['wall_s']:.0f} |")
    return "\n".join(lines)


def plot(runs: list[dict], rows: list[dict], path: Path, title: str) -> None:
    """Validation-loss curves (mean over seeds, band = min..max) and static memory vs final loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_curve, ax_pareto) = plt.subplots(1, 2, figsize=(14, 5.5))
    colors = plt.get_cmap("tab10")
    for i, row in enumerate(rows):
        rs = [r for r in runs if r["arm"] == row["arm"]]
        n = min(len(r["val_loss"]) for r in rs)
        steps = rs[0]["eval_steps"][:n]
        curves = np.array([r["val_loss"][:n] for r in rs])
        ax_curve.plot(steps, curves.mean(0), color=colors(i), label=row["label"] + (" (diverged)" if row["diverged"]
                                                                                  else ""))
        if len(rs) > 1:
            ax_curve.fill_between(steps, curves.min(0), curves.max(0), color=colors(i), alpha=0.2)
        if not row["diverged"]:
            ax_pareto.errorbar(row["static_bytes_per_param"], row["final_val_loss"], yerr=row["final_val_loss_std"],
                               fmt="o", color=colors(i), capsize=3)
            ax_pareto.annotate(row["label"], (row["static_bytes_per_param"], row["final_val_loss"]), fontsize=7,
                               xytext=(4, 3), textcoords="offset points")
    finals = [r["final_val_loss"] for r in rows if not r["diverged"]]
    if finals:  # zoom on the end of training, where the arms separate
        lo, hi = min(finals), max(finals)
        ax_curve.set_ylim(lo - 0.1, max(hi + 0.4, lo + 0.8))
    ax_curve.set(xlabel="step", ylabel="validation loss (nats/byte)", title="validation loss")
    ax_curve.legend(fontsize=7)
    ax_curve.grid(alpha=0.3)
    ax_pareto.set(xlabel="static bytes/param (eco.memory_report)", ylabel="final validation loss",
                  title="static memory vs final loss (lower left is better)")
    ax_pareto.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_benchmark(cfg: BenchConfig, jobs: int = 1, log=print, command: str = "eco-bench") -> dict:
    """Run every planned arm (each in a fresh process) and write ``<name>.json/.md/.png`` to ``cfg.out``."""
    unknown = [a for a in cfg.arms if a not in ALL_ARMS and not a.startswith(STATE_ARM_PREFIX)]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; choose from {', '.join(ALL_ARMS)} or {STATE_ARM_PREFIX}M/V")
    for arm in cfg.arms:
        check_state_arm(arm)
    if cfg.format not in ("fp8", "int4"):
        raise ValueError(f"--format must be fp8 or int4, got {cfg.format!r}")
    if cfg.format == "int4" and cfg.d_model % 128:
        raise ValueError(f"INT4 uses groups of 128 along rows: --d-model ({cfg.d_model}) must be a multiple of 128")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    train, val, corpus = load_corpus(cfg.data)
    check_corpus(train, val, cfg.seq_len)
    runs_planned, notes = plan_runs(cfg)
    reusable = reusable_runs(cfg)
    reused = [reusable[run] for run in runs_planned if run in reusable]
    runs_planned = [run for run in runs_planned if run not in reusable]
    if reused:
        notes.append(f"{len(reused)} runs of format-independent arms "
                     f"({', '.join(dict.fromkeys(r['arm'] for r in reused))}) taken from {cfg.reuse}")
    for note in notes:
        log(note)
    log(f"corpus: {corpus}: {len(train):,} training bytes, {len(val):,} validation bytes")
    log(f"{len(runs_planned)} training runs of {cfg.steps} steps ({cfg.format}), {jobs} at a time")
    start = time.perf_counter()
    cfg_dict = dataclasses.asdict(cfg)
    results = list(reused)
    with tempfile.TemporaryDirectory() as data_dir:
        np.save(Path(data_dir) / "train.npy", train)
        np.save(Path(data_dir) / "val.npy", val)
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(processes=jobs, maxtasksperchild=1) as pool:
            pending = [pool.apply_async(run_arm, (arm, seed, cfg_dict, data_dir)) for arm, seed in runs_planned]
            for handle in pending:
                r = handle.get()
                final = "diverged" if r["diverged"] else f"{r['final_val_loss']:.4f}"
                log(f"  {r['label']:<40} seed {r['seed']}: final val loss {final}, "
                    f"{r['static_bytes_per_param']:.2f} bytes/param, {r['wall_s']:.0f} s")
                results.append(r)
    total = time.perf_counter() - start
    rows = summarize(results)
    table = markdown_table(rows)
    n_params = results[0]["memory"]["num_params"] if results else 0
    title = (f"{cfg.format.upper()} | {n_params / 1e6:.2f}M params, {cfg.steps} steps, lr {cfg.lr:g}, batch "
             f"{cfg.batch_size}x{cfg.seq_len} bytes | {corpus}")
    payload = dict(command=command, config=cfg_dict, corpus=corpus, skipped=notes, total_wall_s=total,
                   device=_device_name(cfg), torch=torch.__version__, summary=rows, runs=results)
    (out / f"{cfg.name}.json").write_text(json.dumps(payload, indent=1, default=_json_default))
    (out / f"{cfg.name}.md").write_text(
        f"{title}\n\nCommand: `{command}` ({total / 60:.1f} min on {payload['device']})\n\n{table}\n"
        + "".join(f"\n{note}" for note in notes)
    )
    plot(results, rows, out / f"{cfg.name}.png", title)
    log("\n" + table)
    log(f"\nwrote {out / cfg.name}.{{json,md,png}} in {total / 60:.1f} min")
    return payload


def _device_name(cfg: BenchConfig) -> str:
    if cfg.device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(cfg.device))
    return f"CPU, {cfg.threads or os.cpu_count()} threads"


def _json_default(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return str(obj)


# ------------------------------------------------------------------ command line

def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, int]:
    defaults = BenchConfig()
    p = argparse.ArgumentParser(
        prog="eco-bench", description="Memory/loss benchmark: ECO vs master-weight and naive quantized training.")
    p.add_argument("--quick", action="store_true", help="a smoke run of a minute or two (small model, few steps)")
    p.add_argument("--format", choices=("fp8", "int4"), help="fp8 (row scales) or int4 (groups of 128)")
    p.add_argument("--arms", help=f"comma-separated subset of: {', '.join(ALL_ARMS)}, or {STATE_ARM_PREFIX}M/V "
                   "(ECO-SR with momentum=M, second_moment=V)")
    p.add_argument("--steps", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {defaults.lr:g})")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--d-model", type=int)
    p.add_argument("--n-layers", type=int)
    p.add_argument("--n-heads", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-batches", type=int)
    p.add_argument("--seeds", type=int, help=f"seeds for the multi-seed arms ({', '.join(defaults.multi_seed_arms)}, "
                   f"{STATE_ARM_PREFIX}M/V)")
    p.add_argument("--state-dtype", choices=("bfloat16", "float32"), help="optimizer states of naive/ECO arms")
    p.add_argument("--data", help="train on this text file instead of the standard library source")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch threads per run (default 1: small matmuls gain little from "
                   "more, and a busy machine makes extra threads spin)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="runs at a time, each in its own process (default: 2, or 1 on a 1-core machine)")
    p.add_argument("--out", help=f"output folder (default {defaults.out})")
    p.add_argument("--name", help="output file stem (default memory_loss[_quick][_int4])")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--reuse", metavar="JSON", help="take the runs of the format-independent arms (master, peers) "
                   "from an earlier results JSON with the same settings, e.g. --format int4 --reuse "
                   "bench/results/memory_loss.json")
    args = p.parse_args(argv)

    values = dict(PRESETS["quick" if args.quick else "default"])
    for field in ("format", "steps", "warmup", "lr", "batch_size", "seq_len", "d_model", "n_layers", "n_heads",
                  "eval_every", "eval_batches", "seeds", "state_dtype", "data", "device", "threads", "out", "name",
                  "reuse"):
        value = getattr(args, field)
        if value is not None:
            values[field] = value
    if args.arms:
        values["arms"] = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    if args.name is None and values.get("format") == "int4":
        values["name"] = values.get("name", defaults.name) + "_int4"
    if args.device is None:
        values["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    if args.threads is None:
        values["threads"] = 1
    values["progress"] = not args.no_progress
    cfg = BenchConfig(**values)
    for field in ("steps", "warmup", "batch_size", "seq_len", "d_model", "n_layers", "n_heads", "eval_every",
                  "eval_batches", "final_eval_batches", "seeds"):
        if getattr(cfg, field) < 1:
            p.error(f"--{field.replace('_', '-')} must be >= 1")
    if cfg.warmup >= cfg.steps:
        p.error(f"--warmup ({cfg.warmup}) must be smaller than --steps ({cfg.steps})")
    return cfg, args.jobs


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, jobs = parse_args(argv)
    try:
        run_benchmark(cfg, jobs=jobs, command=" ".join(["eco-bench", *argv]))
    except (ValueError, FileNotFoundError) as exc:
        print(f"eco-bench: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from eco_bench.memory_loss import main as _main  # the installed module, which spawned workers import run_arm from

    sys.exit(_main())
