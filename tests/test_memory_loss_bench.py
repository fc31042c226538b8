"""The memory/loss benchmark (``eco_bench.memory_loss``, ``eco-bench``): a tiny end-to-end run and its pieces."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import eco
from eco_bench import memory_loss as B

TINY = ["--steps", "6", "--warmup", "2", "--d-model", "32", "--n-layers", "1", "--n-heads", "2",
        "--batch-size", "2", "--seq-len", "16", "--eval-every", "3", "--eval-batches", "1", "--seeds", "2",
        "--threads", "1", "--jobs", "2", "--no-progress"]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("def add(a, b):\n    return a + b\n\n" * 200)
    return path


def test_tiny_run_writes_well_formed_outputs(tmp_path, text_file, capsys):
    out = tmp_path / "results"
    arms = "master,master-sr,naive-rtn,eco-sr"
    assert B.main([*TINY, "--arms", arms, "--data", str(text_file), "--out", str(out), "--name", "t"]) == 0
    printed = capsys.readouterr().out

    payload = json.loads((out / "t.json").read_text())
    assert [row["arm"] for row in payload["summary"]] == arms.split(",")
    runs = payload["runs"]
    assert len(runs) == 6  # master and eco-sr over 2 seeds
    assert sorted(r["seed"] for r in runs if r["arm"] == "eco-sr") == [0, 1]
    for r in runs:
        assert r["steps"] == list(range(1, 7)) and len(r["train_loss"]) == 6
        assert r["eval_steps"] == [0, 3, 6] and len(r["val_loss"]) == 3
        assert all(math.isfinite(x) for x in r["train_loss"] + r["val_loss"])
        assert math.isfinite(r["final_val_loss"]) and not r["diverged"]
        assert r["peak_rss_mib"] > 0 and r["wall_s"] > 0
    by_arm = {row["arm"]: row for row in payload["summary"]}
    assert by_arm["master"]["gap_pct"] == 0.0
    # Static memory from eco.memory_report: fp32 weights + two fp32 moments, and less without the master copy.
    assert by_arm["master"]["static_bytes_per_param"] == pytest.approx(12.0)
    assert by_arm["eco-sr"]["static_bytes_per_param"] < by_arm["master-sr"]["static_bytes_per_param"] - 4
    assert by_arm["eco-sr"]["seeds"] == 2 and by_arm["naive-rtn"]["seeds"] == 1

    table = (out / "t.md").read_text()
    assert "| arm | final val loss | gap to master | static bytes/param |" in table
    for row in payload["summary"]:
        assert f"| {row['label']} |" in table and row["label"] in printed
    png = (out / "t.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

    # A second run takes the format-independent runs (master, peers) over from the first instead of rerunning.
    reuse = ["--data", str(text_file), "--out", str(out), "--name", "t2", "--reuse", str(out / "t.json")]
    assert B.main([*TINY, "--arms", "master,naive-rtn", *reuse]) == 0
    second = json.loads((out / "t2.json").read_text())
    assert [r for r in second["runs"] if r["arm"] == "master"] == [r for r in runs if r["arm"] == "master"]
    assert [r["arm"] for r in second["runs"]] == ["master", "master", "naive-rtn"]
    assert "taken from" in (out / "t2.md").read_text()
    capsys.readouterr()
    assert B.main([*TINY, "--arms", "master,naive-rtn", *reuse, "--steps", "5"]) == 2
    assert "its runs used other settings (steps)" in capsys.readouterr().err


@pytest.mark.parametrize("arm", sorted(B.PEER_ARMS))
def test_peer_arm_trains_on_bf16_weights(arm, tmp_path, text_file):
    reason = B.peer_unavailable_reason(arm)
    if reason is not None:
        pytest.skip(f"optional peer not importable: {reason}")
    train, val, _ = B.load_corpus(str(text_file))
    np.save(tmp_path / "train.npy", train)
    np.save(tmp_path / "val.npy", val)
    cfg = B.BenchConfig(steps=4, warmup=1, d_model=32, n_layers=1, n_heads=2, batch_size=2, seq_len=16,
                        eval_every=2, eval_batches=1, final_eval_batches=1, progress=False, threads=1)
    result = B.run_arm(arm, 0, dataclasses.asdict(cfg), str(tmp_path))  # in this process
    assert not result["diverged"] and math.isfinite(result["final_val_loss"])
    assert result["memory"]["bytes_by_kind"]["unquantized params"] == 2 * result["memory"]["num_params"]  # bf16
    assert result["static_bytes_per_param"] < 12.0


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    cfg = B.BenchConfig(steps=100, warmup=10, lr=2e-3)
    assert B.lr_at(1, cfg) == pytest.approx(2e-4)
    assert B.lr_at(10, cfg) == pytest.approx(2e-3)
    assert B.lr_at(100, cfg) == pytest.approx(2e-4)
    decay = [B.lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False))


def test_arms_start_from_the_same_weights_and_quantize_only_block_linears():
    cfg = B.BenchConfig(d_model=32, n_layers=2, n_heads=2, seq_len=16)
    master, _ = B.build_arm("master", cfg, seed=3, device=torch.device("cpu"))
    quantized, opt = B.build_arm("eco-sr", cfg, seed=3, device=torch.device("cpu"))
    names = [n for n, _ in eco.quantized_parameters(quantized)]
    assert names == [f"blocks.{i}.{leaf}.weight" for i in range(2) for leaf in ("qkv", "proj", "fc1", "fc2")]
    reference = dict(master.named_parameters())
    for name, p in quantized.named_parameters():
        if name in names:
            codes, scales = eco.FP8().quantize(reference[name].detach())
            assert torch.equal(p.codes.float(), codes.float()) and torch.equal(p.scales, scales)
        else:
            assert torch.equal(p, reference[name])
    assert isinstance(opt, eco.AdamW) and opt.state_dtype == torch.bfloat16
    assert opt.defaults["error_feedback"] and not opt.defaults["master_weights"]


def test_unavailable_peer_is_skipped_with_a_line(monkeypatch):
    real = B.importlib.util.find_spec
    monkeypatch.setattr(B.importlib.util, "find_spec", lambda name: None if name == "optimi" else real(name))
    runs, notes = B.plan_runs(B.BenchConfig(arms=("master", "optimi-kahan"), seeds=3))
    assert runs == [("master", 0), ("master", 1), ("master", 2)]
    assert len(notes) == 1 and "optimi-kahan" in notes[0] and "not installed" in notes[0]


def test_summary_reports_gap_spread_and_divergence():
    def run(arm, seed, final, diverged=False):
        return dict(arm=arm, label=arm, seed=seed, final_val_loss=final, diverged=diverged,
                    static_bytes_per_param=5.0, peak_rss_mib=100.0, wall_s=1.0)

    rows = B.summarize([run("master", 0, 2.0), run("master", 1, 2.2), run("eco-sr", 0, 2.31),
                        run("naive-rtn", 0, float("nan"), diverged=True)])
    by_arm = {r["arm"]: r for r in rows}
    assert by_arm["master"]["final_val_loss"] == pytest.approx(2.1)
    assert by_arm["master"]["final_val_loss_std"] == pytest.approx(0.1414, abs=1e-4)
    assert by_arm["eco-sr"]["gap_pct"] == pytest.approx(10.0)
    assert math.isnan(by_arm["naive-rtn"]["gap_pct"])
    table = B.markdown_table(rows)
    assert "| naive-rtn | diverged (1/1 seeds) | - |" in table
    assert "2.1000 ± 0.1414 (2 seeds" in table


def test_bad_input_gets_a_clear_error(tmp_path, capsys):
    assert B.main(["--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path), "--no-progress"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert B.main(["--arms", "master,adam9", "--out", str(tmp_path)]) == 2
    assert "unknown arm" in capsys.readouterr().err
    assert B.main(["--format", "int4", "--d-model", "96", "--n-heads", "2", "--out", str(tmp_path)]) == 2
    assert "multiple of 128" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        B.parse_args(["--steps", "10", "--warmup", "10"])


def test_default_corpus_is_the_stdlib_source_split_by_file():
    train, val, desc = B.load_corpus(None)
    assert "standard library" in desc
    assert len(train) > 1_000_000 and len(val) > 100_000
    assert 5 < len(train) / len(val) < 20  # every 10th file held out
    text = bytes(train[:200_000]).decode("utf-8", errors="replace")
    assert "def " in text and "import " in text


def test_low_bit_state_arms_pass_their_state_formats():
    cfg = B.BenchConfig(d_model=32, n_layers=1, n_heads=2, seq_len=16)
    _, lowbit = B.build_arm("eco-sr-lowbit", cfg, seed=0, device=torch.device("cpu"))
    _, named = B.build_arm("eco-sr:fp8/fp8", cfg, seed=0, device=torch.device("cpu"))
    assert lowbit.state_dtype is None and lowbit.defaults["rounding"] == "stochastic"
    assert lowbit.state_formats["exp_avg_sq"].name == "factored"
    assert lowbit.state_formats["exp_avg"].name in ("int8", "fp8")
    assert [named.state_formats[k].name for k in ("exp_avg", "exp_avg_sq")] == ["fp8", "fp8"]
    _, eight_bit = B.build_arm("eco-sr-8bit", cfg, seed=0, device=torch.device("cpu"))
    assert [eight_bit.state_formats[k].name for k in ("exp_avg", "exp_avg_sq")] == ["int8", "fp8"]
    assert B.arm_label("eco-sr:fp8/fp8", "fp8") == "FP8 ECO, SR, m/v fp8/fp8"
    for arm in ("eco-sr-lowbit", "eco-sr-8bit"):
        assert (arm, 1) in B.plan_runs(dataclasses.replace(cfg, arms=(arm,), seeds=2))[0]
    with pytest.raises(ValueError, match="momentum must be one of"):
        B.run_benchmark(dataclasses.replace(cfg, arms=("eco-sr:int3/fp32",)))
    with pytest.raises(ValueError, match="spelled eco-sr:M/V"):
        B.run_benchmark(dataclasses.replace(cfg, arms=("eco-sr:int8",)))
