"""Ahead-of-time compilation for real GPU targets, without a GPU.

The Triton CPU interpreter runs a kernel's semantics in numpy and never
compiles it, so faults that only show on a real target stay hidden there:
types a backend rejects, register spills, scalar instead of vector memory
access, a kernel that is instruction-bound. Triton compiles for a GPU target
without a GPU, with the ``ptxas``, ``cuobjdump`` and ``nvdisasm`` that ship in
its wheel (``triton/backends/nvidia/bin``); this module does that and reads
the results:

- ``ptxas -v`` (Triton's own invocation, its log captured): spill stores and
  loads, stack frame;
- ``cuobjdump -res-usage``: registers, stack, shared and local memory;
- ``nvdisasm``: the SASS, counted per element (see :func:`count_sass`);
- the PTX: the width of every global load and store, traced back to the
  pointer argument it addresses (see :func:`global_accesses_by_argument`).

Under ``TRITON_INTERPRET=1`` (how the tests run), ``@triton.jit`` returns an
interpreter object that cannot be compiled, so :func:`compile_builds` then runs
the compilation in a child process without that variable. Kernels are named as
``"module:function"`` plus the file that defines them, so the child can import
them (test kernels included).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# The targets the kernels must compile for: A100, H100, B200.
TARGETS = {"sm_80": 80, "sm_90": 90, "sm_100": 100}

# Per-SM limits used for the occupancy estimate (CUDA occupancy tables).
_SM_LIMITS = {
    80: {"regs": 65536, "warps": 64, "blocks": 32, "shared": 167936},
    90: {"regs": 65536, "warps": 64, "blocks": 32, "shared": 232448},
    100: {"regs": 65536, "warps": 64, "blocks": 32, "shared": 232448},
}


@dataclass(frozen=True)
class KernelBuild:
    """One kernel specialization to compile: what Triton needs, nothing else.

    ``kernel`` is ``"module:function"`` and ``path`` the file defining it (the
    child process imports it from there). ``signature`` maps every argument
    name, in order, to a Triton type (``"*fp32"``, ``"i32"``, ``"fp32"``,
    ``"constexpr"``); ``constexprs`` gives the constexpr values; ``aligned``
    names the arguments promised 16-byte divisible (pointers: 16-byte aligned;
    integers: multiples of 16), which is what lets Triton emit 128-bit accesses.
    """

    kernel: str
    path: str
    signature: dict
    constexprs: dict = field(default_factory=dict)
    aligned: tuple = ()
    num_warps: int = 4
    num_stages: int = 3
    options: dict = field(default_factory=dict)  # more triton.compile options (enable_fp_fusion, ...)

    @classmethod
    def of(cls, fn, signature, constexprs=None, aligned=(), num_warps=4, num_stages=3, options=None) -> KernelBuild:
        """Describe a ``@triton.jit`` function (compiled or interpreted) for compilation."""
        py = getattr(fn, "fn", fn)
        return cls(
            kernel=f"{py.__module__}:{py.__name__}",
            path=str(Path(inspect.getfile(py)).resolve()),
            signature=dict(signature),
            constexprs=dict(constexprs or {}),
            aligned=tuple(aligned),
            num_warps=num_warps,
            num_stages=num_stages,
            options=dict(options or {}),
        )


@dataclass
class Access:
    """Global loads or stores of one width through one pointer argument (from the PTX)."""

    kind: str  # "load" or "store"
    bits: int  # bits per instruction: 128 for ld.global.v4.b32
    count: int  # how many such instructions


@dataclass
class CompiledKernel:
    """What the compiler produced for one build and target, read from its artifacts."""

    kernel: str
    target: str
    num_warps: int
    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    sass_total: int  # static SASS instructions, NOPs and the trailing trap branch excluded
    sass_in_loops: int  # of which inside a loop body (a backward branch's range)
    sass_in_subroutines: int  # of which in CALLed slow paths (IEEE div/sqrt special operands), not counted per element
    loops: int
    sass_ops: dict  # opcode (without modifiers) -> static count
    accesses: dict  # argument name -> list of Access
    occupancy_warps: int  # resident warps per SM this kernel allows (of 64)
    error: str | None = None

    @property
    def spill_bytes(self) -> int:
        return self.spill_store_bytes + self.spill_load_bytes

    def access_bits(self, arg: str, kind: str | None = None) -> set[int]:
        """The widths of the global accesses through ``arg`` (optionally only loads or stores)."""
        return {a.bits for a in self.accesses.get(arg, []) if kind is None or a.kind == kind}

    def sass_per_element(self, elements_per_thread: float, elements_per_thread_per_iteration: float | None = None):
        """SASS instructions one thread executes per element it handles.

        Straight-line code runs once per program, so it is divided by the
        elements a thread handles in the whole program. A loop body runs once
        per iteration, so it is divided by the elements a thread handles per
        iteration; every loop is assumed to walk the element stream (as the
        row kernels' column loops do). Subroutines (slow paths, see
        :func:`count_sass`) are left out. Every other instruction is counted as
        executed, predicated-off or branched-around or not: an upper bound.
        """
        straight = self.sass_total - self.sass_in_loops - self.sass_in_subroutines
        per_element = straight / elements_per_thread
        if self.sass_in_loops:
            if not elements_per_thread_per_iteration:
                raise ValueError(f"{self.kernel} has loops: give the elements a thread handles per iteration")
            per_element += self.sass_in_loops / elements_per_thread_per_iteration
        return per_element

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["accesses"] = {k: [dataclasses.asdict(a) for a in v] for k, v in self.accesses.items()}
        return out

    @classmethod
    def from_json(cls, data: dict) -> CompiledKernel:
        data = dict(data)
        data["accesses"] = {k: [Access(**a) for a in v] for k, v in data["accesses"].items()}
        return cls(**data)


@dataclass(frozen=True)
class Machine:
    """A GPU for the roofline estimate: HBM bandwidth and SASS issue rate."""

    name: str
    hbm_bytes_per_s: float
    sms: int
    clock_hz: float
    warp_instructions_per_clock_per_sm: int = 4

    @property
    def thread_instructions_per_s(self) -> float:
        return self.sms * self.clock_hz * self.warp_instructions_per_clock_per_sm * 32

    @property
    def instructions_per_byte(self) -> float:
        """The balance point: thread instructions the SMs issue while HBM moves one byte."""
        return self.thread_instructions_per_s / self.hbm_bytes_per_s

    def roofline(self, bytes_per_element: float, sass_per_element: float | None) -> dict:
        """Elements per second and the bound, for a kernel streaming its elements through HBM.

        ``time_mem = bytes / bandwidth`` and ``time_instr = instructions /
        issue rate`` per element; the larger one bounds. ``sass_per_element``
        None (a kernel whose SASS is not counted here) gives the memory bound.
        """
        time_memory = bytes_per_element / self.hbm_bytes_per_s
        time_instructions = (sass_per_element or 0.0) / self.thread_instructions_per_s
        bound = "instruction" if time_instructions > time_memory else "memory"
        return {
            "params_per_s": 1.0 / max(time_memory, time_instructions),
            "bound": bound,
            "instructions_per_byte": None if sass_per_element is None else sass_per_element / bytes_per_element,
        }


# H100 SXM5: 3.35 TB/s HBM3, 132 SMs at 1.98 GHz boost, 4 warp schedulers per SM
# each issuing one warp instruction per clock.
H100_SXM = Machine("H100 SXM", hbm_bytes_per_s=3.35e12, sms=132, clock_hz=1.98e9)


class CompileError(RuntimeError):
    """A build that does not compile for a target; the message carries the compiler's."""


# --------------------------------------------------------------------------- the kernel list
# Integer arguments that are row lengths or element counts. Triton's launcher
# specializes an integer that is a multiple of 16 as divisible by 16, so on
# aligned shapes (every LLM hidden size) these carry the same hint here.
SHAPE_ARGS = ("n_cols", "code_cols", "numel")
# Pointer arguments that are per-element streams (the HBM traffic); the others
# (scales, workspace, the multi-tensor table) are per row/group/tensor.
STREAM_ARGS = ("codes_ptr", "grad_ptr", "exp_avg_ptr", "exp_avg_sq_ptr", "master_ptr", "src_ptr", "param_ptr",
               "out_ptr")

def build_for_spec(spec, target: str) -> KernelBuild:
    """The :class:`KernelBuild` of an ``eco.kernels.specs.KernelSpec`` for ``target``, in the aligned case.

    Its constexprs are those a launch on that target takes (``TARGET``), its
    pointers are 16-byte aligned (the launcher checks it) and its shape
    arguments multiples of 16 (see ``SHAPE_ARGS``).
    """
    aligned = tuple(spec.aligned) + tuple(a for a in SHAPE_ARGS if a in spec.signature and a not in spec.aligned)
    return KernelBuild.of(spec.fn, spec.signature, spec.constexprs_for(TARGETS[target]), aligned,
                          num_warps=spec.num_warps, options=spec.options)


def elements_per_thread(spec) -> int:
    """Logical elements one thread handles in one program (``BLOCK`` over the threads; a factored-statistics
    program: all its tiles)."""
    c = spec.constexprs
    per_program = c["BLOCK"] if "BLOCK" in c else c["ROWS"] * c["COLS"] * c["ROW_TILES"]
    return per_program // (32 * spec.num_warps)


def elements_per_thread_per_iteration(spec) -> int | None:
    """Logical elements one thread handles per loop iteration (kernels with a loop: the factored statistics'
    row tiles), or None for a kernel without loops."""
    c = spec.constexprs
    return c["ROWS"] * c["COLS"] // (32 * spec.num_warps) if "ROW_TILES" in c else None


def stream_element_bits(spec, arg: str) -> int:
    """Bits of one logical element in stream ``arg`` (INT4 codes: 4)."""
    from eco.kernels.eco_step import WEIGHT_INT4
    from eco.kernels.specs import TRITON_DTYPES  # here, not at the top: compile workers need no torch

    if arg == "codes_ptr" and (spec.constexprs.get("IS_INT4") or spec.constexprs.get("WEIGHT") == WEIGHT_INT4.value):
        return 4
    name = spec.signature[arg].lstrip("*")
    return next(8 * dtype.itemsize for dtype, triton_name in TRITON_DTYPES.items() if triton_name == name)


def widest_access_bits(spec, arg: str) -> int:
    """The widest access a thread's share of stream ``arg`` allows: its contiguous bits, at most 128."""
    return min(128, elements_per_thread(spec) * stream_element_bits(spec, arg))


def stream_bytes_per_element(spec, compiled: CompiledKernel) -> float:
    """HBM bytes per logical element the compiled kernel moves through its per-element streams.

    Read from the PTX: every global load or store of a stream, times its
    width, per thread, over the elements a thread handles. Each element of a
    stream is touched once per thread, so this is the traffic when nothing is
    served from cache.
    """
    bits = sum(a.bits * a.count for arg in STREAM_ARGS for a in compiled.accesses.get(arg, []))
    # a kernel with a loop (the factored statistics) touches its streams in the loop body, once per iteration
    return bits / 8 / (elements_per_thread_per_iteration(spec) or elements_per_thread(spec))


def scale_bytes_per_element(spec) -> float:
    """HBM bytes per element for the fp32 scales: a step reads and writes one per weight group and one per
    block of each 8-bit state (the absmax pass only reads those).

    Quantize only writes them, dequantize only reads them; one scale per row or
    matrix (and the 8-byte workspace of the two-pass formats), a factored second
    moment's row and column values count as zero.
    """
    meta = spec.meta
    fmt = meta.get("format") or {}
    group = fmt.get("group_size")
    total = 0.0
    if group:
        total += {"step": 8, "step_multi": 8, "quantize": 4, "dequantize": 4}.get(meta["kernel"], 0) / group
    if meta["kernel"] in ("step", "step_multi"):
        from eco import states

        m, v = meta["states"]
        moments = [states.momentum_format(m)]
        if meta["optimizer"] == "adamw":
            moments.append(states.second_moment_format(v))
        for fmt in moments:
            if "_scale" in fmt.parts:  # block scales: read, and written back by the storing pass
                per_element = fmt.dtypes[fmt.parts.index("_scale")].itemsize / states.STATE_BLOCK
                total += per_element * (1 if meta["pass"] == 0 else 2)
    return total


def bytes_per_element(spec, compiled: CompiledKernel) -> float:
    """HBM bytes per element of one launch: the streams (from the PTX) plus the scales."""
    return stream_bytes_per_element(spec, compiled) + scale_bytes_per_element(spec)


# --------------------------------------------------------------------------- tools
def tool_path(name: str) -> str:
    """Path of a CUDA tool shipped in the triton wheel (``cuobjdump``, ``nvdisasm``, ``ptxas``)."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: install a triton wheel that ships the NVIDIA tools")
    return str(path)


def _run_tool(name: str, args: list[str], cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        proc = subprocess.run([tool_path(name), *args, f.name], capture_output=True, text=True)
    if proc.returncode:
        raise CompileError(f"{name} failed: {proc.stderr.strip()}")
    return proc.stdout


# --------------------------------------------------------------------------- parsers
_RES_RE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
_PTXAS_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_res_usage(text: str) -> dict:
    """Registers, stack, shared and local bytes of the (single) function in ``cuobjdump -res-usage``."""
    match = _RES_RE.search(text)
    if not match:
        raise CompileError(f"no resource usage line in cuobjdump output:\n{text}")
    reg, stack, shared, local = map(int, match.groups())
    return {"registers": reg, "stack_bytes": stack, "shared_bytes": shared, "local_bytes": local}


def parse_ptxas_log(text: str) -> tuple[int, int] | None:
    """``(spill store bytes, spill load bytes)`` from a ``ptxas -v`` log, or None if absent."""
    match = _PTXAS_RE.search(text)
    return None if match is None else (int(match.group(2)), int(match.group(3)))


_SASS_RE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL_RE = re.compile(r"^\s*([.$\w]+):\s*$")
_BRANCH_TARGET_RE = re.compile(r"`\(([^)]+)\)")


def parse_sass(text: str) -> list[tuple[int, str, str | None]]:
    """``(address, instruction, branch target label)`` for each SASS instruction, plus label addresses.

    Returns the instructions; label addresses are resolved into the third
    field as the integer address of the branch target (or None).
    """
    instructions = []
    labels = {}
    pending = []
    for line in text.splitlines():
        label = _LABEL_RE.match(line)
        if label:
            pending.append(label.group(1))
            continue
        match = _SASS_RE.search(line)
        if not match:
            continue
        addr = int(match.group(1), 16)
        for name in pending:
            labels[name] = addr
        pending = []
        target = _BRANCH_TARGET_RE.search(match.group(2))
        instructions.append((addr, match.group(2), target.group(1) if target else None))
    return [(addr, ins, labels.get(tgt) if tgt else None) for addr, ins, tgt in instructions]


def _opcode(instruction: str) -> str:
    words = instruction.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else ""


def count_sass(text: str) -> dict:
    """Static SASS counts of ``nvdisasm`` output: total, in loops, in subroutines, per opcode.

    NOPs (alignment padding) and the ``BRA`` to itself that ends every kernel
    (a trap, never reached) are not counted. A loop is a backward branch: the
    instructions from its target to the branch form the body. Slow paths are
    the subroutines (from a ``CALL`` target to the next ``RET``: in these
    kernels only the IEEE division and square root of ``div_rn``/``sqrt_rn``
    for denormal, huge or special operands, which normal values never take)
    and, around each ``CALL``, the code the innermost forward branch jumps over
    (the argument moves and the call itself); they are counted apart.
    """
    instructions = parse_sass(text)
    counted = []
    for addr, ins, target in instructions:
        op = _opcode(ins)
        if op == "NOP" or (op == "BRA" and target == addr):
            continue
        counted.append((addr, op, target))
    returns = sorted(addr for addr, op, _ in counted if op == "RET")
    subroutines = []
    for start in sorted({t for _, op, t in counted if op == "CALL" and t is not None}):
        end = next((r for r in returns if r >= start), None)
        if end is None:
            raise ValueError(f"SASS subroutine at {start:#x} has no RET")
        subroutines.append((start, end))

    def inside(addr, ranges):
        return any(lo <= addr <= hi for lo, hi in ranges)

    skips = [(a, t) for a, op, t in counted if op == "BRA" and t is not None and t > a]
    for call in (a for a, op, _ in counted if op == "CALL" and not inside(a, subroutines)):
        around = [(a, t) for a, t in skips if a < call < t]
        if around:  # the innermost branch that jumps over the call: its body is the call site
            a, t = min(around, key=lambda r: r[1] - r[0])
            subroutines.append((a + 1, t - 1))

    loops = [(t, a) for a, op, t in counted if op == "BRA" and t is not None and t < a and not inside(a, subroutines)]
    ops: dict[str, int] = {}
    for _, op, _ in counted:
        ops[op] = ops.get(op, 0) + 1
    return {
        "sass_total": len(counted),
        "sass_in_loops": sum(1 for a, _, _ in counted if inside(a, loops)),
        "sass_in_subroutines": sum(1 for a, _, _ in counted if inside(a, subroutines)),
        "loops": len(loops),
        "sass_ops": ops,
    }


_PTX_PARAM_RE = re.compile(r"\[\s*(\w+)_param_(\d+)\s*\]")
_PTX_REG_RE = re.compile(r"%[a-z]+\d+")
_PTX_GLOBAL_RE = re.compile(r"^(ld|st)\.global(?:\.[a-z0-9_]+)*?(?:\.v(\d))?\.([bsuf])(\d+)$")


def global_accesses_by_argument(ptx: str, arg_names: list[str], pointer_args=None) -> dict[str, list[Access]]:
    """For each pointer argument, the global loads and stores through it and their widths.

    Traces every register of the PTX back to the kernel parameters it is
    computed from (a fixed point over all instructions, so loops are covered),
    then attributes each ``ld.global``/``st.global`` to the parameter(s) its
    address comes from. ``arg_names`` are the non-constexpr arguments in order
    (the PTX numbers parameters that way); only ``pointer_args`` (default: all)
    are traced, so an offset computed from an integer argument does not count.
    """
    traced = {i for i, n in enumerate(arg_names) if pointer_args is None or n in pointer_args}
    lines = []
    for raw in ptx.splitlines():
        line = raw.split("//")[0].strip().rstrip(";").strip()
        if not line or line.startswith((".", "{", "}")) or line.endswith(":"):
            continue
        if line.startswith("@"):
            line = line.split(None, 1)[1] if " " in line else ""
        parts = line.split(None, 1)
        if len(parts) == 2:
            lines.append((parts[0], parts[1]))

    taint: dict[str, set[int]] = {}
    changed = True
    while changed:
        changed = False
        for op, operands in lines:
            if op.startswith("st."):
                continue
            regs = _PTX_REG_RE.findall(operands)
            if not regs:
                continue
            param = _PTX_PARAM_RE.search(operands)
            if op.startswith("ld.param") and param:
                sources = {int(param.group(2))} & traced
                dests = regs
            else:
                if operands.startswith("{"):  # vector destination
                    close = operands.index("}")
                    dests = _PTX_REG_RE.findall(operands[:close])
                    srcs = _PTX_REG_RE.findall(operands[close:])
                else:
                    dests, srcs = regs[:1], regs[1:]
                sources = set().union(*(taint.get(r, set()) for r in srcs)) if srcs else set()
                if op.startswith("ld.global"):  # a loaded value is data, not an address
                    sources = set()
            for dest in dests:
                known = taint.setdefault(dest, set())
                if not sources <= known:
                    known |= sources
                    changed = True

    counts: dict[tuple[str, str, int], int] = {}
    for op, operands in lines:
        match = _PTX_GLOBAL_RE.match(op)
        if not match:
            continue
        kind = "load" if match.group(1) == "ld" else "store"
        bits = int(match.group(2) or 1) * int(match.group(4))
        address = re.search(r"\[\s*(%[a-z]+\d+)", operands)
        params = taint.get(address.group(1), set()) if address else set()
        for index in params or {-1}:
            name = arg_names[index] if 0 <= index < len(arg_names) else "?"
            counts[(name, kind, bits)] = counts.get((name, kind, bits), 0) + 1
    result: dict[str, list[Access]] = {}
    for (name, kind, bits), count in sorted(counts.items()):
        result.setdefault(name, []).append(Access(kind=kind, bits=bits, count=count))
    return result


def occupancy_warps(registers: int, shared_bytes: int, num_warps: int, capability: int) -> int:
    """Resident warps per SM allowed by registers, shared memory and block limits."""
    limits = _SM_LIMITS[capability]
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256  # allocated per warp in units of 256
    blocks = min(
        limits["blocks"],
        limits["warps"] // num_warps,
        limits["regs"] // (regs_per_warp * num_warps),
        limits["shared"] // shared_bytes if shared_bytes else limits["blocks"],
    )
    return blocks * num_warps


# --------------------------------------------------------------------------- compile
def _load_function(build: KernelBuild):
    module_name, name = build.kernel.split(":")
    module = None
    if module_name != "__main__":  # a script's kernels are loaded from its file, under another name
        try:
            module = sys.modules.get(module_name) or importlib.import_module(module_name)
        except ImportError:
            pass
    if module is None or not hasattr(module, name):
        module_name = f"_aot_{Path(build.path).stem}" if module_name == "__main__" else module_name
        spec = importlib.util.spec_from_file_location(module_name, build.path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return getattr(module, name)


def compile_one(build: KernelBuild, target: str, sass: bool = True) -> CompiledKernel:
    """Compile ``build`` for ``target`` (``"sm_90"``) in this process and read its artifacts."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    capability = TARGETS[target]
    fn = _load_function(build)
    names = list(build.signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in build.aligned}
    source = ASTSource(fn=fn, signature=build.signature, constexprs=build.constexprs, attrs=attrs)
    log = io.StringIO()
    previous = triton.knobs.nvidia.dump_ptxas_log
    triton.knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                source,
                target=GPUTarget("cuda", capability, 32),
                options={"num_warps": build.num_warps, "num_stages": build.num_stages, **build.options},
            )
    finally:
        triton.knobs.nvidia.dump_ptxas_log = previous
    cubin = compiled.asm["cubin"]
    resources = parse_res_usage(_run_tool("cuobjdump", ["-res-usage"], cubin))
    spills = parse_ptxas_log(log.getvalue())
    if spills is None:  # Triton's cache answered
        # Spilled registers live in the thread's stack frame: without one nothing spilled. Otherwise run
        # ptxas -v on the PTX ourselves for the spill figures.
        no_frame = resources["stack_bytes"] == 0 and resources["local_bytes"] == 0
        spills = (0, 0) if no_frame else _ptxas_spills(compiled.asm["ptx"], capability)
    if sass:
        counts = count_sass(_run_tool("nvdisasm", ["-c"], cubin))
    else:
        counts = {"sass_total": 0, "sass_in_loops": 0, "sass_in_subroutines": 0, "loops": 0, "sass_ops": {}}
    runtime_args = [n for n, t in build.signature.items() if t != "constexpr"]
    pointers = [n for n, t in build.signature.items() if t.startswith("*")]
    accesses = global_accesses_by_argument(compiled.asm["ptx"], runtime_args, pointers)
    return CompiledKernel(
        kernel=build.kernel,
        target=target,
        num_warps=build.num_warps,
        spill_store_bytes=spills[0],
        spill_load_bytes=spills[1],
        accesses=accesses,
        occupancy_warps=occupancy_warps(resources["registers"], resources["shared_bytes"], build.num_warps, capability),
        **resources,
        **counts,
    )


def _ptxas_spills(ptx: str, capability: int) -> tuple[int, int]:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run(
            [get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
             f"--gpu-name={sm_arch_from_capability(capability)}", str(src), "-o", str(Path(tmp) / "k.o")],
            capture_output=True, text=True,
        )
    spills = parse_ptxas_log(proc.stderr)
    if proc.returncode or spills is None:
        raise CompileError(f"ptxas -v failed: {proc.stderr.strip()}")
    return spills


def compile_builds(builds: list[KernelBuild], targets=tuple(TARGETS), **kwargs) -> list[CompiledKernel]:
    """Compile every build for every target; one result per pair, in that order (see :func:`compile_jobs`)."""
    return compile_jobs([(b, t) for b in builds for t in targets], **kwargs)


def compile_jobs(jobs: list[tuple[KernelBuild, str]], workers: int | None = None, sass: bool = True):
    """Compile each ``(build, target)`` pair; one :class:`CompiledKernel` per pair, in order.

    A build that fails to compile gives a result with ``error`` set (and zero
    counts) rather than stopping the others. ``workers`` child processes
    (default: one per CPU) share the jobs; under the interpreter children are
    always used (see the module docstring). ``sass=False`` skips the
    disassembly (about a second per kernel) when only resources and accesses
    are needed; the SASS counts are then zero.
    """
    workers = max(1, min(len(jobs), workers or os.cpu_count() or 1))
    from eco.kernels.launcher import interpreter_enabled  # kernels defined under the interpreter cannot compile

    if workers == 1 and not interpreter_enabled():
        return [_compile_or_error(b, t, sass) for b, t in jobs]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def run_worker(w: int) -> list[CompiledKernel]:
        payload = json.dumps({"sass": sass, "jobs": [{"build": dataclasses.asdict(b), "target": t}
                                                     for b, t in jobs[w::workers]]})
        proc = subprocess.Popen([sys.executable, "-m", "eco_bench.aot", "--worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        out, err = proc.communicate(payload)
        if proc.returncode:
            raise CompileError(f"the compile worker failed:\n{err[-4000:]}")
        return [CompiledKernel.from_json(r) for r in json.loads(out.strip().splitlines()[-1])]

    # One thread per child feeds it and drains its pipes, so the children compile at the same time
    # (a child gets its jobs only through stdin: handing them out one communicate() after the other ran them
    # one child at a time).
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        chunks = list(pool.map(run_worker, range(workers)))
    results = [None] * len(jobs)
    for w, chunk in enumerate(chunks):
        results[w::workers] = chunk
    return results


def _compile_or_error(build: KernelBuild, target: str, sass: bool = True) -> CompiledKernel:
    try:
        return compile_one(build, target, sass)
    except Exception as exc:  # noqa: BLE001 -- every compiler failure is reported, per build
        return CompiledKernel(
            kernel=build.kernel, target=target, num_warps=build.num_warps, registers=0, stack_bytes=0,
            local_bytes=0, shared_bytes=0, spill_store_bytes=0, spill_load_bytes=0, sass_total=0,
            sass_in_loops=0, sass_in_subroutines=0, loops=0, sass_ops={}, accesses={}, occupancy_warps=0,
            error=_describe(exc),
        )


def _describe(exc: BaseException) -> str:
    """The error and its causes (Triton's CompilationError keeps the reason in ``__cause__``)."""
    parts = []
    while exc is not None and len(parts) < 4:
        parts.append(f"{type(exc).__name__}: {str(exc)[-3000:]}")
        exc = exc.__cause__ or exc.__context__
    return "\n  caused by ".join(parts)


def _worker() -> None:
    """Child process: read jobs as JSON on stdin, print results as one JSON line."""
    request = json.loads(sys.stdin.read())
    results = []
    for job in request["jobs"]:
        build = job["build"]
        build["aligned"] = tuple(build["aligned"])
        with contextlib.redirect_stdout(sys.stderr):
            results.append(_compile_or_error(KernelBuild(**build), job["target"], request["sass"]).to_json())
    print(json.dumps(results))


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _worker()
    else:
        sys.exit("usage: python -m eco_bench.aot --worker   (driven by compile_builds; see bench/kernel_report.py)")
