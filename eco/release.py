"""Gradient release: each parameter steps during backward, as soon as its gradient is complete.

Switched on with ``eco.AdamW(..., gradient_release=True)`` (``eco.SGD`` alike;
a dict of options instead of ``True``, e.g. ``{"max_grad_norm": 1.0}``), or
with ``eco.release_gradients(optimizer, ...)`` for an optimizer built without
it. The handle is ``optimizer.gradient_release``; its ``remove()`` switches the
mode off. A hook (``Tensor.register_post_accumulate_grad_hook``) on every
trainable parameter steps it when autograd has accumulated its gradient, then
frees the gradient: during backward only the gradients still being computed
exist, so a training step's peak drops by the model's gradients (2 bytes per
parameter in bf16). The training loop does not change.

What each part of training means in this mode:

Steps
    A backward that releases gradients is one optimizer step; it ends when
    backward returns. Each parameter is stepped alone, with the checks and the
    update of ``step()``. ``optimizer.step()`` steps, the same way, the
    parameters whose gradients backward did not release (set by hand, or
    accumulated inside ``no_step()`` with no releasing backward after), and
    otherwise changes nothing. Keep calling it: LR schedulers count its calls,
    the Hugging Face Trainer calls it. ``zero_grad()`` is unchanged.
Gradient accumulation
    Inside ``with optimizer.gradient_release.no_step():`` backward steps
    nothing and gradients accumulate in ``.grad`` as usual; the first backward
    outside it steps. Wrap every micro-batch but the last. Under ``accelerate``
    (and so the Hugging Face Trainer, with ``gradient_accumulation_steps``) a
    backward while accelerate does not sync gradients
    (``GradientState.sync_gradients`` false: the micro-batches before the last)
    steps nothing either.
Gradient clipping
    Global clipping needs every gradient at once, which this mode never holds.
    ``max_grad_norm`` clips with ``clipping="previous"`` (default) each
    gradient of a step by the global norm of the previous step's gradients,
    with ``torch.nn.utils.clip_grads_with_norm_`` (the factor
    ``min(1, max_grad_norm / (norm + 1e-6))`` of ``clip_grad_norm_``): the
    first step, which has no previous norm, is not clipped, and a spike is
    clipped from the step after it on. ``clipping="per_tensor"`` clips each
    gradient by its own norm, as ``clip_grad_norm_([p], max_grad_norm)``.
    ``grad_norm`` is the global norm of the last step's unclipped gradients,
    measured during backward (the per-tensor norms of ``get_total_norm``
    combined in fp32, in parameter order). With the Hugging Face Trainer pass
    ``max_grad_norm`` in the optimizer's options and set the Trainer's
    ``max_grad_norm=0``: when the Trainer clips, no gradient is left (it clips
    nothing and logs a grad_norm of 0).
Non-finite gradients
    Each gradient is checked before its parameter steps (the check of
    ``step()``). A NaN or inf found after other parameters of the step stepped
    cannot undo their update: with ``nonfinite="skip"`` that parameter and
    every one after it in this step change nothing (their gradients are
    freed), the step counts once in ``optimizer.skipped_steps`` and warns;
    with ``"raise"`` a ``FloatingPointError`` leaves ``backward()`` with the
    same split. Either way every parameter either stepped from a finite
    gradient or is untouched: no NaN reaches a weight or a state.
Learning rates and param groups
    A parameter steps with its group's options as they are when its gradient
    arrives, so an LR scheduler stepped after ``optimizer.step()`` sets the
    learning rate of the next backward, as usual.
State dict
    ``optimizer.state_dict()`` carries the previous step's norm (what
    ``clipping="previous"`` divides by) under ``"eco_gradient_release"``; a
    run resumed from it continues bit-identically.
Stochastic rounding
    A step's seeds are drawn at its first released gradient, in parameter
    order, for every trainable parameter that draws one: the seeds
    ``step()`` draws when every trainable parameter has a gradient.

So with no clipping, N steps in this mode equal N ordinary steps bit for bit
(with stochastic rounding: when every trainable parameter gets a gradient in
every step). Not for DistributedDataParallel or FSDP: they reduce a gradient
after it is accumulated, so the parameter would step on its local gradient.
A copy or pickle of the optimizer steps in ``step()``; release it again.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

CLIPPINGS = ("previous", "per_tensor")
STATE_KEY = "eco_gradient_release"


def _accelerate_syncs() -> bool:
    """False while accelerate (the Hugging Face Trainer) accumulates micro-batches without syncing gradients."""
    state = sys.modules.get("accelerate.state")
    shared = getattr(getattr(state, "GradientState", None), "_shared_state", None)
    return bool(shared.get("sync_gradients", True)) if shared else True


@dataclass(eq=False)
class _Step:
    """One released step in progress."""

    group_of: dict  # param -> index of its param group
    graph_task: int  # autograd's id of the backward that releases it (-1: optimizer.step())
    seeds: dict = field(default_factory=dict)  # param -> seed, drawn in parameter order
    norms: dict = field(default_factory=dict)  # param -> norm of its gradient before clipping
    problem: str | None = None  # set at the first bad gradient: the rest of the step changes nothing
    stepped: int = 0
    skipped: int = 0


class GradientRelease:
    """The gradient-release mode of one eco optimizer (see the module docstring); made by :func:`release_gradients`."""

    def __init__(self, optimizer, *, max_grad_norm: float | None = None, clipping: str = "previous"):
        if getattr(optimizer, "gradient_release", None) is not None:
            raise RuntimeError("this optimizer already releases gradients (optimizer.gradient_release)")
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float))
                                              and 0 < max_grad_norm < math.inf):
            raise ValueError(f"max_grad_norm must be a finite number > 0, or None for no clipping; got "
                             f"{max_grad_norm!r}")
        if clipping not in CLIPPINGS:
            raise ValueError(f"clipping must be one of {CLIPPINGS}, got {clipping!r}")
        if clipping != "previous" and max_grad_norm is None:
            raise ValueError(f"clipping={clipping!r} needs max_grad_norm")
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.clipping = clipping
        #: global norm (fp32 0-d tensor) of the last completed step's gradients before clipping; None before
        #: the first one and after a skipped one
        self.grad_norm: torch.Tensor | None = None
        self._previous_norm: torch.Tensor | None = None  # what clipping="previous" divides by
        self._loaded_norm: torch.Tensor | None = None
        self._hooks: dict = {}  # param -> (handle of its post-accumulate-grad hook, id of the tensor it is on)
        self._holds = 0
        self._step: _Step | None = None
        self._state_dict_hooks = [
            optimizer.register_state_dict_post_hook(self._save),
            optimizer.register_load_state_dict_pre_hook(self._load),
            optimizer.register_load_state_dict_post_hook(self._loaded),
        ]
        optimizer.gradient_release = self
        self.watch(p for group in optimizer.param_groups for p in group["params"])

    # ------------------------------------------------------------ switching
    def watch(self, params: Iterable[torch.Tensor]) -> None:
        """Hook ``params`` (the optimizer's, e.g. of a new param group); frozen ones get no gradient and no hook."""
        for p in params:
            if p.requires_grad and p not in self._hooks:
                self._hooks[p] = (p.register_post_accumulate_grad_hook(self._on_gradient), p._cdata)

    def _restore_hooks(self) -> None:
        """Re-attach the hooks of parameters whose tensor was swapped since they were hooked.

        ``module.to()`` (``accelerate``'s ``prepare``, so the Hugging Face
        Trainer) gives a wrapper-subclass parameter (a quantized weight) a new
        tensor with ``torch.utils.swap_tensors``: the parameter keeps its hook
        table but autograd no longer calls it. Assigning the table attaches it
        to the new tensor (hooks of other owners come back too).
        """
        for p, (handle, tensor_id) in self._hooks.items():
            if p._cdata != tensor_id:
                p._post_accumulate_grad_hooks = p._post_accumulate_grad_hooks
                self._hooks[p] = (handle, p._cdata)

    def remove(self) -> None:
        """Switch gradient release off: the optimizer steps in ``step()`` again."""
        for handle in [*(h for h, _ in self._hooks.values()), *self._state_dict_hooks]:
            handle.remove()
        self._hooks.clear()
        self._state_dict_hooks.clear()
        self._step = None
        if self.optimizer.gradient_release is self:
            self.optimizer.gradient_release = None

    @contextmanager
    def no_step(self):
        """Backward inside this context steps nothing: gradients accumulate (every micro-batch but the last)."""
        self._holds += 1
        try:
            yield self
        finally:
            self._holds -= 1

    # ------------------------------------------------------------ stepping
    def _on_gradient(self, p: torch.Tensor) -> None:
        if self._holds or not _accelerate_syncs():
            return
        task = torch._C._current_graph_task_id()
        step = self._step
        if step is None or step.graph_task != task:  # the first gradient of this backward
            step = self._begin(lambda q: q.requires_grad, task)
            torch.autograd.Variable._execution_engine.queue_callback(lambda: self._end(step))
        self._release(step, p)

    def release_remaining(self) -> None:
        """What ``optimizer.step()`` does: the gradients backward did not release, in parameter order, as one step."""
        left = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if left:
            chosen = set(left)
            step = self._begin(lambda q: q in chosen, -1)
            for p in left:
                self._release(step, p)
            self._end(step)

    def _begin(self, draws, graph_task: int) -> _Step:
        """A new step; seeds drawn now, in parameter order, for the parameters ``draws`` selects that draw one.

        A step still open (its backward failed before the end) is closed first. Parameters unhooked since
        the last step are hooked (again): from this backward on where autograd has not reached them yet, else
        from the next; ``step()`` steps their gradients meanwhile.
        """
        if self._step is not None:
            self._end(self._step)
        optimizer = self.optimizer
        step = _Step({p: i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}, graph_task)
        self._restore_hooks()
        self.watch(step.group_of)  # parameters made trainable since
        for group in optimizer.param_groups:
            for p in group["params"]:
                if draws(p) and optimizer._draws_seed(p, group):
                    step.seeds[p] = optimizer._next_seed()
        self._step = step
        return step

    @torch.no_grad()
    def _release(self, step: _Step, p: torch.Tensor) -> None:
        """Step ``p`` from its gradient (clipped) and free the gradient; the non-finite policy per the docstring."""
        index = step.group_of.get(p)
        if p.grad is None or index is None:  # no gradient, or no longer the optimizer's parameter
            return
        if step.problem is not None:
            p.grad = None
            step.skipped += 1
            return
        optimizer = self.optimizer
        try:
            work = optimizer._checked_work({index: [p]})
            problem = optimizer._problem(work)
        except Exception:
            self._step = None  # the step ends here; what stepped before stands
            raise
        if problem is not None:
            if optimizer.nonfinite == "raise":
                self._step = None
                raise FloatingPointError(
                    f"gradient release met {problem} after {step.stepped} parameters of this step had stepped "
                    "(their update stands); this parameter and the rest of the step were not updated. Lower the "
                    "learning rate, clip or scale the loss, or pass nonfinite='skip' to skip the rest of such steps"
                )
            step.problem = problem
            step.skipped += 1
            p.grad = None
            return
        norm = torch.nn.utils.get_total_norm([p.grad])
        step.norms[p] = norm
        if self.max_grad_norm is not None:
            divisor = norm if self.clipping == "per_tensor" else self._previous_norm
            if divisor is not None:
                torch.nn.utils.clip_grads_with_norm_([p], self.max_grad_norm, divisor)
        optimizer._apply(work, step.seeds)
        p.grad = None
        step.stepped += 1

    def _end(self, step: _Step) -> None:
        """Close ``step`` (when backward or ``step()`` is done): its norm, or the skip count and warning."""
        if self._step is not step:
            return
        self._step = None
        optimizer = self.optimizer
        if step.problem is not None:
            optimizer.skipped_steps += 1
            self.grad_norm = None
            warnings.warn(
                f"{type(optimizer).__name__}: gradient release skipped the rest of a step at {step.problem}: "
                f"{step.stepped} parameters had stepped from finite gradients (their update stands), {step.skipped} "
                f"did not step ({optimizer.skipped_steps} steps skipped so far)", RuntimeWarning, stacklevel=2,
            )
            return
        if step.norms:
            norms = [step.norms[p] for group in optimizer.param_groups for p in group["params"] if p in step.norms]
            device = norms[0].device
            self.grad_norm = torch.linalg.vector_norm(torch.stack([n.float().to(device) for n in norms]))
            self._previous_norm = self.grad_norm

    # ------------------------------------------------------------ state_dict
    def _save(self, optimizer, state_dict: dict) -> dict:
        norm = self._previous_norm
        state_dict[STATE_KEY] = {"previous_grad_norm": None if norm is None else float(norm)}
        return state_dict

    def _load(self, optimizer, state_dict: dict) -> dict:
        """Checked before the optimizer changes anything; taken over by ``_loaded`` once the load succeeded."""
        saved = state_dict.pop(STATE_KEY, None)
        norm = saved.get("previous_grad_norm") if isinstance(saved, Mapping) else saved
        if norm is not None and not (isinstance(norm, float) and 0 <= norm < math.inf):
            raise ValueError(f"the saved {STATE_KEY} is {saved!r}: expected {{'previous_grad_norm': a finite "
                             "float >= 0 or None}. Nothing was loaded.")
        self._loaded_norm = None if norm is None else torch.tensor(norm, dtype=torch.float32)
        return state_dict

    def _loaded(self, optimizer) -> None:
        self._previous_norm = self._loaded_norm


def release_gradients(optimizer, *, max_grad_norm: float | None = None, clipping: str = "previous"
                      ) -> GradientRelease:
    """Switch gradient release on for an ``eco.AdamW``/``eco.SGD`` (see :mod:`eco.release`); returns the handle."""
    from .optim import _ECOOptimizer

    if not isinstance(optimizer, _ECOOptimizer):
        raise TypeError(f"gradient release steps eco optimizers (eco.AdamW, eco.SGD); got {type(optimizer).__name__}")
    return GradientRelease(optimizer, max_grad_norm=max_grad_norm, clipping=clipping)


def switch_on(optimizer, option: bool | Mapping) -> None:
    """The optimizers' ``gradient_release=``: False, True, or a dict of :func:`release_gradients` options."""
    if option is False or option is None:
        return
    if option is True:
        release_gradients(optimizer)
    elif isinstance(option, Mapping):
        release_gradients(optimizer, **option)
    else:
        raise TypeError(f"gradient_release must be True, False or a dict of options (max_grad_norm, clipping); "
                        f"got {option!r}")


__all__ = ["CLIPPINGS", "GradientRelease", "release_gradients"]
