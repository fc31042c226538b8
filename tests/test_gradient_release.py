"""Gradient release (eco/release.py): each parameter steps during backward and its gradient is freed at once.

Every decision of the module docstring has a test here: equality with ordinary steps, param groups and LR
schedulers, accumulation (``no_step`` and accelerate's sync flag), ``step()`` on unreleased gradients, both
clipping modes, the non-finite policy mid-backward, state_dict resume, switching on and off, the live gradient
bytes during backward, and the stock Hugging Face Trainer.
"""

import copy
import io

import pytest
import torch
import torch.nn as nn

import eco
from tests.helpers import mlp
from tests.test_optimizer_api import assert_identical, snapshot

DATA = torch.randn(32, 16, generator=torch.Generator().manual_seed(1)), torch.randn(
    32, 4, generator=torch.Generator().manual_seed(2))
OPTIMIZERS = {
    "adamw": lambda params, **kw: eco.AdamW(params, lr=kw.pop("lr", 1e-2), weight_decay=0.1, **kw),
    "sgd": lambda params, **kw: eco.SGD(params, lr=kw.pop("lr", 0.1), momentum=0.9, weight_decay=0.01, **kw),
}
FORMATS = {"fp8": eco.FP8(), "int4": eco.INT4(group_size=16)}


def quantized_mlp(fmt, dtype=torch.float32):
    return eco.quantize_(mlp().to(dtype), fmt)


def loss_of(model, x=None, y=None):
    x, y = (DATA[0], DATA[1]) if x is None else (x, y)
    return nn.functional.mse_loss(model(x.to(next(model.parameters()).dtype)).float(), y)


def train(model, opt, steps, sched=None, check_released=False):
    for _ in range(steps):
        loss_of(model).backward()
        if check_released:
            assert all(p.grad is None for p in model.parameters()), "a gradient outlived backward"
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()


def state_of(model, opt):
    """Every weight and state bit (states by parameter name: release creates them in backward's order), the
    generator and the skip count."""
    out = {k: v for k, v in snapshot(model, opt).items() if not k.startswith("state")}
    for name, p in model.named_parameters():
        for key, value in opt.state.get(p, {}).items():
            out[f"{name}.{key}"] = value.clone() if isinstance(value, torch.Tensor) else value
    return {**out, "generator": opt.generator.get_state(), "skipped": opt.skipped_steps}


def twins(fmt, name, dtype=torch.float32, **kw):
    """The same model and optimizer twice: ordinary, and with gradient release."""
    model = quantized_mlp(fmt, dtype)
    released = copy.deepcopy(model)
    return (model, OPTIMIZERS[name](model.parameters(), seed=5, **kw),
            released, OPTIMIZERS[name](released.parameters(), seed=5, gradient_release=True, **kw))


# ---------------------------------------------------------------- equality with ordinary steps
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_released_steps_equal_ordinary_steps_bit_for_bit(name, fmt, rounding):
    """Quantized weights and plain biases, weights, states, step counts and the seed generator, after 3 steps."""
    model, opt, released, opt_r = twins(FORMATS[fmt], name, rounding=rounding)
    train(model, opt, 3)
    train(released, opt_r, 3, check_released=True)
    assert released[0].weight in opt_r.state and opt_r.state[released[0].bias]["step"] == 3
    assert_identical(state_of(model, opt), state_of(released, opt_r))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bf16_model_and_bf16_states_equal_ordinary_steps(name):
    model, opt, released, opt_r = twins(FORMATS["int4"], name, torch.bfloat16, rounding="nearest",
                                        state_dtype=torch.bfloat16)
    train(model, opt, 3)
    train(released, opt_r, 3, check_released=True)
    assert_identical(state_of(model, opt), state_of(released, opt_r))


def test_param_groups_and_lr_scheduler_apply_to_the_next_backward():
    """Each parameter steps with its group's options when its gradient arrives: the scheduler set them."""
    runs = []
    for release in (False, True):
        model = quantized_mlp(FORMATS["fp8"])
        opt = eco.AdamW([{"params": model[0].parameters(), "lr": 3e-3},
                         {"params": [*model[2].parameters(), *model[4].parameters()], "weight_decay": 0.0}],
                        lr=1e-2, rounding="nearest", gradient_release=release)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: [1.0, 0.5, 0.0, 2.0, 3.0][step])
        codes = []
        for _ in range(4):
            train(model, opt, 1, sched)
            codes.append(model[0].weight.codes.clone())
        runs.append((model, opt, codes))
    assert_identical(state_of(*runs[0][:2]), state_of(*runs[1][:2]))
    codes = runs[1][2]
    assert torch.equal(codes[2], codes[1]) and not torch.equal(codes[3], codes[2])  # lr 0 in step 3, not in 4
    assert runs[1][1].param_groups[0]["lr"] == pytest.approx(3e-3 * 3.0)


# ---------------------------------------------------------------- gradient accumulation, step()
def test_no_step_accumulates_micro_batches_and_the_last_backward_steps():
    model, opt, released, opt_r = twins(FORMATS["fp8"], "adamw", rounding="nearest")
    micro = [(DATA[0][i::3], DATA[1][i::3]) for i in range(3)]
    for _ in range(2):
        for x, y in micro:
            loss_of(model, x, y).backward()
        opt.step()
        opt.zero_grad()

        before = state_of(released, opt_r)
        for x, y in micro[:-1]:
            with opt_r.gradient_release.no_step():
                loss_of(released, x, y).backward()
        assert_identical(before, state_of(released, opt_r))  # nothing stepped ...
        assert all(p.grad is not None for p in released.parameters())  # ... the gradients accumulate
        loss_of(released, *micro[-1]).backward()
        assert all(p.grad is None for p in released.parameters())
        opt_r.step()
        opt_r.zero_grad()
    assert_identical(state_of(model, opt), state_of(released, opt_r))


def test_accelerate_not_syncing_gradients_holds_the_step():
    """The Trainer's micro-batches before the last: accelerate's GradientState.sync_gradients is False."""
    state = pytest.importorskip("accelerate.state")
    was_initialized = bool(state.GradientState._shared_state)
    gradient_state = state.GradientState()
    model, opt, released, opt_r = twins(FORMATS["int4"], "sgd", rounding="nearest")
    try:
        before = state_of(released, opt_r)
        gradient_state._set_sync_gradients(False)
        loss_of(released).backward()
        assert_identical(before, state_of(released, opt_r))
        gradient_state._set_sync_gradients(True)
        loss_of(released).backward()
    finally:
        gradient_state._set_sync_gradients(True)
        if not was_initialized:
            state.GradientState._reset_state()
    assert all(p.grad is None for p in released.parameters())
    loss_of(model).backward()
    loss_of(model).backward()
    opt.step()
    assert_identical(state_of(model, opt), state_of(released, opt_r))


def test_step_steps_the_gradients_backward_did_not_release():
    """Gradients set by hand (or accumulated in no_step with no releasing backward) are stepped by step()."""
    model, opt, released, opt_r = twins(FORMATS["fp8"], "adamw", rounding="stochastic")
    loss_of(model).backward()
    with opt_r.gradient_release.no_step():
        loss_of(released).backward()
    for p, q in zip(model.parameters(), released.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
    opt.step()
    opt_r.step()
    assert all(p.grad is None for p in released.parameters())
    assert_identical(state_of(model, opt), state_of(released, opt_r))
    opt_r.step()  # nothing left: changes nothing
    assert_identical(state_of(model, opt), state_of(released, opt_r))


def test_closure_backward_releases():
    model, opt, released, opt_r = twins(FORMATS["int4"], "adamw", rounding="nearest")

    def closure_for(m, o):
        def closure():
            o.zero_grad()
            loss = loss_of(m)
            loss.backward()
            return loss
        return closure

    for _ in range(2):
        assert torch.equal(opt.step(closure_for(model, opt)), opt_r.step(closure_for(released, opt_r)))
    assert_identical(state_of(model, opt), state_of(released, opt_r))


# ---------------------------------------------------------------- clipping
def test_clipping_by_the_previous_steps_global_norm():
    """Step t's gradients are clipped by step t-1's global norm, as clip_grads_with_norm_ would; step 1 unclipped."""
    max_norm = 0.05
    model, opt, released, opt_r = twins(FORMATS["fp8"], "adamw", rounding="nearest")
    opt_r.gradient_release.remove()
    handle = eco.release_gradients(opt_r, max_grad_norm=max_norm)
    previous, clipped_steps = None, 0
    for _ in range(4):
        loss_of(model).backward()
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        if previous is not None:
            torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, previous)
            clipped_steps += bool(previous > max_norm)
        opt.step()
        opt.zero_grad()
        previous = norm

        loss_of(released).backward()
        assert torch.equal(handle.grad_norm, norm)  # the unclipped global norm, measured during backward
        opt_r.step()
        opt_r.zero_grad()
    assert clipped_steps == 3  # clipping did act
    assert_identical(state_of(model, opt), state_of(released, opt_r))


def test_per_tensor_clipping():
    max_norm = 0.02
    model = quantized_mlp(FORMATS["int4"])
    released = copy.deepcopy(model)
    opt = OPTIMIZERS["sgd"](model.parameters(), rounding="nearest", seed=5)
    opt_r = OPTIMIZERS["sgd"](released.parameters(), rounding="nearest", seed=5,
                              gradient_release={"max_grad_norm": max_norm, "clipping": "per_tensor"})
    clipped = 0
    for _ in range(3):
        loss_of(model).backward()
        for p in model.parameters():
            clipped += bool(torch.nn.utils.clip_grad_norm_([p], max_norm) > max_norm)
        opt.step()
        opt.zero_grad()
        train(released, opt_r, 1)
    assert clipped > 0
    assert_identical(state_of(model, opt), state_of(released, opt_r))


# ---------------------------------------------------------------- non-finite gradients
def poisoned(model, param):
    """Make ``param``'s next gradients NaN (a tensor hook runs before accumulation); returns the handle."""
    return param.register_hook(lambda g: torch.full_like(g, float("nan")))


def stepped_alone(model, opt_factory, names):
    """An ordinary step of ``model`` (in place) in which only the parameters named ``names`` have gradients."""
    opt = opt_factory(model.parameters())
    loss_of(model).backward()
    for name, p in model.named_parameters():
        if name not in names:
            p.grad = None
    opt.step()
    return model


def test_nan_mid_backward_with_skip_skips_the_rest_of_the_step():
    """A NaN in the middle layer's weight: the last layer stepped already, the middle and first layers do not."""
    factory = lambda params: eco.AdamW(params, lr=1e-2, rounding="nearest", seed=5)  # noqa: E731
    model = quantized_mlp(FORMATS["fp8"])
    start, untouched = copy.deepcopy(model), copy.deepcopy(model)
    opt = eco.AdamW(model.parameters(), lr=1e-2, rounding="nearest", seed=5, gradient_release=True)
    order = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(order.append)  # after the optimizer's hook: the release order
    handle = poisoned(model, model[2].weight)  # its gradient only: the first layer's gradients stay finite
    with pytest.warns(RuntimeWarning, match="skipped the rest of a step at non-finite gradients") as warned:
        loss_of(model).backward()
    handle.remove()
    position = next(i for i, p in enumerate(order) if p is model[2].weight)
    assert f"{position} parameters had stepped" in str(warned[0].message)
    assert f"{len(order) - position} did not step" in str(warned[0].message)
    stepped = {id(p) for p in order[:position]}
    assert {id(p) for p in model[4].parameters()} <= stepped and not stepped & {id(p) for p in model[0].parameters()}
    assert opt.skipped_steps == 1 and opt.gradient_release.grad_norm is None
    assert all(p.grad is None for p in model.parameters())
    # the parameters released before the NaN stepped exactly as an ordinary step of them alone would ...
    alone = stepped_alone(start, factory, {name for name, p in model.named_parameters() if id(p) in stepped})
    for (name, p), p_alone, p_start in zip(model.named_parameters(), alone.parameters(), untouched.parameters(),
                                           strict=True):
        expected = p_alone if id(p) in stepped else p_start  # ... and the rest changed nothing
        if isinstance(p, eco.QuantizedTensor):
            assert torch.equal(p.codes, expected.codes) and torch.equal(p.scales, expected.scales), name
        else:
            assert torch.equal(p, expected), name
        assert (opt.state[p]["step"] == 1) if id(p) in stepped else (p not in opt.state), name
    # nothing lost: every weight and state finite; the next step steps every parameter
    train(model, opt, 1)
    assert opt.skipped_steps == 1 and opt.state[model[0].weight]["step"] == 1 and opt.state[model[4].bias]["step"] == 2
    for p in model.parameters():
        values = p.dequantize() if isinstance(p, eco.QuantizedTensor) else p
        assert values.isfinite().all()
        assert all(v.isfinite().all() for v in opt.state[p].values() if isinstance(v, torch.Tensor))


def test_nan_mid_backward_with_raise_leaves_backward_with_the_error():
    model = quantized_mlp(FORMATS["int4"])
    opt = eco.SGD(model.parameters(), lr=0.1, rounding="nearest", nonfinite="raise", gradient_release=True)
    first = state_of(model, opt)
    handle = poisoned(model, model[2].weight)
    with pytest.raises(FloatingPointError, match="parameters of this step had stepped") as raised:
        loss_of(model).backward()
    handle.remove()
    stepped = [p for p in model.parameters() if p in opt.state]
    assert f"after {len(stepped)} parameters" in str(raised.value)
    assert opt.skipped_steps == 0 and model[2].weight not in opt.state and model[0].weight not in opt.state
    assert {id(p) for p in model[4].parameters()} <= {id(p) for p in stepped}
    now = state_of(model, opt)
    for name in ("0.weight.codes", "0.weight.scales", "0.bias", "2.weight.codes", "2.weight.scales"):
        assert torch.equal(now[name], first[name]), name
    opt.zero_grad()
    train(model, opt, 1)  # the next backward is a new step (the failed one does not linger)
    assert opt.state[model[0].weight]["step"] == 1 and opt.state[model[4].weight]["step"] == 2


# ---------------------------------------------------------------- state_dict
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_state_dict_resume_is_bit_identical(rounding):
    """The previous step's norm (clipping="previous") and the seed generator are in the state_dict."""
    def build(model, seed):
        opt = eco.AdamW(model.parameters(), lr=1e-2, rounding=rounding, seed=seed,
                        gradient_release={"max_grad_norm": 0.05})
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)

    model = quantized_mlp(FORMATS["fp8"])
    fresh = copy.deepcopy(model)
    opt, sched = build(model, 11)
    train(model, opt, 3, sched)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    train(model, opt, 3, sched)

    buffer.seek(0)
    saved = torch.load(buffer)  # weights_only: the saved norm is a plain float
    previous = saved["opt"]["eco_gradient_release"]["previous_grad_norm"]
    assert isinstance(previous, float) and previous > 0.05  # it clips the next step
    fresh.load_state_dict(saved["model"])
    opt_b, sched_b = build(fresh, 999)
    opt_b.load_state_dict(saved["opt"])
    sched_b.load_state_dict(saved["sched"])
    train(fresh, opt_b, 3, sched_b)
    assert_identical(state_of(model, opt), state_of(fresh, opt_b))


def test_a_bad_saved_norm_is_refused_before_anything_is_loaded():
    model = quantized_mlp(FORMATS["fp8"])
    opt = eco.AdamW(model.parameters(), gradient_release=True)
    train(model, opt, 1)
    saved = opt.state_dict()
    saved["eco_gradient_release"] = {"previous_grad_norm": float("nan")}
    before = state_of(model, opt)
    with pytest.raises(ValueError, match="Nothing was loaded"):
        opt.load_state_dict(saved)
    assert_identical(before, state_of(model, opt))


def test_state_dicts_move_between_the_modes():
    """An ordinary state_dict loads into a releasing optimizer (no previous norm) and the other way round."""
    model = quantized_mlp(FORMATS["fp8"])
    ordinary = eco.AdamW(model.parameters())
    train(model, ordinary, 1)
    released = eco.AdamW(model.parameters(), gradient_release={"max_grad_norm": 1.0})
    released.load_state_dict(ordinary.state_dict())
    assert released.gradient_release._previous_norm is None
    train(model, released, 1)
    ordinary.load_state_dict(released.state_dict())
    assert ordinary.state[model[0].weight]["step"] == 2


# ---------------------------------------------------------------- switching on and off
def test_switching_on_and_off():
    model = quantized_mlp(FORMATS["fp8"])
    opt = eco.AdamW(model[0].parameters())
    assert opt.gradient_release is None
    handle = eco.release_gradients(opt)
    assert isinstance(handle, eco.GradientRelease) and opt.gradient_release is handle
    with pytest.raises(RuntimeError, match="already releases"):
        eco.release_gradients(opt)
    opt.add_param_group({"params": model[2].parameters()})  # a new group is released too
    loss_of(model).backward()
    assert all(p.grad is None for p in [*model[0].parameters(), *model[2].parameters()])
    assert all(p.grad is not None for p in model[4].parameters())  # not the optimizer's
    handle.remove()
    assert opt.gradient_release is None
    loss_of(model).backward()
    assert all(p.grad is not None for p in model.parameters())  # ordinary again
    opt.step()
    assert opt.state[model[2].weight]["step"] == 2
    assert "eco_gradient_release" not in opt.state_dict()
    assert copy.deepcopy(eco.AdamW(model.parameters(), gradient_release=True)).gradient_release is None


def test_module_to_after_the_optimizer_keeps_releasing():
    """``model.to()`` swaps the tensor of a quantized parameter (accelerate's prepare does it in the Trainer)."""
    model = quantized_mlp(FORMATS["fp8"])
    opt = eco.AdamW(model.parameters(), gradient_release=True)
    model.to("cpu")
    for _ in range(2):
        loss_of(model).backward()
        assert all(p.grad is None for p in model.parameters())
        opt.step()
    assert all(opt.state[p]["step"] == 2 for p in model.parameters())


def test_a_parameter_unfrozen_later_is_released():
    model = quantized_mlp(FORMATS["int4"])
    for p in model[4].parameters():
        p.requires_grad_(False)
    opt = eco.SGD(model.parameters(), lr=0.1, gradient_release=True)
    train(model, opt, 1)
    for p in model[4].parameters():
        p.requires_grad_(True)
    loss_of(model).backward()  # hooked from this backward's first gradient on: too late for the last layer ...
    opt.step()  # ... whose gradients step() steps
    loss_of(model).backward()
    assert all(p.grad is None for p in model.parameters())  # from then on released in backward
    assert opt.state[model[4].weight]["step"] == 2 and opt.state[model[0].weight]["step"] == 3


def test_bad_options_are_refused():
    params = list(quantized_mlp(FORMATS["fp8"]).parameters())
    with pytest.raises(TypeError, match="gradient_release must be True, False or a dict"):
        eco.AdamW(params, gradient_release="yes")
    with pytest.raises(ValueError, match="max_grad_norm must be a finite number > 0"):
        eco.SGD(params, gradient_release={"max_grad_norm": -1.0})
    with pytest.raises(ValueError, match="clipping must be one of"):
        eco.AdamW(params, gradient_release={"max_grad_norm": 1.0, "clipping": "global"})
    with pytest.raises(ValueError, match="needs max_grad_norm"):
        eco.AdamW(params, gradient_release={"clipping": "per_tensor"})
    with pytest.raises(TypeError, match="eco optimizers"):
        eco.release_gradients(torch.optim.SGD(params, lr=0.1))
    assert all(not p._post_accumulate_grad_hooks for p in params)  # a refused option left no hook behind


# ---------------------------------------------------------------- memory
def live_gradient_bytes(release: bool) -> tuple[int, int, int]:
    """(most gradient bytes alive at once during backward, the largest gradient, all gradients) of a bf16 stack."""
    torch.manual_seed(0)
    model = eco.quantize_(nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)]).to(torch.bfloat16),
                          eco.INT4(group_size=32))
    params = list(model.parameters())
    peak = [0]

    def count(_):  # runs before the optimizer's hook on the same parameter: that gradient is alive
        peak[0] = max(peak[0], sum(p.grad.nbytes for p in params if p.grad is not None))

    for p in params:
        p.register_post_accumulate_grad_hook(count)
    opt = eco.AdamW(params, gradient_release=release)
    model(torch.randn(4, 256, dtype=torch.bfloat16)).float().square().mean().backward()
    opt.step()
    sizes = [p.numel() * p.element_size() for p in params]
    return peak[0], max(sizes), sum(sizes)


def test_gradients_are_freed_during_backward():
    ordinary, largest, total = live_gradient_bytes(release=False)
    released, _, _ = live_gradient_bytes(release=True)
    assert ordinary == total  # every gradient alive at the end of backward
    assert released == largest  # never more than the one gradient being released
    assert released * 8 < total


# ---------------------------------------------------------------- the stock Hugging Face Trainer
def trainer_run(tmp_path, release, rounding, max_steps=4, resume_from=None, save_steps=100):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from tests.helpers import load_example

    hf = load_example("hf_trainer")
    tokens = torch.randint(0, 256, (2048,), generator=torch.Generator().manual_seed(0))
    model = hf.tiny_mixtral(seed=0)
    eco.quantize_(model, eco.INT4(group_size=16), filter_fn=hf.expert_filter)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-2, lr_scheduler_type="cosine", warmup_steps=1, weight_decay=0.1, max_grad_norm=0.0,
        save_strategy="steps", save_steps=save_steps, report_to="none", use_cpu=True, seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True, logging_steps=1,
    )
    options = dict(lr=1e-2, rounding=rounding, seed=0, gradient_release=release)
    seen = []

    class Probe(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            seen.append(sum(p.grad is not None for p in model.parameters()))

    trainer = transformers.Trainer(model=model, args=args, train_dataset=hf.TokenWindows(tokens, 32),
                                   optimizer_cls_and_kwargs=(eco.AdamW, options), callbacks=[Probe()])
    trainer.train(resume_from_checkpoint=resume_from)
    optimizer = trainer.optimizer.optimizer
    return model, optimizer, seen


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_stock_trainer_with_release_equals_the_ordinary_trainer(tmp_path, rounding):
    """Gradient accumulation 2, cosine schedule with warmup: the same bits, with no gradient left at step()."""
    model, opt, seen = trainer_run(tmp_path / "ordinary", False, rounding)
    model_r, opt_r, seen_r = trainer_run(tmp_path / "released", {"max_grad_norm": None}, rounding)
    assert opt_r.gradient_release is not None and opt_r.gradient_release.grad_norm is not None
    assert len(seen) == len(seen_r) == 4 and all(seen) and not any(seen_r)
    assert all(opt_r.state[p]["step"] == 4 for p in model_r.parameters())
    assert_identical(state_of(model, opt), state_of(model_r, opt_r))


def test_stock_trainer_resumes_a_released_run_bit_identically(tmp_path):
    """The resumed run clips its first step by the saved norm of the step before the checkpoint."""
    options = {"max_grad_norm": 0.01}
    model, opt, _ = trainer_run(tmp_path / "straight", options, "stochastic", save_steps=2)
    saved = torch.load(tmp_path / "straight" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert saved["eco_gradient_release"]["previous_grad_norm"] > 0.01  # clipping acts after the resume
    resumed, opt_b, _ = trainer_run(tmp_path / "resumed", options, "stochastic",
                                    resume_from=str(tmp_path / "straight" / "checkpoint-2"))
    assert_identical(state_of(model, opt), state_of(resumed, opt_b))
