"""The one list of kernel specializations the optimizer launches (``SPECS``).

Dispatch (``eco.kernels``) finds the entry for each launch here and takes the
constexprs, warps and options from it; the tests launch through the same
entries; ahead-of-time compilation walks the whole list. So what is compiled
ahead of time is exactly what runs.

Which state formats have kernels: every (m, v) pair of ``eco.states``
formats (:data:`STEP_STATES`), for quantized weights with and without an
fp32 master copy; many small weights share one launch for the pairs of
:data:`MULTI_STATES` (the others take one launch per weight). Plain
parameters run the flat plain kernels when both moments are fp32 or both
bf16 (:data:`PLAIN_STATES`), and the step kernel's tiles for every other pair
(:data:`PLAIN_TILE_STATES`).

Fields of a :class:`KernelSpec`:

``name``
    Unique, readable id, e.g. ``"adamw/fp8-block128/stochastic/state-int8-factored/grad-bf16"``.
``fn``
    The ``@triton.jit`` function.
``signature``
    Every argument of ``fn`` in order, name -> Triton type: ``"*u8"``,
    ``"*i8"``, ``"*fp32"``, ``"*bf16"``, ``"*i32"``, ``"*i64"`` for pointers
    (FP8 and INT4 codes, and E4M3 state codes, are passed as their ``uint8``
    view), ``"i32"``, ``"u32"``, ``"i64"``, ``"fp32"`` for scalars,
    ``"constexpr"`` for compile-time arguments. Ready for
    ``triton.compiler.ASTSource(fn, signature, constexprs, attrs)``.
``constexprs``
    Compile-time argument name -> value (ints and bools only). ``TARGET`` is
    0 here (the portable code the interpreter runs); a launch or an ahead-of-time
    build takes :meth:`KernelSpec.constexprs_for` its device's compute capability.
``aligned``
    Pointer arguments that are 16-byte aligned at every launch (the launcher
    checks it; ahead-of-time builds promise it to the compiler): the
    per-element streams and the tables; per-block and per-row state parts are not.
``num_warps``, ``options``
    Launch options; ``options`` always holds ``enable_fp_fusion=False``
    (no FMA contraction: bit-identity with the reference needs it), and
    ``maxnreg`` for some step kernels (see ``_step_tiling``).
``meta``
    What the entry is for: ``kernel`` (``"step"``, ``"step_multi"``: many
    tensors in one launch, ``"quantize"``, ``"dequantize"``, ``"plain"``,
    ``"plain_multi"``, ``"factored_stats"``, ``"factored_finalize"``),
    ``optimizer`` (``"adamw"``/``"sgd"``/None), ``format`` (``eco.formats``
    config dict, or None: a plain parameter), ``rounding``, ``states`` (the
    (m, v) state-format names, v None for SGD), ``grad_dtype`` (the input
    tensor's dtype for quantize; the parameter's for plain), ``out_dtype``
    (dequantize), ``master`` (fp32 master copy kept), ``pass`` (0: absmax
    pass of row/tensor formats, 1: the storing pass); ``factored_stats`` also
    ``rows_aligned`` (rows a multiple of 16 elements: 128-bit gradient loads;
    False: the ragged variant for other row lengths).

Scalar arguments (``k0..k7``, ``inject``) carry the host scalars of
``eco.reference.AdamWScalars``/``SGDScalars`` as fp32, in the slots named by
``eco.kernels.launcher.SCALAR_SLOTS``; ``*_stride``/``*_base`` the keys of
the weight, m and v random streams (``eco.rng.key``) as unsigned 32-bit ints.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from eco import formats
from eco import states as state_formats
from eco.formats import ROUNDINGS

from . import eco_step, moments

#: group sizes with kernels; formats with others run on the reference path
GROUP_SIZES = (32, 64, 128)
STEP_BLOCK = 1024          # elements per program, block/group formats
ROWWISE_BLOCK = 2048       # elements per program, row-wise FP8 / tensor-wise INT4 (fewer atomics)
MULTI_STEP_BLOCK = 2048    # elements per program, block/group formats in the multi-tensor step (8 warps)
PLAIN_BLOCK = 1024
STATS_TILE = (16, 128)     # rows x columns of a factored-statistics tile
STATS_ROW_TILES = 8        # tiles of rows per factored-statistics program (column sums in registers between them)
FINALIZE_BLOCK = 1024
OPTIONS = {"enable_fp_fusion": False}

#: torch dtype -> Triton's name of it (pointer types are ``"*" + name``)
TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "u8",
                 torch.int8: "i8", torch.int32: "i32", torch.int64: "i64", torch.float8_e4m3fn: "u8"}
#: gradient (and plain parameter, quantize input, dequantize output) dtypes with kernels
GRAD_DTYPES = (torch.float32, torch.bfloat16)
OPTIMIZERS = {"adamw": eco_step.OPT_ADAMW.value, "sgd": eco_step.OPT_SGD.value}
#: state-format name (``eco.states``) -> the M_FMT / V_FMT constexpr
STATE_FORMATS = {"fp32": moments.STATE_FP32.value, "bf16": moments.STATE_BF16.value,
                 "int8": moments.STATE_INT8.value, "fp8": moments.STATE_FP8.value,
                 "factored": moments.STATE_FACTORED.value}
#: (m, v) state formats with step kernels for quantized weights, with and without an fp32 master copy (v None:
#: SGD): every pair of ``eco.states`` formats
STEP_STATES = {
    "adamw": tuple((m, v) for m in state_formats.MOMENTUM_FORMATS for v in state_formats.SECOND_MOMENT_FORMATS),
    "sgd": tuple((m, None) for m in state_formats.MOMENTUM_FORMATS),
}
#: the pairs whose small weights also share multi-tensor launches (the others: one launch per weight)
MULTI_STATES = {
    "adamw": (("fp32", "fp32"), ("bf16", "bf16"), ("int8", "factored")),
    "sgd": (("fp32", None), ("bf16", None)),
}
#: plain parameters whose states the flat plain kernels store (both moments in one dtype)
PLAIN_STATES = ("fp32", "bf16")
#: plain parameters stepped on the step kernel's tiles (single and multi-tensor): every other pair
PLAIN_TILE_STATES = {
    name: tuple((m, v) for m, v in pairs if not (m in PLAIN_STATES and v in (None, m)))
    for name, pairs in STEP_STATES.items()
}


def format_configs() -> list[dict]:
    """Every format config (``QuantFormat.config()``) that has kernels."""
    configs = [{"name": "fp8", "group_size": None}, {"name": "int4", "group_size": None}]
    for size in GROUP_SIZES:
        configs += [{"name": "fp8", "group_size": size}, {"name": "int4", "group_size": size}]
    return configs


def format_tag(config: dict) -> str:
    return formats.format_tag(formats.format_from_config(config))


def states_tag(states: tuple) -> str:
    """``"bf16"`` for (bf16, bf16) or an SGD bf16 m, ``"int8-factored"`` for (int8, factored)."""
    m, v = states
    return m if v is None or v == m else f"{m}-{v}"


@dataclass(frozen=True)
class KernelSpec:
    name: str
    fn: object
    signature: dict
    constexprs: dict
    aligned: tuple
    num_warps: int
    meta: dict
    options: dict = field(default_factory=lambda: dict(OPTIONS))

    def constexprs_for(self, capability: int) -> dict:
        """The constexprs of a launch on compute capability ``capability`` (e.g. 90; 0: the interpreter)."""
        return {**self.constexprs, "TARGET": capability}


def _arg_names(fn) -> list[str]:
    return list(inspect.signature(fn.fn).parameters)


#: pointers that are not promised 16-byte alignment (per-block, per-row or per-matrix parts of the states)
UNALIGNED = ("exp_avg_scale_ptr", "exp_avg_sq_scale_ptr", "v_row_ptr", "v_col_ptr", "v_mean_ptr", "gmax_ptr")


def _spec(name, fn, types: dict, constexprs: dict, num_warps: int, meta: dict, options=None) -> KernelSpec:
    names = _arg_names(fn)
    constexprs = {**constexprs, "TARGET": 0}  # every kernel takes it; see KernelSpec.constexprs_for
    missing = set(names) - set(types) - set(constexprs)
    if missing:
        raise AssertionError(f"spec {name}: no type for {sorted(missing)}")
    signature = {n: ("constexpr" if n in constexprs else types[n]) for n in names}
    aligned = tuple(n for n in names if signature[n].startswith("*") and n not in UNALIGNED)
    return KernelSpec(name, fn, signature, dict(constexprs), aligned, num_warps, meta, dict(options or OPTIONS))


_SCALARS = {f"k{i}": "fp32" for i in range(8)} | {"inject": "fp32"}
_STREAMS = {f"{s}_{w}": "u32" for s in ("w", "m", "v") for w in ("stride", "base")}
_STEP_INTS = {"n_cols": "i32", "code_cols": "i32", "rows_per_scale": "i32", "n_scale_groups": "i32",
              "matrix_rows": "i32", **_STREAMS}
_STATE_POINTERS = {"fp32": "*fp32", "bf16": "*bf16", "int8": "*i8", "fp8": "*u8", "factored": "*fp32"}


def _state_types(states: tuple) -> dict:
    """Pointer types of the moments of a pair (unused parts: fp32 dummies)."""
    m, v = states
    return {"exp_avg_ptr": _STATE_POINTERS[m], "exp_avg_sq_ptr": _STATE_POINTERS[v or "fp32"],
            "exp_avg_scale_ptr": "*fp32", "exp_avg_sq_scale_ptr": "*fp32", "v_row_ptr": "*fp32",
            "v_col_ptr": "*fp32", "v_mean_ptr": "*fp32"}


def _step_tiling(group_size: int, multi: bool, e4m3_m: bool = False) -> tuple[int, int, dict]:
    """``(BLOCK, num_warps, options)`` of a step kernel: large tiles that compile without spills on every target.

    Block/group formats: 8 elements a thread (128-bit bf16 loads); the
    multi-tensor step also holds its table's offsets, and at 1024 x 4 warps it
    spilled around the IEEE div/sqrt slow-path calls, so it runs 2048 x 8
    warps. Row/tensor formats: 16 elements a thread (fewer atomics and
    instructions than with 8). Left to choose, ptxas capped the
    registers low and spilled (master-weight and multi-tensor steps, mostly
    sm_100, also single-tensor block steps with 8-bit or bf16 states, capped
    at 80); the explicit ``maxnreg`` below leaves room and nothing spills.
    Row/tensor steps with an E4M3 m hold two E4M3 states' codecs for 16
    elements (an E4M3 m and v with INT4 tensor-wise stochastic rounding spilled
    88 bytes on sm_90/100 at 160): they may take every register (2 blocks of
    4 warps per SM where ptxas uses more than 170, 3 below). Checked by
    ``tests/test_aot_compile.py`` (figures: docs/notes-from-code.md,
    docs/kernels.md).
    """
    if group_size:
        if multi:
            return MULTI_STEP_BLOCK, 8, {**OPTIONS, "maxnreg": 96}
        return STEP_BLOCK, 4, {**OPTIONS, "maxnreg": 128}
    return ROWWISE_BLOCK, 4, {**OPTIONS, "maxnreg": 255 if e4m3_m else 160}


def _step_spec(opt_name: str, config: dict | None, states: tuple, grad: torch.dtype, master: bool, pass_: int,
               rounding: str, multi: bool) -> KernelSpec:
    """One step specialization; ``config`` None: a plain parameter on the step kernel's tiles."""
    gs = (config or {}).get("group_size") or 0
    gr = TRITON_DTYPES[grad]
    types = {"codes_ptr": "*u8" if config else f"*{gr}", "scales_ptr": "*fp32", "workspace_ptr": "*i32",
             "gmax_ptr": "*i32", "grad_ptr": f"*{gr}", **_state_types(states), "master_ptr": "*fp32",
             "src_ptr": f"*{gr}", "table_ptr": "*i64", **_STEP_INTS, **_SCALARS}
    if config is None:
        weight, block, num_warps, options = eco_step.WEIGHT_PLAIN.value, STEP_BLOCK, 4, dict(OPTIONS)
        if multi:
            block, num_warps, options = MULTI_STEP_BLOCK, 8, {**OPTIONS, "maxnreg": 96}
    else:
        weight = eco_step.WEIGHT_INT4.value if config["name"] == "int4" else eco_step.WEIGHT_FP8.value
        block, num_warps, options = _step_tiling(gs, multi, states[0] == "fp8")
    m, v = states
    constexprs = dict(OPT=OPTIMIZERS[opt_name], WEIGHT=weight, GROUP_SIZE=gs, BLOCK=block,
                      STOCHASTIC=rounding == "stochastic", HAS_MASTER=master, PASS=pass_, M_FMT=STATE_FORMATS[m],
                      V_FMT=STATE_FORMATS[v or "fp32"])
    tag = "absmax-pass" if pass_ == 0 else rounding
    where = f"{format_tag(config)}/{tag}" if config else "plain"
    name = (("multi/" if multi else "") + f"{opt_name}/{where}/state-{states_tag(states)}/grad-{gr}"
            + ("/master" if master else ""))
    meta = dict(kernel="step_multi" if multi else "step", optimizer=opt_name, format=config, rounding=rounding,
                states=states, grad_dtype=grad, master=master, **{"pass": pass_})
    fn = eco_step.eco_multi_step_kernel if multi else eco_step.eco_step_kernel
    return _spec(name, fn, types, constexprs, num_warps, meta, options)


def _step_specs(multi: bool = False) -> list[KernelSpec]:
    """The ECO step kernels; ``multi``: the multi-tensor kernel (``"step_multi"``, the pairs of MULTI_STATES)."""
    specs = []
    for opt_name in OPTIMIZERS:
        for config in format_configs():
            passes = (0, 1) if config["group_size"] is None else (1,)
            for states in (MULTI_STATES if multi else STEP_STATES)[opt_name]:
                for grad in GRAD_DTYPES:
                    for master in (False, True):
                        for pass_ in passes:
                            for rounding in (ROUNDINGS if pass_ == 1 else ("nearest",)):
                                specs.append(_step_spec(opt_name, config, states, grad, master, pass_, rounding,
                                                        multi))
        for states in PLAIN_TILE_STATES[opt_name]:
            for grad in GRAD_DTYPES:
                specs.append(_step_spec(opt_name, None, states, grad, False, 1, "nearest", multi))
    return specs


def _quantize_specs() -> list[KernelSpec]:
    specs = []
    for config in format_configs():
        gs = config["group_size"] or 0
        for src in GRAD_DTYPES:
            for pass_ in ((0, 1) if gs == 0 else (1,)):
                for rounding in (ROUNDINGS if pass_ == 1 else ("nearest",)):
                    sr = TRITON_DTYPES[src]
                    types = {
                        "codes_ptr": "*u8", "scales_ptr": "*fp32", "workspace_ptr": "*i32", "gmax_ptr": "*i32",
                        "grad_ptr": "*fp32", **_state_types(("fp32", "fp32")), "master_ptr": "*fp32",
                        "src_ptr": f"*{sr}", **_STEP_INTS, **_SCALARS,
                    }
                    constexprs = dict(OPT=eco_step.OPT_QUANTIZE.value,
                                      WEIGHT=eco_step.WEIGHT_INT4.value if config["name"] == "int4"
                                      else eco_step.WEIGHT_FP8.value, GROUP_SIZE=gs,
                                      BLOCK=STEP_BLOCK if gs else ROWWISE_BLOCK,
                                      STOCHASTIC=rounding == "stochastic", HAS_MASTER=False, PASS=pass_,
                                      M_FMT=STATE_FORMATS["fp32"], V_FMT=STATE_FORMATS["fp32"])
                    tag = "absmax-pass" if pass_ == 0 else rounding
                    meta = dict(kernel="quantize", optimizer=None, format=config, rounding=rounding, states=None,
                                grad_dtype=src, master=False, **{"pass": pass_})
                    specs.append(_spec(f"quantize/{format_tag(config)}/{tag}/src-{sr}", eco_step.eco_step_kernel,
                                       types, constexprs, 4, meta))
    return specs


def _dequantize_specs() -> list[KernelSpec]:
    specs = []
    for config in format_configs():
        for out in GRAD_DTYPES:
            ot = TRITON_DTYPES[out]
            types = {"codes_ptr": "*u8", "scales_ptr": "*fp32", "out_ptr": f"*{ot}", "n_cols": "i32",
                     "code_cols": "i32", "rows_per_scale": "i32"}
            constexprs = dict(IS_INT4=config["name"] == "int4", GROUP_SIZE=config["group_size"] or 0, BLOCK=STEP_BLOCK)
            meta = dict(kernel="dequantize", optimizer=None, format=config, rounding=None, states=None,
                        out_dtype=out, master=False, **{"pass": 1})
            specs.append(_spec(f"dequantize/{format_tag(config)}/out-{ot}", eco_step.dequantize_kernel, types,
                               constexprs, 4, meta))
    return specs


def _plain_specs() -> list[KernelSpec]:
    specs = []
    for opt_name, opt in OPTIMIZERS.items():
        for param in GRAD_DTYPES:
            for state in PLAIN_STATES:
                pt, st = TRITON_DTYPES[param], TRITON_DTYPES[STATE_DTYPE[state]]
                pointers = {"param_ptr": f"*{pt}", "grad_ptr": f"*{pt}", "exp_avg_ptr": f"*{st}",
                            "exp_avg_sq_ptr": f"*{st}"}
                constexprs = dict(OPT=opt, STATE=STATE_FORMATS[state], BLOCK=PLAIN_BLOCK)
                states = (state, state if opt_name == "adamw" else None)
                meta = dict(optimizer=opt_name, format=None, rounding=None, states=states, grad_dtype=param,
                            master=False, **{"pass": 1})
                specs.append(_spec(f"plain/{opt_name}/param-{pt}/state-{st}", eco_step.plain_step_kernel,
                                   {**pointers, "numel": "i64", **_STREAMS, **_SCALARS}, constexprs, 4,
                                   {"kernel": "plain", **meta}))
                specs.append(_spec(f"plain_multi/{opt_name}/param-{pt}/state-{st}", eco_step.plain_multi_step_kernel,
                                   {**pointers, "table_ptr": "*i64", **_SCALARS}, constexprs, 4,
                                   {"kernel": "plain_multi", **meta}))
    return specs


def _factored_specs() -> list[KernelSpec]:
    """The statistics (per gradient dtype) and finalize kernels of a factored second moment."""
    common = dict(optimizer="adamw", format=None, rounding=None, states=None, master=False, **{"pass": 1})
    specs = []
    rows, cols = STATS_TILE
    for grad in GRAD_DTYPES:
        gr = TRITON_DTYPES[grad]
        types = {"grad_ptr": f"*{gr}", "gmax_ptr": "*i32", "row_sum_ptr": "*i64", "col_sum_ptr": "*i64",
                 "total_ptr": "*i64", "table_ptr": "*i64"}
        for aligned in (True, False):  # rows a multiple of 16 elements (128-bit loads), or any length
            specs.append(_spec(f"factored_stats/grad-{gr}" + ("" if aligned else "/ragged"),
                               moments.factored_stats_kernel, types,
                               dict(ROWS=rows, COLS=cols, ROW_TILES=STATS_ROW_TILES, ALIGNED=aligned), 4,
                               dict(kernel="factored_stats", grad_dtype=grad, rows_aligned=aligned, **common)))
    types = {"gmax_ptr": "*i32", "row_sum_ptr": "*i64", "col_sum_ptr": "*i64", "total_ptr": "*i64",
             "row_ptr": "*fp32", "col_ptr": "*fp32", "mean_ptr": "*fp32", "table_ptr": "*i64", "beta2": "fp32",
             "one_minus_beta2": "fp32"}
    specs.append(_spec("factored_finalize", moments.factored_finalize_kernel, types, dict(BLOCK=FINALIZE_BLOCK), 4,
                       dict(kernel="factored_finalize", grad_dtype=None, **common)))
    return specs


#: state-format name -> dtype of a dense state (the flat plain kernels)
STATE_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}

SPECS: list[KernelSpec] = (_step_specs() + _quantize_specs() + _dequantize_specs() + _plain_specs()
                           + _step_specs(multi=True) + _factored_specs())
_BY_KEY: dict = {}


def _key(kernel, optimizer, format, rounding, states, grad_dtype, master, pass_, out_dtype=None, rows_aligned=None):
    fmt = None if format is None else (format["name"], format["group_size"])
    return (kernel, optimizer, fmt, rounding, states, grad_dtype, master, pass_, out_dtype, rows_aligned)


for _s in SPECS:
    _m = _s.meta
    _k = _key(_m["kernel"], _m["optimizer"], _m["format"], _m["rounding"], _m["states"], _m.get("grad_dtype"),
              _m["master"], _m["pass"], _m.get("out_dtype"), _m.get("rows_aligned"))
    if _k in _BY_KEY:
        raise AssertionError(f"two kernel specs for {_k}")
    _BY_KEY[_k] = _s


def find_spec(kernel, *, optimizer=None, format=None, rounding=None, states=None, grad_dtype=None,
              master=False, pass_=1, out_dtype=None, rows_aligned=None) -> KernelSpec | None:
    """The entry for one launch, or None when no kernel covers it (the caller falls back or raises).

    ``rows_aligned``: the factored statistics' variant (see ``moments.factored_stats_kernel``)."""
    if pass_ == 0 or (format is None and kernel in ("step", "step_multi")):
        rounding = "nearest"  # the absmax pass does not round; a plain parameter has no weight rounding
    return _BY_KEY.get(_key(kernel, optimizer, format, rounding, states, grad_dtype, master, pass_, out_dtype,
                            rows_aligned))
