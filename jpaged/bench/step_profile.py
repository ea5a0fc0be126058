"""A per-op table of a jitted step: a jax.profiler trace joined with the
compiled HLO (scripts/profile_step.py).

The trace (jax.profiler.ProfileData over the .xplane.pb that
``jax.profiler.trace`` writes) gives each kernel's time: on a GPU the kernel
events of the device plane "/device:GPU:0" (its "Stream #..." lines), on a
TPU its "XLA Ops" line, on CPU the host plane's XLA thunks. Every one of
those events carries the stats ``hlo_module`` and ``hlo_op``: the compiled
module and the instruction it ran for. The HLO text of the same compiled
executable then gives each instruction's opcode, shapes, the jax op it came
from (metadata op_name) and what can be derived from them:

- bytes: operands + result of the instruction (an upper bound for gathers
  and slices). For an instruction on the KV pool, whose buffers are huge
  and touched sparsely: an in-place update (the result is the pool: KV
  write) counts its other operands twice (read, written); a reader
  (attention) counts its other operands, its result and ``pool_read_bytes``,
  the K/V one layer's attention must read, given by the caller.
- flops: 2 * M * N * K of every dot in the instruction or the fusion it
  calls, and of cuBLAS gemm custom calls; attention kernels get the
  caller's ``attention_flops`` per layer.

``profile`` runs a compiled function under the profiler and returns both the
per-instruction rows and rows grouped across layers (op_name with the layer
index removed), with time per step, bytes, GB/s and TFLOP/s.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import pathlib
import re
import tempfile
import time
import warnings

import numpy as np

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8, "c64": 8, "c128": 16, "token": 0}
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_CONTAINERS = ("while", "conditional", "call", "async-start", "async-done", "async-update")
_COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute",
                "reduce-scatter", "collective-broadcast")


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """[(dtype, dims)] of every array in an HLO shape (a tuple has several)."""
    return [(m[1], tuple(int(d) for d in m[2].split(",") if d))
            for m in _ARRAY.finditer(shape) if m[1] in _DTYPE_BYTES or m[1].startswith("f8")]


def _nbytes(dtype: str, dims) -> int:
    return int(np.prod(dims, dtype=np.int64) * _DTYPE_BYTES.get(dtype, 1))


def _closing(text: str, start: int) -> int:
    """Index of the bracket closing text[start] ("(" or "{")."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    depth, opener = 0, text[start]
    for i in range(start, len(text)):
        if text[i] == opener:
            depth += 1
        elif text[i] == pairs[opener]:
            depth -= 1
            if depth == 0:
                return i
    return len(text) - 1


def _split_top(text: str) -> list[str]:
    out, depth, cur = [], 0, []
    for ch in text:
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur))
    return out


@dataclasses.dataclass
class Instruction:
    name: str
    opcode: str
    shape: str                  # the result's HLO shape text
    operands: list[str]         # operand instruction names
    operand_shapes: list[str]   # their shapes (inline in the text, else looked up)
    attrs: str                  # everything after the operand list
    computation: str

    @property
    def op_name(self) -> str:
        m = re.search(r'op_name="([^"]*)"', self.attrs)
        return m[1] if m else ""

    @property
    def called(self) -> list[str]:
        names = []
        for m in re.finditer(r"\bcalls=(\{[^}]*\}|%?[\w.\-]+)", self.attrs):
            names += [n.strip().lstrip("%") for n in m[1].strip("{}").split(",") if n.strip()]
        return names

    @property
    def kernel_name(self) -> str:
        """The custom call's target or its kernel's name (Pallas / Triton), else ""."""
        m = re.search(r'"name":\s*"([^"]+)"', self.attrs)
        if m:
            return m[1]
        m = re.search(r'custom_call_target="([^"]+)"', self.attrs)
        return m[1] if m else ""


@dataclasses.dataclass
class HloModule:
    name: str
    instructions: dict[str, Instruction]
    computations: dict[str, list[str]]


def parse_hlo(text: str) -> HloModule:
    """The instructions of an HLO module's text (compiled.as_text())."""
    first = text.lstrip().splitlines()[0] if text.strip() else ""
    m = re.match(r"HloModule\s+([\w.\-]+)", first)
    module = HloModule(m[1] if m else "", {}, {})
    computation = ""
    for line in text.splitlines():
        stripped = line.strip()
        header = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{$", stripped)
        if header and " = " not in stripped.split("(", 1)[0]:
            computation = header[2]
            module.computations[computation] = []
            continue
        m = re.match(r"^(ROOT\s+)?%?([\w.\-]+)\s+=\s+", stripped)
        if not m:
            continue
        rest = stripped[m.end():]
        if rest.startswith("("):
            end = _closing(rest, 0)
            shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
        else:
            shape, _, rest = rest.partition(" ")
        op = re.match(r"([\w\-]+)\(", rest)
        if not op:
            continue
        open_at = op.end() - 1
        close_at = _closing(rest, open_at)
        operands, operand_shapes = [], []
        for item in _split_top(rest[open_at + 1:close_at]):
            names = re.findall(r"%([\w.\-]+)", item)
            if names:
                operands.append(names[-1])
                operand_shapes.append(item[:item.rfind("%")].strip())
        module.instructions[m[2]] = Instruction(m[2], op[1], shape, operands, operand_shapes,
                                                rest[close_at + 1:], computation)
        module.computations.setdefault(computation, []).append(m[2])
    for inst in module.instructions.values():  # operand shapes not printed inline
        inst.operand_shapes = [s or (module.instructions[n].shape
                                     if n in module.instructions else "")
                               for n, s in zip(inst.operands, inst.operand_shapes)]
    return module


def _dot_flops(inst: Instruction) -> float:
    out = _arrays(inst.shape)
    lhs = _arrays(inst.operand_shapes[0]) if inst.operand_shapes else []
    if not out or not lhs:
        return 0.0
    if inst.opcode == "dot":
        m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.attrs)
    else:
        m = re.search(r'"lhs_contracting_dimensions":\s*\[([^\]]*)\]', inst.attrs)
    dims = [int(d.strip().strip('"')) for d in (m[1].split(",") if m else []) if d.strip()]
    contracted = int(np.prod([lhs[0][1][d] for d in dims], dtype=np.int64)) if dims else 1
    return 2.0 * float(np.prod(out[0][1], dtype=np.int64)) * contracted


def _is_gemm(inst: Instruction) -> bool:
    """A cuBLAS / cuBLASLt matmul custom call (its dimension numbers in backend_config)."""
    target = inst.kernel_name.lower()
    return inst.opcode == "custom-call" and ("gemm" in target or "matmul" in target)


def instruction_flops(module: HloModule, inst: Instruction, _seen=None) -> float:
    """FLOPs of the dots in ``inst`` and in the computations it calls."""
    if inst.opcode == "dot" or _is_gemm(inst):
        return _dot_flops(inst)
    total = 0.0
    seen = _seen or set()
    for comp in inst.called:
        if comp in seen:
            continue
        seen.add(comp)
        for name in module.computations.get(comp, ()):
            total += instruction_flops(module, module.instructions[name], seen)
    return total


@dataclasses.dataclass(frozen=True)
class PoolInfo:
    """What the caller knows about the KV pool's traffic in this step."""
    shape: tuple[int, ...]      # one layer's pool dims (as the device sees them)
    read_bytes: float           # K/V bytes one layer's attention reads
    attention_flops: float      # FLOPs of one layer's attention


def classify(module: HloModule, inst: Instruction, pool: PoolInfo | None) -> dict:
    """category, bytes and flops of one executed instruction."""
    operands = [_arrays(s) for s in inst.operand_shapes]
    result = _arrays(inst.shape)
    if _is_gemm(inst):
        result = result[:1]  # (out, workspace): the workspace is scratch

    def is_pool(arrays) -> bool:
        return pool is not None and any(dims == pool.shape for _, dims in arrays)
    reads_pool = any(is_pool(a) for a in operands)
    writes_pool = is_pool(result)
    other_in = sum(_nbytes(t, d) for a in operands if not is_pool(a) for t, d in a)
    out_bytes = sum(_nbytes(t, d) for t, d in result)
    flops = instruction_flops(module, inst)
    op = inst.opcode.removesuffix("-start").removesuffix("-done")
    if op in _COLLECTIVES:
        category, nbytes = "collective", other_in + out_bytes
    elif reads_pool and inst.opcode == "copy":
        category, nbytes = "copy", 2 * out_bytes
    elif reads_pool and writes_pool:
        category, nbytes = "kv write", 2 * other_in
    elif reads_pool:
        category, nbytes = "attention", other_in + out_bytes + pool.read_bytes
        flops = max(flops, pool.attention_flops)
    elif flops:
        category, nbytes = "matmul", other_in + out_bytes
    elif inst.opcode in ("copy", "transpose", "copy-start"):
        category, nbytes = "copy", other_in + out_bytes
    elif inst.opcode in ("fusion", "custom-call"):
        category, nbytes = inst.opcode, other_in + out_bytes
    else:
        category, nbytes = "other", other_in + out_bytes
    return dict(category=category, bytes=float(nbytes), flops=float(flops))


# ----------------------------------------------------------------------------
# The trace


def _stats(event) -> dict:
    with warnings.catch_warnings():  # jaxlib 0.11: "event_stats has no __module__"
        warnings.simplefilter("ignore", DeprecationWarning)
        return {k: v for k, v in event.stats}


def _device_events(xplane_path):
    """(plane, lines read, {module: [dict(hlo_op, kernel, duration_ns)]}) of
    the trace: the first device plane's "Stream #..." lines on a GPU (the
    derived "XLA Ops" line would count them twice), a TPU's "XLA Ops" line,
    else the host plane's thunks; events without an hlo_op stat (markers,
    the host's Python) are left out."""
    from jax.profiler import ProfileData
    data = ProfileData.from_file(str(xplane_path))
    planes = list(data.planes)
    device = sorted((p for p in planes if p.name.startswith("/device:")), key=lambda p: p.name)
    plane = device[0] if device else next((p for p in planes if p.name == "/host:CPU"), None)
    if plane is None:
        return None, [p.name for p in planes], {}
    lines = list(plane.lines)
    chosen = ([ln for ln in lines if ln.name.startswith("Stream")]
              or [ln for ln in lines if ln.name == "XLA Ops"] or lines)
    by_module = collections.defaultdict(list)
    for line in chosen:
        for event in line.events:
            stats = _stats(event)
            op = stats.get("hlo_op") or (event.name if line.name == "XLA Ops" else None)
            if op is None:
                continue
            by_module[str(stats.get("hlo_module", ""))].append(
                dict(hlo_op=str(op), kernel=event.name, duration_ns=float(event.duration_ns),
                     start_ns=float(event.start_ns)))
    return plane.name, sorted({ln.name for ln in chosen}), by_module


def kernel_events(xplane_path, module_name: str) -> tuple[list[dict], dict]:
    """(events, info): every kernel / thunk event of ``module_name`` in the
    trace as dict(hlo_op, kernel, duration_ns) (see _device_events); info
    names the plane and lines read and the modules seen."""
    plane, lines, by_module = _device_events(xplane_path)
    if plane is None:
        return [], dict(plane=None, planes=lines, num_events=0)
    if "" in by_module:  # events that name no module: this one's
        by_module[module_name].extend(by_module.pop(""))
    used = module_name
    if module_name not in by_module and by_module:
        # NOTE: a module name the runtime spells differently; take the busiest.
        used = max(by_module, key=lambda m: len(by_module[m]))
    events = by_module.get(used, [])
    info = dict(plane=plane, lines=lines[:8], num_events=len(events), module=used,
                modules={m: len(e) for m, e in sorted(by_module.items())[:8]})
    return events, info


def kernel_totals(xplane_path, limit: int = 30) -> dict:
    """A whole program's device time from its trace (an engine run, not one
    compiled step): per jitted module and per (module, kernel), calls and
    milliseconds, the busiest first (`limit` kernel rows)."""
    plane, lines, by_module = _device_events(xplane_path)
    modules, kernels = [], collections.defaultdict(lambda: [0, 0.0])
    for module, events in by_module.items():
        modules.append(dict(module=module or "?", calls=len(events),
                            ms=sum(e["duration_ns"] for e in events) / 1e6))
        for e in events:
            row = kernels[(module or "?", e["kernel"])]
            row[0] += 1
            row[1] += e["duration_ns"] / 1e6
    total = sum(m["ms"] for m in modules)
    rows = sorted(({"module": m, "kernel": k, "calls": c, "ms": ms,
                    "pct": 100 * ms / total if total else 0.0}
                   for (m, k), (c, ms) in kernels.items()), key=lambda r: -r["ms"])
    return dict(plane=plane, device_ms=total, modules=sorted(modules, key=lambda m: -m["ms"]),
                kernels=rows[:limit], timeline=timeline(by_module))


# Idle gaps between kernels, by length: a launch gap inside a program, a
# short wait (a small host->device copy, a program's start), the device
# waiting for the host to send the next program.
GAP_BUCKETS_US = ((0.0, 10.0, "under_10us"), (10.0, 1000.0, "10us_to_1ms"),
                  (1000.0, float("inf"), "over_1ms"))


def timeline(by_module: dict) -> dict:
    """When the device was busy, from kernel events (dicts with start_ns and
    duration_ns, any module): span_ms from the first kernel's start to the
    last one's end, busy_ms covered by at least one kernel (overlaps counted
    once), busy_pct of the span, and the idle gaps between kernels per
    GAP_BUCKETS_US (count and ms each)."""
    spans = sorted((e["start_ns"], e["start_ns"] + e["duration_ns"])
                   for events in by_module.values() for e in events)
    gaps = {name: dict(count=0, ms=0.0) for _, _, name in GAP_BUCKETS_US}
    if not spans:
        return dict(span_ms=0.0, busy_ms=0.0, busy_pct=0.0, gaps=gaps)
    busy, (start, end) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s > end:  # an idle gap
            busy += end - start
            gap_us = (s - end) / 1e3
            name = next(n for lo, hi, n in GAP_BUCKETS_US if lo <= gap_us < hi)
            gaps[name]["count"] += 1
            gaps[name]["ms"] += gap_us / 1e3
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    span = max(e for _, e in spans) - spans[0][0]
    return dict(span_ms=span / 1e6, busy_ms=busy / 1e6,
                busy_pct=100.0 * busy / span if span else 0.0, gaps=gaps)


def _group_name(op_name: str, fallback: str) -> str:
    name = re.sub(r"^(jit\([^)]*\)/)+", "", op_name)
    name = re.sub(r"\b(while/(body|cond)|eval_jaxpr)/", "", name)
    name = re.sub(r"^\w+ForCausalLM/", "", name)
    name = re.sub(r"layers_\d+", "layers_*", name)
    return name or fallback


def reduce_trace(module: HloModule, events: list[dict], num_steps: int,
                 pool: PoolInfo | None = None) -> dict:
    """Per-instruction and grouped rows, per step (events over num_steps steps)."""
    per_op = collections.defaultdict(lambda: dict(calls=0, ns=0.0, kernels=collections.Counter()))
    for e in events:
        row = per_op[e["hlo_op"]]
        row["calls"] += 1
        row["ns"] += e["duration_ns"]
        row["kernels"][e["kernel"]] += 1
    ops = []
    for name, agg in per_op.items():
        inst = module.instructions.get(name)
        if inst is not None and inst.opcode in _CONTAINERS:
            continue  # its body's instructions are counted themselves
        info = (classify(module, inst, pool) if inst is not None
                else dict(category="unknown", bytes=0.0, flops=0.0))
        calls = agg["calls"] / num_steps
        # NOTE: one execution may launch several kernels (a GEMM and its
        # split-K reduction): it moves its bytes and FLOPs once, so they
        # count per execution, that is per launch of its most frequent kernel.
        runs = max(agg["kernels"].values()) / num_steps
        us = agg["ns"] / num_steps / 1e3
        ops.append(dict(op=name, opcode=inst.opcode if inst else "", **info,
                        group=_group_name(inst.op_name if inst else "", name),
                        shape=inst.shape if inst else "",
                        kernels=[k for k, _ in agg["kernels"].most_common(3)],
                        calls_per_step=calls, runs_per_step=runs, us_per_step=us))
    total_us = sum(o["us_per_step"] for o in ops) or 1.0
    for o in ops:
        _rates(o, o["bytes"] * o["runs_per_step"], o["flops"] * o["runs_per_step"])
        o["pct"] = 100 * o["us_per_step"] / total_us
    groups = collections.defaultdict(lambda: dict(calls_per_step=0.0, us_per_step=0.0,
                                                  bytes_per_step=0.0, flops_per_step=0.0,
                                                  num_ops=0))
    for o in ops:
        g = groups[(o["category"], o["group"])]
        g["calls_per_step"] += o["calls_per_step"]
        g["us_per_step"] += o["us_per_step"]
        g["bytes_per_step"] += o["bytes"] * o["runs_per_step"]
        g["flops_per_step"] += o["flops"] * o["runs_per_step"]
        g["num_ops"] += 1
    grouped = []
    for (category, group), g in groups.items():
        row = dict(category=category, group=group, **g, pct=100 * g["us_per_step"] / total_us)
        grouped.append(_rates(row, g["bytes_per_step"], g["flops_per_step"]))
    categories = collections.defaultdict(lambda: dict(us_per_step=0.0, bytes_per_step=0.0,
                                                      flops_per_step=0.0))
    for g in grouped:
        c = categories[g["category"]]
        for k in ("us_per_step", "bytes_per_step", "flops_per_step"):
            c[k] += g[k]
    summary = [_rates(dict(category=k, **v, pct=100 * v["us_per_step"] / total_us),
                      v["bytes_per_step"], v["flops_per_step"]) for k, v in categories.items()]
    key = lambda r: -r["us_per_step"]  # noqa: E731
    return dict(device_us_per_step=sum(o["us_per_step"] for o in ops),
                ops=sorted(ops, key=key), groups=sorted(grouped, key=key),
                categories=sorted(summary, key=key))


def _rates(row: dict, nbytes: float, flops: float) -> dict:
    seconds = row["us_per_step"] / 1e6
    row["gb_per_s"] = nbytes / seconds / 1e9 if seconds > 0 and nbytes else None
    row["tflop_per_s"] = flops / seconds / 1e12 if seconds > 0 and flops else None
    return row


class _Trace:
    path: pathlib.Path | None = None


@contextlib.contextmanager
def traced(directory):
    """jax.profiler's trace of the block under `directory`; the yielded
    object's ``path`` is then the .xplane.pb it wrote (RuntimeError if none)."""
    import jax
    directory = pathlib.Path(directory)
    trace = _Trace()
    jax.profiler.start_trace(str(directory))
    try:
        yield trace
    finally:
        jax.profiler.stop_trace()
    files = sorted(directory.glob("plugins/profile/*/*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise RuntimeError(f"jax.profiler wrote no .xplane.pb under {directory}")
    trace.path = files[-1]


def profile(compiled, args_fn, *, num_calls: int, steps_per_call: int = 1,
            pool: PoolInfo | None = None, trace_dir: str | None = None) -> dict:
    """Runs ``compiled(*args_fn(previous_result))`` num_calls times under
    jax.profiler and reduces the trace (see the module docstring).

    Args:
      compiled:       a jax Compiled (jit(...).lower(...).compile()).
      args_fn:        previous result (None at first) -> the call's arguments;
                      lets a donated pool be threaded from call to call.
      num_calls:      calls traced.
      steps_per_call: steps each call runs (a K-step decode loop: K).
      trace_dir:      where the trace goes (kept); default a temporary directory.
    Returns:
      reduce_trace's dict plus trace info, wall_ms_per_call (the traced
      calls, each waited for), the module name, and the last call's result
      under "result" (not JSON).
    """
    import jax
    module = parse_hlo(compiled.as_text())
    directory = pathlib.Path(trace_dir or tempfile.mkdtemp(prefix="jpaged-profile-"))
    result = None
    walls = []
    with traced(directory) as trace:
        for _ in range(num_calls):
            t = time.perf_counter()
            result = compiled(*args_fn(result))
            jax.block_until_ready(result)
            walls.append(time.perf_counter() - t)
    events, info = kernel_events(trace.path, module.name)
    table = reduce_trace(module, events, num_calls * steps_per_call, pool)
    return dict(table, module=module.name, trace=dict(info, file=str(trace.path)),
                wall_ms_per_call=1e3 * float(np.median(walls)), result=result)

