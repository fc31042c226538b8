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

Optimizer states (``eco.states``): ``momentum=`` (AdamW; ``momentum_state=``
for SGD, whose ``momentum`` is the coefficient) is ``"fp32"``, ``"bf16"``,
``"int8"`` or ``"fp8"``; ``second_moment=`` is ``"fp32"``, ``"bf16"``,
``"fp8"`` or ``"factored"``; ``"8bit"`` picks the 8-bit format of each.
Every format below fp32 is stored with stochastic rounding. ``state_dtype``
(fp32 or bf16 for both) is the older spelling of the same choice.

Non-finite gradients (policy ``nonfinite``): before anything is written, all
gradients of the step are checked (one reduction, one host sync): each must be
finite and below ``reference.GRAD_LIMIT`` (2**63) in magnitude, so that its
square fits fp32; and the step's coefficients must be representable in fp32
(``reference.check_scalars``: e.g. a learning rate so small that ECO's
injection coefficient ``(bc1/lr)(1 - 1/beta1)`` would overflow). Every value
the step computes from such inputs is then finite by construction (see
``eco.reference``). With ``"skip"`` (default) a step that fails a check changes
nothing (codes, scales, moments, step counts), warns, and is counted in
``optimizer.skipped_steps``; with ``"raise"`` it raises ``FloatingPointError``.

Gradient release (``gradient_release=True``, :mod:`eco.release`) steps each
parameter during backward as soon as its gradient is complete and frees the
gradient; ``step()`` then steps only the gradients backward did not release.

A step either completes or changes nothing that can be checked beforehand:
every group's options (also ones set after construction, a tensor ``lr``), the
backend of every parameter, and every existing state against the parameter are
checked before any state is created, any step count moves or any seed is drawn.
``load_state_dict`` likewise checks everything before it changes anything.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from copy import deepcopy

import torch

from . import backends, distributed, reference, release, states
from .formats import STATE_DTYPES, check_rounding
from .qparam import QuantizedTensor

NONFINITE_POLICIES = ("skip", "raise")
#: the state format of every moment when neither state_dtype nor a format is given
DEFAULT_STATE_FORMAT = "fp32"


def _injects(group: dict) -> bool:
    """ECO proper: error feedback on and no master copy to hold the error instead."""
    return group["error_feedback"] and not group["master_weights"]


def _all_below(tensors: list[torch.Tensor], limit: float) -> bool:
    """True when every element of every tensor has ``|x| < limit`` (NaN fails): one host sync for all.

    On CPU each tensor's ``aminmax`` (NaN propagates into both, an inf into one):
    torch's CPU ``_foreach_norm(inf)`` reduces bf16 in a scalar loop, slower than a
    whole torch AdamW step. Elsewhere one fused ``_foreach_norm(inf)`` per device/dtype.
    E4M3 tensors (8-bit states) are read as fp32.
    """
    tensors = [t.float() if t.dtype == torch.float8_e4m3fn else t for t in tensors]
    if not tensors:
        return True
    extremes = [e for g in tensors if g.device.type == "cpu" and g.numel() for e in torch.aminmax(g)]
    others = [g for g in tensors if g.device.type != "cpu"]
    if others:
        extremes.extend(torch._foreach_norm(others, float("inf")))
    if not extremes:
        return True
    return bool((torch.stack([e.float().to(tensors[0].device) for e in extremes]).abs() < limit).all())


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """True when no tensor holds NaN or inf."""
    return _all_below(tensors, math.inf)


def _gradients_in_range(grads: list[torch.Tensor]) -> bool:
    """True when every gradient element is finite with ``|g| < reference.GRAD_LIMIT`` (its square fits fp32)."""
    return _all_below(grads, reference.GRAD_LIMIT)


def _state_formats(state_dtype, chosen: dict, moment_names: tuple) -> dict:
    """The state format of each moment: the chosen names, else ``state_dtype``'s, else the default."""
    if state_dtype is not None and any(v is not None for v in chosen.values()):
        raise ValueError("pass either state_dtype or the state formats (momentum=, second_moment=, "
                         "momentum_state=), not both")
    if state_dtype is not None and state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of {STATE_DTYPES}, got {state_dtype}")
    default = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(state_dtype, DEFAULT_STATE_FORMAT)
    out = {}
    for name in moment_names:
        choice = chosen[name] or default
        out[name] = states.second_moment_format(choice) if name == "exp_avg_sq" else states.momentum_format(choice)
    return out


#: torch.optim options that choose how a step is computed, not what it computes: dropped from a loaded state_dict
_IMPLEMENTATION_OPTIONS = ("foreach", "fused", "capturable", "differentiable")

#: set on the nn.Parameter that ``eco.quantize_`` replaced (eco/qparam.py)
_REPLACED_MARK = "_eco_replaced_by_quantize"


_GROUP_ENTRIES = ("eco_generator_state", "eco_skipped_steps", "eco_state_formats")


def _eco_entries_lifted(state_dict: dict) -> dict:
    """``state_dict`` with eco's entries taken out of its param groups to the top level (where state_dicts
    saved before they moved into the groups have them)."""
    groups = [dict(group) for group in state_dict["param_groups"]]
    out = {**state_dict, "param_groups": groups}
    if any("eco_formats" in group for group in groups):
        out["eco_formats"] = [fmt for group in groups
                              for fmt in group.pop("eco_formats", [None] * len(group["params"]))]
    for group in reversed(groups):  # the same in every group; the first one's is kept
        for key in _GROUP_ENTRIES:
            if key in group:
                out[key] = group.pop(key)
    return out


def _is_quantized(p: torch.Tensor) -> bool:
    """Whether ``p`` is a quantized weight (of a ``DTensor``: whether its shards are)."""
    return isinstance(distributed.local_tensor(p), QuantizedTensor)


def _shard_kwargs(params: list) -> dict:
    """The per-tensor ``offsets``/``full_shapes``/``reduces`` of a backend call when some of ``params`` are
    shards (``distributed.local_view``); nothing for whole tensors."""
    if not any(distributed.is_shard(p) for p in params):
        return {}
    return dict(offsets=[distributed.shard_offset(p) for p in params],
                full_shapes=[distributed.shard_full_shape(p) for p in params],
                reduces=[distributed.shard_reduce(p) for p in params])


def _real(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor as its real view (``[..., 2]``), as torch.optim steps complex parameters."""
    return torch.view_as_real(t) if t.is_complex() else t


def _scalar(name: str, value: torch.Tensor) -> float:
    if value.numel() != 1:
        raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}")
    return float(value)


def _resolved(group: dict) -> dict:
    """A copy of ``group`` with each tensor option (torch accepts a 1-element tensor ``lr``) as a Python float."""
    out = dict(group)
    for key, value in group.items():
        if isinstance(value, torch.Tensor):
            out[key] = _scalar(key, value)
        elif isinstance(value, tuple) and any(isinstance(v, torch.Tensor) for v in value):
            out[key] = tuple(_scalar(key, v) if isinstance(v, torch.Tensor) else v for v in value)
    return out


def _check_param(optimizer, p: torch.Tensor) -> None:
    if getattr(p, _REPLACED_MARK, False):
        raise RuntimeError(
            f"{type(optimizer).__name__} holds a parameter of shape {tuple(p.shape)} that eco.quantize_ has since "
            "replaced by a quantized one, so the model's weights would never train. Build the optimizer after "
            "eco.quantize_(model, ...). Nothing was updated."
        )
    if not (p.is_floating_point() or p.is_complex()):
        raise TypeError(
            f"{type(optimizer).__name__} updates floating-point parameters (complex ones too); got a {p.dtype} "
            f"tensor of shape {tuple(p.shape)}. Leave integer tensors out of the optimizer."
        )


def _shared_seed() -> int:
    """A seed drawn from torch's global generator; under torch.distributed, rank 0's.

    Replicas must round alike even when each rank seeds torch with its rank
    (common for data order), so every rank takes rank 0's draw: building the
    optimizer is then a collective, like building DDP.
    """
    seed = int(torch.randint(0, 2**62, (1,)).item())
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [seed]
        torch.distributed.broadcast_object_list(box, src=0)
        seed = box[0]
    return seed


def _lossless(saved: torch.dtype, kept: torch.dtype) -> bool:
    """Whether every value of dtype ``saved`` is exactly a value of dtype ``kept`` (bfloat16 -> float32)."""
    if saved == kept:
        return True
    return saved.is_floating_point and kept.is_floating_point and torch.promote_types(saved, kept) == kept


def _loaded_step(pid, value) -> int:
    """A saved step count: eco saves an int, torch.optim a float tensor."""
    step = value.item() if isinstance(value, torch.Tensor) else value
    if not (isinstance(step, (int, float)) and math.isfinite(step) and step >= 0 and float(step).is_integer()):
        raise ValueError(f"saved step of parameter {pid} is {value!r}, not a count of steps")
    return int(step)


class _ECOOptimizer(torch.optim.Optimizer):
    """Shared machinery: validation, state layout, RNG, non-finite policy, state_dict."""

    #: names of the per-parameter moment buffers, in the order the backend takes them
    moment_names: tuple[str, ...] = ()
    #: torch.optim options and the value under which torch computes what this optimizer computes; a loaded
    #: state_dict with another value is refused (a torch.optim state_dict is the migration path)
    torch_equivalents: dict = {}
    #: whether the update uses the step count (bias correction), so that a loaded state must have one
    #: (torch.optim.SGD saves none)
    update_counts_steps = True

    def __init__(self, params, defaults: dict, *, state_dtype, state_formats: dict, seed, generator, nonfinite,
                 backend, gradient_release):
        self.state_formats = _state_formats(state_dtype, state_formats, self.moment_names)
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        backends.resolve(backend)  # a bad backend= or ECO_BACKEND fails here, not at the first step
        self._validate_group(_resolved(defaults))  # bad options fail before the params are looked at, as in torch
        self.state_dtype = state_dtype
        self.nonfinite = nonfinite
        self.backend = backend
        self.skipped_steps = 0
        if generator is None:
            generator = torch.Generator().manual_seed(_shared_seed() if seed is None else seed)
        if generator.device.type != "cpu":
            raise ValueError("generator must be a CPU torch.Generator (it only draws per-step seeds)")
        self.generator = generator
        #: the :class:`eco.release.GradientRelease` handle while gradient release is on, else None
        self.gradient_release = None
        super().__init__(params, defaults)
        release.switch_on(self, gradient_release)

    # ------------------------------------------------------------ pickling, copy.deepcopy
    _ECO_ATTRIBUTES = ("_state_dtype", "state_formats", "nonfinite", "backend", "skipped_steps", "generator")

    @property
    def state_dtype(self) -> torch.dtype | None:
        """The ``state_dtype`` option (None when the state formats were chosen by name)."""
        return self._state_dtype

    @state_dtype.setter
    def state_dtype(self, value: torch.dtype | None) -> None:
        """Setting it chooses the formats it stands for (a state made under others is then refused at the step)."""
        self._state_dtype = value
        if value is not None:
            self.state_formats = _state_formats(value, dict.fromkeys(self.moment_names), self.moment_names)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), **{name: getattr(self, name) for name in self._ECO_ATTRIBUTES}}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.gradient_release = None  # a copy steps in step(); eco.release_gradients(copy) releases again
        for group in self.param_groups:  # a pickle from an older version lacks newer options
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    # ------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)  # torch's checks; (name, param) pairs become params + param_names
        try:
            for p in self.param_groups[-1]["params"]:
                _check_param(self, p)
            self._validate_group(_resolved(self.param_groups[-1]))
        except Exception:
            self.param_groups.pop()
            raise
        if getattr(self, "gradient_release", None) is not None:
            self.gradient_release.watch(self.param_groups[-1]["params"])

    def _validate_group(self, group: dict) -> None:
        """Refuse bad options of ``group`` (tensor options already floats); NaN fails every check."""
        if not (0.0 <= group["lr"] < math.inf):
            raise ValueError(f"lr must be >= 0 and finite, got {group['lr']}")
        if not (0.0 <= group["weight_decay"] < math.inf):
            raise ValueError(f"weight_decay must be >= 0 and finite, got {group['weight_decay']}")
        check_rounding(group["rounding"])

    # ------------------------------------------------------------ state
    def _state_layout(self, p: torch.Tensor, group: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of each state tensor of ``p``: what a fresh state holds and a saved one must match."""
        shape = _real(p).shape  # complex: the real view's; a DTensor's: the whole tensor's
        layout = {}
        for name in self.moment_names:
            fmt = self._moment_format(name, shape)
            layout.update(zip(fmt.keys(name), zip(fmt.shapes(shape), fmt.dtypes, strict=True), strict=True))
        if _is_quantized(p) and group["master_weights"]:
            layout["master"] = (tuple(shape), torch.float32)
        return layout

    def _moment_format(self, name: str, shape) -> states.StateFormat:
        """The state format of moment ``name`` of a parameter of ``shape`` (a factored v needs two dimensions)."""
        return states.for_shape(self.state_formats[name], shape)

    def _moments(self, p: torch.Tensor, state: dict) -> list:
        """``state``'s moments of ``p`` as ``reference.Moment``s, in ``moment_names`` order."""
        shape = _real(p).shape
        out = []
        for name in self.moment_names:
            fmt = self._moment_format(name, shape)
            out.append(reference.Moment(fmt, tuple(state[k] for k in fmt.keys(name))))
        return out

    def _steps_whole(self, p: torch.Tensor) -> bool:
        """Whether each rank steps all of sharded ``p`` (``distributed.steps_whole``)."""
        shape = _real(p).shape
        return distributed.steps_whole(p, shape, [self._moment_format(name, shape) for name in self.moment_names])

    def _state_for(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            shape = _real(p).shape
            whole = self._steps_whole(p)
            for name in self.moment_names:
                fmt = self._moment_format(name, shape)
                state.update(zip(fmt.keys(name), distributed.allocate_state(fmt, p, shape, whole), strict=True))
            if _is_quantized(p) and group["master_weights"]:
                state["master"] = distributed.shardwise(p, lambda w: w.dequantize(torch.float32))
        return state

    def _check_state(self, p: torch.Tensor, group: dict) -> None:
        """An existing state must still fit ``p`` and the options (they may have changed since it was made)."""
        state = self.state.get(p)
        if not state:
            return
        layout = self._state_layout(p, group)
        if len(state) == len(layout) + 1:  # the usual case, cheaply: "step" and the layout's tensors
            for name, (shape, dtype) in layout.items():
                kept = state.get(name)
                if not isinstance(kept, torch.Tensor) or kept.shape != shape or kept.dtype != dtype:
                    break
            else:
                return
        kept = {name: (tuple(t.shape), t.dtype) for name, t in state.items() if isinstance(t, torch.Tensor)}
        if kept != layout:
            raise RuntimeError(
                f"the state of a parameter of shape {tuple(p.shape)} holds {kept} but this optimizer keeps "
                f"{layout}: the parameter or the optimizer's options changed after its first step. Nothing was "
                "updated."
            )

    def _next_seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self.generator).item())

    # ------------------------------------------------------------ step
    def _checked_work(self, selection: dict[int, list] | None = None) -> list:
        """``(group, param, backend)`` for each parameter to step, after every check that needs no arithmetic.

        ``group`` is a copy with tensor options as floats. Nothing is changed
        here, so a step that fails a check leaves states, step counts and the
        generator as they were. ``selection`` (``{group index: params}``)
        limits the work to those parameters (gradient release steps them one
        at a time); by default every parameter with a gradient.
        """
        work = []
        for index, group in enumerate(self.param_groups):
            if selection is not None and index not in selection:
                continue
            resolved = _resolved(group)
            try:
                self._validate_group(resolved)
            except ValueError as error:
                raise ValueError(f"param group {index}: {error}. Nothing was updated.") from error
            for p in group["params"] if selection is None else selection[index]:
                _check_param(self, p)
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients; use dense gradients "
                        "(for nn.Embedding, sparse=False)"
                    )
                self._check_state(p, resolved)
                work.append((resolved, p, backends.select(self.backend, distributed.local_tensor(p))))
        return work

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One optimizer step; with gradient release, the step of the gradients backward did not release."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.gradient_release is not None:
            self.gradient_release.release_remaining()
            return loss
        work = self._checked_work()
        problem = self._problem(work)
        if problem is not None:
            if self.nonfinite == "raise":
                raise FloatingPointError(
                    f"a step with {problem}; nothing was updated. Lower the learning rate, clip or scale the loss, "
                    "or pass nonfinite='skip' to skip such steps"
                )
            self.skipped_steps += 1
            warnings.warn(
                f"{type(self).__name__}: skipped a step with {problem} (nothing was updated; "
                f"{self.skipped_steps} skipped so far)", RuntimeWarning, stacklevel=2,
            )
            return loss
        self._apply(work)
        return loss

    def _problem(self, work: list) -> str | None:
        """Why the step of ``work`` must change nothing, or None: a gradient that is not finite or whose
        square overflows fp32, or coefficients that overflow fp32 (``reference.check_scalars``)."""
        in_range = _gradients_in_range([_real(distributed.local_tensor(p.grad)) for _, p, _ in work])
        if not distributed.all_ranks_agree(in_range, [p for _, p, _ in work]):  # a shard's NaN skips every rank
            return "non-finite gradients (NaN, inf, or a magnitude of 2**63 or more, whose square overflows fp32)"
        reason = self._scalars_problem(work)
        return None if reason is None else f"coefficients that overflow fp32 ({reason})"

    def _draws_seed(self, p: torch.Tensor, group: dict) -> bool:
        """Whether stepping ``p`` draws a seed from the generator (the order of draws is the order of steps):
        a quantized weight rounded stochastically, or any state format stored with stochastic rounding."""
        if _is_quantized(p) and group["rounding"] == "stochastic":
            return True
        shape = _real(p).shape
        return any(self._moment_format(name, shape).stochastic for name in self.moment_names)

    def _apply(self, work: list, seeds: dict | None = None) -> None:
        """Step every parameter of ``work`` (checked by ``_checked_work``, passed by ``_problem``).

        Seeds are drawn here in ``work`` order, unless ``seeds`` (``{param:
        seed}``, drawn beforehand in parameter order by gradient release) has them.
        """
        # One backend call per (backend, group, step count, state formats[, format]); the backend groups by dtypes.
        plain_batches: dict = {}
        quantized_batches: dict = {}
        for group, p, backend in work:
            state = self._state_for(p, group)
            state["step"] += 1
            seed = None
            if self._draws_seed(p, group):
                seed = seeds[p] if seeds is not None and p in seeds else self._next_seed()
            # this rank's shards (FSDP2); a shard of no rows is stepped too: its reductions pair with the others'
            p, state = distributed.local_view(p, self._steps_whole(p)), distributed.local_state(state)
            moments = self._moments(p, state)
            formats = tuple(mo.fmt for mo in moments)
            if isinstance(p, QuantizedTensor):
                key = (backend.__name__, id(group), state["step"], formats, p.fmt)
                batches = quantized_batches
            else:
                key = (backend.__name__, id(group), state["step"], formats)
                batches = plain_batches
            batches.setdefault(key, (backend, group, state["step"], []))[3].append((p, state, seed, moments))
        for backend, group, step, items in quantized_batches.values():
            self._step_quantized(backend, *(list(x) for x in zip(*items, strict=True)), group, step)
        for backend, group, step, items in plain_batches.values():
            self._step_plain(backend, *(list(x) for x in zip(*items, strict=True)), group, step)
            distributed.write_back(p for p, *_ in items)  # a whole-stepped sharded 1-D parameter

    def _scalars_problem(self, work: list) -> str | None:
        """Why some parameter's coefficients this step cannot run in fp32 (``reference.check_scalars``), or None."""
        seen = set()
        for group, p, _ in work:
            step = self.state[p]["step"] + 1 if self.state.get(p) else 1
            inject = _injects(group) and _is_quantized(p)  # plain parameters inject nothing
            if (id(group), step, inject) not in seen:
                seen.add((id(group), step, inject))
                problem = reference.check_scalars(self._scalars(group, step, inject=inject))
                if problem is not None:
                    return problem
        return None

    def _quantized_kwargs(self, params: list, param_states: list, seeds: list, group: dict) -> dict:
        return dict(
            masters=[st.get("master") for st in param_states], fmt=params[0].fmt, shapes=[p.shape for p in params],
            rounding=group["rounding"], seeds=seeds, update_weight=group["lr"] != 0.0, **_shard_kwargs(params),
        )

    def _step_quantized(self, backend, params, param_states, seeds, moments, group, step):  # pragma: no cover
        """ECO update of quantized ``params`` (same group, step count, format and state formats) in one call."""
        raise NotImplementedError

    def _step_plain(self, backend, params, param_states, seeds, moments, group, step):  # pragma: no cover
        """Plain update of ``params`` (same group, step count and state formats; complex ones as real views)."""
        raise NotImplementedError

    # ------------------------------------------------------------ state_dict
    def state_dict(self) -> dict:
        """torch's state_dict; eco's own entries ride in the param groups, the part of an optimizer state_dict
        that ``torch.distributed.checkpoint.state_dict`` keeps (it drops other top-level keys): each group lists
        the format of each of its parameters (``eco_formats``) and holds the rounding generator's state, the
        skipped-step count and the state formats (the same in every group: a group's entry does not depend on
        its position)."""
        sd = super().state_dict()
        formats = iter(self._formats())
        generator_state = self.generator.get_state()
        for group in sd["param_groups"]:
            group["eco_formats"] = [next(formats) for _ in group["params"]]
            group["eco_generator_state"] = generator_state
            group["eco_skipped_steps"] = self.skipped_steps
            group["eco_state_formats"] = self._state_format_names()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict of this optimizer, or of ``torch.optim.AdamW``/``SGD`` (the migration path).

        Everything is checked before anything changes: the model (group and
        parameter counts, shapes) and quantization formats; each saved state
        tensor against what this optimizer keeps (an eco state_dict names its
        state formats, which must be this optimizer's; a torch state_dict's
        dtypes are converted only when that is exact, e.g. bfloat16 -> float32);
        NaN/inf in saved states; the options of
        each group. Saved group options win, as in torch; options the saved
        group lacks (a torch state_dict has no ``rounding``) keep their current
        values. Unlike torch, state tensors are not cast to the parameter's dtype.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        state_dict = _eco_entries_lifted(state_dict)
        generator_state = state_dict.pop("eco_generator_state", None)
        skipped = state_dict.pop("eco_skipped_steps", 0)
        formats = state_dict.pop("eco_formats", None)
        state_formats = state_dict.pop("eco_state_formats", None)
        if state_formats is not None and state_formats != self._state_format_names():
            raise ValueError(
                f"this state_dict was saved with state formats {state_formats}, but this {type(self).__name__} "
                f"keeps {self._state_format_names()}: build it with the same momentum=/second_moment= "
                "(momentum_state= for SGD) or state_dtype= to resume. Nothing was loaded."
            )
        self._check_compatible(state_dict, formats)
        groups = [self._loaded_group(saved, current)
                  for saved, current in zip(state_dict["param_groups"], self.param_groups, strict=True)]
        group_of = {id(p): g for g in groups for p in g["params"]}
        id_to_param = self._saved_id_to_param(state_dict)
        state: defaultdict = defaultdict(dict)
        for pid, saved in state_dict["state"].items():
            p = id_to_param.get(pid)
            state[p if p is not None else pid] = (saved if p is None
                                                  else self._loaded_state(pid, saved, p, group_of[id(p)]))
        self._check_finite_states(state)
        # everything checked: from here on nothing can fail
        self.state = state
        self.param_groups = groups
        if generator_state is not None:
            self.generator.set_state(generator_state)
        self.skipped_steps = skipped
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _loaded_group(self, saved: dict, current: dict) -> dict:
        group = deepcopy({k: v for k, v in saved.items() if k not in ("params", *_IMPLEMENTATION_OPTIONS)})
        for name, value in self.torch_equivalents.items():
            if name in group and group.pop(name) != value:
                raise ValueError(
                    f"this state_dict was saved with {name}={saved[name]!r}, which {type(self).__name__} does not "
                    f"implement (it computes what torch.optim does with {name}={value!r})"
                )
        self._adopt_torch_options(group)
        for key, value in current.items():
            group.setdefault(key, value)
        group["params"] = current["params"]
        try:
            self._validate_group(_resolved(group))
        except ValueError as error:
            raise ValueError(f"a saved param group has a bad option: {error}") from error
        return group

    def _adopt_torch_options(self, group: dict) -> None:
        """Turn a loaded group's torch.optim options into this optimizer's, or refuse them (in place)."""

    def _loaded_state(self, pid, saved: dict, p: torch.Tensor, group: dict) -> dict:
        """``saved`` (the state of parameter ``pid``) checked against what this optimizer keeps for ``p``."""
        if not saved:
            return {}
        layout = self._state_layout(p, group)
        missing = [name for name in layout if not isinstance(saved.get(name), torch.Tensor)]
        if missing:
            raise ValueError(
                f"saved state of parameter {pid} lacks {', '.join(map(repr, missing))}: not a state_dict of a "
                f"{type(self).__name__} with these options (master_weights={group['master_weights']})"
            )
        if "step" not in saved and self.update_counts_steps:
            raise ValueError(f"saved state of parameter {pid} has no 'step': its bias correction is unknown")
        out = {"step": 0}
        for key, value in saved.items():
            if key == "step":
                out[key] = _loaded_step(pid, value)
                continue
            if not isinstance(value, torch.Tensor):
                out[key] = value
                continue
            if key not in layout:
                raise ValueError(
                    f"saved state of parameter {pid} has {key!r}, which this {type(self).__name__} does not keep: "
                    "it was saved with other options"
                )
            shape, dtype = layout[key]
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"saved {key} of parameter {pid} has shape {tuple(value.shape)} but the parameter "
                    f"has shape {tuple(p.shape)}: the state_dict belongs to another model"
                )
            if not _lossless(value.dtype, dtype):
                raise ValueError(
                    f"saved {key} of parameter {pid} is {value.dtype} but this optimizer keeps it in {dtype} "
                    f"(state formats {self._state_format_names()}); converting would round the saved state. Build "
                    "the optimizer with the options it was saved with to resume."
                )
            out[key] = value.to(device=p.device, dtype=dtype)
        return out

    @staticmethod
    def _check_finite_states(state: dict) -> None:
        tensors = [(p, k, distributed.local_tensor(v)) for p, st in state.items() if isinstance(p, torch.Tensor)
                   for k, v in st.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
        finite = _all_finite([v for _, _, v in tensors])
        if distributed.all_ranks_agree(finite, list(state)):  # every rank refuses, or none
            return
        bad = next((k for _, k, v in tensors if not _all_finite([v])), "(on another rank)")
        raise ValueError(
            f"a saved {bad!r} state holds NaN or inf: stepping from it would write NaN or zeros into the weights. "
            "Resume from an earlier checkpoint. Nothing was loaded."
        )

    def _state_format_names(self) -> dict:
        return {name: fmt.name for name, fmt in self.state_formats.items()}

    def _formats(self) -> list:
        """The quantization format of every parameter, in param-group order (None: unquantized)."""
        shards = [distributed.local_tensor(p) for g in self.param_groups for p in g["params"]]
        return [p.fmt.config() if isinstance(p, QuantizedTensor) else None for p in shards]

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
        momentum, second_moment: state formats of ``exp_avg`` and ``exp_avg_sq`` (see module docstring).
        state_dtype: ``torch.float32`` or ``torch.bfloat16`` for both (instead of the formats).
        error_feedback: ``False`` gives naive master-weight removal (no injection).
        master_weights: ``True`` keeps an fp32 master copy (the baseline ECO removes).
        decay_corrected_injection: multiply the injection by ``1 - lr*wd`` (the paper form is the default).
        seed, generator: make stochastic rounding reproducible (a CPU generator draws one seed per step and tensor).
            Without either, the seed comes from ``torch.manual_seed``; under an initialized ``torch.distributed``
            from rank 0, so that replicas round alike (every rank must then build the optimizer).
        nonfinite: ``"skip"`` or ``"raise"`` on NaN/inf gradients (see module docstring).
        backend: ``"auto"``, ``"reference"``, ``"compiled"`` or ``"triton"`` (see module docstring).
        gradient_release: ``True`` (or a dict of :func:`eco.release_gradients` options, e.g.
            ``{"max_grad_norm": 1.0}``) steps each parameter during backward as soon as its gradient is
            complete, and frees the gradient (see :mod:`eco.release`).
    """

    moment_names = ("exp_avg", "exp_avg_sq")
    torch_equivalents = {"amsgrad": False, "maximize": False}

    def __init__(
        self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
        weight_decay: float = 1e-2, *, rounding: str = "stochastic", momentum: str | None = None,
        second_moment: str | None = None, state_dtype: torch.dtype | None = None,
        error_feedback: bool = True, master_weights: bool = False, decay_corrected_injection: bool = False,
        seed: int | None = None, generator: torch.Generator | None = None, nonfinite: str = "skip",
        backend: str = "auto", gradient_release: bool | dict = False,
    ):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rounding=rounding,
            error_feedback=error_feedback, master_weights=master_weights,
            decay_corrected_injection=decay_corrected_injection,
        )
        super().__init__(params, defaults, state_dtype=state_dtype,
                         state_formats={"exp_avg": momentum, "exp_avg_sq": second_moment}, seed=seed,
                         generator=generator, nonfinite=nonfinite, backend=backend, gradient_release=gradient_release)

    def _validate_group(self, group):
        super()._validate_group(group)
        beta1, beta2 = group["betas"]
        if not (0.0 < beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"betas must satisfy 0 < beta1 < 1 and 0 <= beta2 < 1, got {group['betas']}")
        if not (0.0 < group["eps"] < math.inf):
            raise ValueError(f"eps must be > 0 and finite, got {group['eps']}")

    def _adopt_torch_options(self, group):
        # as torch.optim.AdamW, take a torch.optim.Adam state too: this optimizer's weight decay is decoupled
        group.pop("decoupled_weight_decay", None)

    def _scalars(self, group, step, inject):
        beta1, beta2 = group["betas"]
        return reference.adamw_scalars(
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            step=step, inject=inject, decay_corrected_injection=group["decay_corrected_injection"],
        )

    def _step_quantized(self, backend, params, param_states, seeds, moments, group, step):
        m, v = zip(*moments, strict=True)
        backend.adamw_steps_(
            [p.codes for p in params], [p.scales for p in params], [p.grad for p in params],
            list(m), list(v), scalars=self._scalars(group, step, inject=_injects(group)),
            **self._quantized_kwargs(params, param_states, seeds, group),
        )

    def _step_plain(self, backend, params, param_states, seeds, moments, group, step):
        m, v = zip(*moments, strict=True)
        backend.plain_adamw_steps_(
            [_real(p) for p in params], [_real(p.grad) for p in params], list(m), list(v),
            scalars=self._scalars(group, step, inject=False), seeds=seeds, **_shard_kwargs(params),
        )


class SGD(_ECOOptimizer):
    """ECO with SGD + momentum (paper eqs. 2-6).

    Momentum is an exponential moving average, ``m = beta*m + (1-beta)*g``
    (``torch.optim.SGD`` with ``dampening=momentum``, starting from zero);
    weight decay is added to the gradient. The ECO injection needs
    ``0 < momentum < 1``. ``momentum_state``: the state format of the
    momentum buffer (``"fp32"``, ``"bf16"``, ``"int8"``, ``"fp8"`` or
    ``"8bit"``). Other options as :class:`AdamW`.
    """

    moment_names = ("momentum_buffer",)
    torch_equivalents = {"maximize": False, "nesterov": False}
    update_counts_steps = False

    def __init__(
        self, params: Iterable, lr: float = 1e-2, momentum: float = 0.9, weight_decay: float = 0.0, *,
        rounding: str = "stochastic", momentum_state: str | None = None, state_dtype: torch.dtype | None = None,
        error_feedback: bool = True, master_weights: bool = False, seed: int | None = None,
        generator: torch.Generator | None = None, nonfinite: str = "skip", backend: str = "auto",
        gradient_release: bool | dict = False,
    ):
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, rounding=rounding,
            error_feedback=error_feedback, master_weights=master_weights,
        )
        super().__init__(params, defaults, state_dtype=state_dtype, state_formats={"momentum_buffer": momentum_state},
                         seed=seed, generator=generator, nonfinite=nonfinite, backend=backend,
                         gradient_release=gradient_release)

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

    def _adopt_torch_options(self, group):
        dampening = group.pop("dampening", None)
        if dampening is not None and dampening != group.get("momentum"):
            raise ValueError(
                f"this state_dict was saved by torch.optim.SGD with dampening={dampening} and momentum="
                f"{group.get('momentum')}: its momentum buffer is not eco.SGD's moving average (torch.optim.SGD with "
                "dampening=momentum), so the run cannot be resumed exactly"
            )

    def _scalars(self, group, step=None, inject=False):
        return reference.sgd_scalars(
            lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"], inject=inject
        )

    def _step_quantized(self, backend, params, param_states, seeds, moments, group, step):
        backend.sgd_steps_(
            [p.codes for p in params], [p.scales for p in params], [p.grad for p in params],
            [mo[0] for mo in moments], scalars=self._scalars(group, inject=_injects(group)),
            **self._quantized_kwargs(params, param_states, seeds, group),
        )

    def _step_plain(self, backend, params, param_states, seeds, moments, group, step):
        backend.plain_sgd_steps_([_real(p) for p in params], [_real(p.grad) for p in params],
                                 [mo[0] for mo in moments], scalars=self._scalars(group, inject=False),
                                 seeds=seeds, **_shard_kwargs(params))
