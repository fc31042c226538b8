"""ECO optimizers: ``eco.AdamW`` and ``eco.SGD``.

Quantized parameters (:class:`~eco.qparam.QuantizedTensor`) get the ECO
update: the step is applied to the dequantized weight, the result is
re-quantized, and the rounding error is injected into the momentum. Ordinary
parameters in the same optimizer get the plain AdamW/SGD update.

Parameters sharing a backend, param group and step count (quantized ones
also their format) are stepped by one call into that backend
(:class:`eco.backends.Backend`: ``adamw_steps_``, ``plain_adamw_steps_``, ...),
which groups them further as it likes. :func:`eco.backends.select` picks the
backend from ``backend=`` (``"auto"``: the Triton kernels for CUDA tensors,
the plain-torch reference otherwise; ``"reference"``, ``"compiled"``,
``"triton"``) and the ``ECO_BACKEND`` environment variable, which overrides it.

Three switches give every arm of the paper's Table 1 through one code path:
``error_feedback=False`` is naive master-weight removal; ``master_weights=True``
keeps an fp32 master copy and re-quantizes from it every step.

Non-finite gradients (policy ``nonfinite``): before anything is written, all
gradients of the step are checked (one reduction, one host sync). With
``"skip"`` (default) a step with any NaN/inf gradient changes nothing (codes,
scales, moments, step counts), warns, and is counted in
``optimizer.skipped_steps``; with ``"raise"`` it raises ``FloatingPointError``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch

from . import backends, reference
from .formats import STATE_DTYPES, check_rounding
from .qparam import QuantizedTensor

NONFINITE_POLICIES = ("skip", "raise")


def _injects(group: dict) -> bool:
    """ECO proper: error feedback on and no master copy to hold the error instead."""
    return group["error_feedback"] and not group["master_weights"]


def _all_finite(grads: list[torch.Tensor]) -> bool:
    """True when no gradient holds NaN or inf: one host sync for all of them.

    On CPU each gradient's ``aminmax`` (NaN propagates into both, an inf into one):
    torch's CPU ``_foreach_norm(inf)`` reduces bf16 in a scalar loop, slower than a
    whole torch AdamW step. Elsewhere one fused ``_foreach_norm(inf)`` per device/dtype.
    """
    if not grads:
        return True
    extremes = [e for g in grads if g.device.type == "cpu" and g.numel() for e in torch.aminmax(g)]
    others = [g for g in grads if g.device.type != "cpu"]
    if others:
        extremes.extend(torch._foreach_norm(others, float("inf")))
    if not extremes:
        return True
    return bool(torch.stack([e.float().to(grads[0].device) for e in extremes]).isfinite().all())


class _ECOOptimizer(torch.optim.Optimizer):
    """Shared machinery: validation, state layout, RNG, non-finite policy, state_dict."""

    #: names of the per-parameter moment buffers, in the order the backend takes them
    moment_names: tuple[str, ...] = ()

    def __init__(self, params, defaults: dict, *, state_dtype, seed, generator, nonfinite, backend):
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {STATE_DTYPES}, got {state_dtype}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        backends.resolve(backend)  # a bad backend= or ECO_BACKEND fails here, not at the first step
        check_rounding(defaults["rounding"])
        self.state_dtype = state_dtype
        self.nonfinite = nonfinite
        self.backend = backend
        self.skipped_steps = 0
        if generator is None:
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)).item())  # follows torch.manual_seed
            generator = torch.Generator().manual_seed(seed)
        if generator.device.type != "cpu":
            raise ValueError("generator must be a CPU torch.Generator (it only draws per-step seeds)")
        self.generator = generator
        super().__init__(params, defaults)

    # ------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        param_group = {**param_group, "params": params}  # a generator is consumed once, here
        for p in params:
            if not p.is_floating_point():
                raise TypeError(
                    f"{type(self).__name__} updates floating-point parameters; got a {p.dtype} tensor of "
                    f"shape {tuple(p.shape)}. Leave integer tensors out of the optimizer."
                )
        merged = {**self.defaults, **param_group}
        self._validate_group(merged)
        super().add_param_group(param_group)

    def _validate_group(self, group: dict) -> None:
        if not 0.0 <= group["lr"]:
            raise ValueError(f"lr must be >= 0, got {group['lr']}")
        if group["weight_decay"] < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']}")
        check_rounding(group["rounding"])

    # ------------------------------------------------------------ state
    def _state_for(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            for name in self.moment_names:
                state[name] = torch.zeros(p.shape, dtype=self.state_dtype, device=p.device)
            if isinstance(p, QuantizedTensor):
                if group["master_weights"]:
                    state["master"] = p.dequantize(torch.float32)
        return state

    def _next_seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self.generator).item())

    # ------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients; use dense gradients "
                        "(for nn.Embedding, sparse=False)"
                    )
                work.append((group, p))
        if not _all_finite([p.grad for _, p in work]):
            if self.nonfinite == "raise":
                raise FloatingPointError(
                    "a gradient holds NaN or inf; nothing was updated. Lower the learning rate, clip or "
                    "scale the loss, or pass nonfinite='skip' to skip such steps"
                )
            self.skipped_steps += 1
            warnings.warn(
                f"{type(self).__name__}: skipped a step with non-finite gradients (nothing was updated; "
                f"{self.skipped_steps} skipped so far)", RuntimeWarning, stacklevel=2,
            )
            return loss
        # One backend call per (backend, group, step count[, format]); the backend groups by dtypes itself.
        plain_batches: dict = {}
        quantized_batches: dict = {}  # seeds drawn here, in parameter order
        for group, p in work:
            state = self._state_for(p, group)
            state["step"] += 1
            backend = backends.select(self.backend, p)
            if isinstance(p, QuantizedTensor):
                seed = self._next_seed() if group["rounding"] == "stochastic" else None
                key = (backend.__name__, id(group), state["step"], p.fmt)
                quantized_batches.setdefault(key, (backend, group, state["step"], []))[3].append((p, state, seed))
            else:
                key = (backend.__name__, id(group), state["step"])
                plain_batches.setdefault(key, (backend, group, state["step"], []))[3].append((p, state))
        for backend, group, step, items in quantized_batches.values():
            self._step_quantized(backend, *(list(x) for x in zip(*items, strict=True)), group, step)
        for backend, group, step, items in plain_batches.values():
            self._step_plain(backend, [p for p, _ in items], [st for _, st in items], group, step)
        return loss

    def _quantized_kwargs(self, params: list, states: list, seeds: list, group: dict) -> dict:
        return dict(
            masters=[st.get("master") for st in states], fmt=params[0].fmt, shapes=[p.shape for p in params],
            rounding=group["rounding"], seeds=seeds, update_weight=group["lr"] != 0.0,
        )

    def _step_quantized(self, backend, params, states, seeds, group, step):  # pragma: no cover - abstract
        """ECO update of quantized ``params`` (same group, step count and format) in one backend call."""
        raise NotImplementedError

    def _step_plain(self, backend, params, states, group, step):  # pragma: no cover - abstract
        """Plain update of ``params`` (same group and step count) in one backend call."""
        raise NotImplementedError

    # ------------------------------------------------------------ state_dict
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["eco_generator_state"] = self.generator.get_state()
        sd["eco_formats"] = self._formats()
        sd["eco_skipped_steps"] = self.skipped_steps
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load, keeping every state tensor's saved dtype (torch would cast it to the param's)."""
        state_dict = dict(state_dict)
        generator_state = state_dict.pop("eco_generator_state", None)
        skipped = state_dict.pop("eco_skipped_steps", 0)
        formats = state_dict.pop("eco_formats", None)
        self._check_compatible(state_dict, formats)
        saved_dtypes = {
            pid: {k: v.dtype for k, v in st.items() if isinstance(v, torch.Tensor)}
            for pid, st in state_dict["state"].items()
        }
        id_to_param = self._saved_id_to_param(state_dict)
        super().load_state_dict(state_dict)
        for pid, dtypes in saved_dtypes.items():
            st = self.state[id_to_param[pid]]
            for key, dtype in dtypes.items():
                st[key] = st[key].to(dtype)
        if generator_state is not None:
            self.generator.set_state(generator_state)
        self.skipped_steps = skipped

    def _formats(self) -> list:
        """The quantization format of every parameter, in param-group order (None: unquantized)."""
        return [p.fmt.config() if isinstance(p, QuantizedTensor) else None
                for g in self.param_groups for p in g["params"]]

    def _saved_id_to_param(self, state_dict: dict) -> dict:
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        current = [p for g in self.param_groups for p in g["params"]]
        return dict(zip(saved_ids, current, strict=False))

    def _check_compatible(self, state_dict: dict, formats: list | None) -> None:
        """Refuse a state_dict of another model or format before anything is changed."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups, strict=False)
        ):
            raise ValueError(
                "this optimizer state_dict has a different number of parameter groups or parameters; "
                "it belongs to another model or optimizer setup"
            )
        for pid, p in self._saved_id_to_param(state_dict).items():
            saved = state_dict["state"].get(pid)
            if not saved:
                continue
            for name in self.moment_names:
                if name not in saved:
                    raise ValueError(
                        f"saved state of parameter {pid} lacks {name!r}: not a {type(self).__name__} state_dict"
                    )
                if tuple(saved[name].shape) != tuple(p.shape):
                    raise ValueError(
                        f"saved {name} of parameter {pid} has shape {tuple(saved[name].shape)} but the parameter "
                        f"has shape {tuple(p.shape)}: the state_dict belongs to another model"
                    )
        if formats is not None:
            for index, (saved_fmt, current_fmt) in enumerate(zip(formats, self._formats(), strict=False)):
                if saved_fmt != current_fmt:
                    raise ValueError(
                        f"parameter {index} was saved with format {saved_fmt} but is now {current_fmt}: quantize "
                        "the model with the same format as when the optimizer state was saved"
                    )


class AdamW(_ECOOptimizer):
    """ECO-AdamW (paper Algorithm 3) with decoupled weight decay.

    Args:
        params: parameters or param groups, some of them quantized by ``eco.quantize_``.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
        rounding: ``"stochastic"`` (default, the paper's best) or ``"nearest"``.
        state_dtype: dtype of ``exp_avg``/``exp_avg_sq``: ``torch.float32`` or ``torch.bfloat16``.
        error_feedback: ``False`` gives naive master-weight removal (no injection).
        master_weights: ``True`` keeps an fp32 master copy (the baseline ECO removes).
        decay_corrected_injection: multiply the injection by ``1 - lr*wd`` (the paper form is the default).
        seed, generator: make stochastic rounding reproducible (a CPU generator draws one seed per step and tensor).
        nonfinite: ``"skip"`` or ``"raise"`` on NaN/inf gradients (see module docstring).
        backend: ``"auto"``, ``"reference"``, ``"compiled"`` or ``"triton"`` (see module docstring).
    """

    moment_names = ("exp_avg", "exp_avg_sq")

    def __init__(
        self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 1e-2, *, rounding: str = "stochastic", state_dtype: torch.dtype = torch.float32,
        error_feedback: bool = True, master_weights: bool = False, decay_corrected_injection: bool = False,
        seed: int | None = None, generator: torch.Generator | None = None, nonfinite: str = "skip",
        backend: str = "auto",
    ):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rounding=rounding,
            error_feedback=error_feedback, master_weights=master_weights,
            decay_corrected_injection=decay_corrected_injection,
        )
        super().__init__(params, defaults, state_dtype=state_dtype, seed=seed, generator=generator,
                         nonfinite=nonfinite, backend=backend)

    def _validate_group(self, group):
        super()._validate_group(group)
        beta1, beta2 = group["betas"]
        if not (0.0 < beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"betas must satisfy 0 < beta1 < 1 and 0 <= beta2 < 1, got {group['betas']}")
        if group["eps"] <= 0.0:
            raise ValueError(f"eps must be > 0, got {group['eps']}")

    def _scalars(self, group, step, inject):
        beta1, beta2 = group["betas"]
        return reference.adamw_scalars(
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            step=step, inject=inject, decay_corrected_injection=group["decay_corrected_injection"],
        )

    def _step_quantized(self, backend, params, states, seeds, group, step):
        backend.adamw_steps_(
            [p.codes for p in params], [p.scales for p in params], [p.grad for p in params],
            [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
            scalars=self._scalars(group, step, inject=_injects(group)),
            **self._quantized_kwargs(params, states, seeds, group),
        )

    def _step_plain(self, backend, params, states, group, step):
        backend.plain_adamw_steps_(
            params, [p.grad for p in params], [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
            scalars=self._scalars(group, step, inject=False),
        )


class SGD(_ECOOptimizer):
    """ECO with SGD + momentum (paper eqs. 2-6).

    Momentum is an exponential moving average, ``m = beta*m + (1-beta)*g``
    (``torch.optim.SGD`` with ``dampening=momentum``, starting from zero);
    weight decay is added to the gradient. The ECO injection needs
    ``0 < momentum < 1``. Other options as :class:`AdamW`.
    """

    moment_names = ("momentum_buffer",)

    def __init__(
        self, params: Iterable, lr: float = 1e-2, momentum: float = 0.9, weight_decay: float = 0.0, *,
        rounding: str = "stochastic", state_dtype: torch.dtype = torch.float32, error_feedback: bool = True,
        master_weights: bool = False, seed: int | None = None, generator: torch.Generator | None = None,
        nonfinite: str = "skip", backend: str = "auto",
    ):
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, rounding=rounding,
            error_feedback=error_feedback, master_weights=master_weights,
        )
        super().__init__(params, defaults, state_dtype=state_dtype, seed=seed, generator=generator,
                         nonfinite=nonfinite, backend=backend)

    def _validate_group(self, group):
        super()._validate_group(group)
        momentum = group["momentum"]
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must satisfy 0 <= momentum < 1, got {momentum}")
        if momentum == 0.0 and group["error_feedback"] and not group["master_weights"]:
            raise ValueError(
                "ECO injects the rounding error into the momentum, so it needs momentum > 0; "
                "pass momentum (e.g. 0.9), or error_feedback=False for the naive baseline"
            )

    def _scalars(self, group, inject):
        return reference.sgd_scalars(
            lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"], inject=inject
        )

    def _step_quantized(self, backend, params, states, seeds, group, step):
        backend.sgd_steps_(
            [p.codes for p in params], [p.scales for p in params], [p.grad for p in params],
            [st["momentum_buffer"] for st in states], scalars=self._scalars(group, inject=_injects(group)),
            **self._quantized_kwargs(params, states, seeds, group),
        )

    def _step_plain(self, backend, params, states, group, step):
        backend.plain_sgd_steps_(params, [p.grad for p in params], [st["momentum_buffer"] for st in states],
                                 scalars=self._scalars(group, inject=False))
