"""What `parcae_jax.aot` knows about TPU chips and reads out of a compiled program.

* `CHIPS`: per-chip HBM, peak bf16 FLOP/s, HBM and ICI bandwidth (the published figures, sources below).
* `resolve_topology`: slice names (`v5e-8`, `v5p-32`, raw `v5p:2x2x4`) -> the topology string libtpu
  takes, the chip and the expected chip count.
* `collective_bytes`: operand bytes of every collective in the optimised HLO text.
* `memory_breakdown`, `cost_numbers`, `roofline`: the per-chip report of one compiled step.

The compiled program is the per-device SPMD program, so every number here is per chip.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from parcae_jax.errors import ConfigError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    device_kind: str  # what libtpu reports as `device.device_kind`
    hbm_bytes: int
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bw: float  # bytes/s
    ici_bw: float  # bytes/s, bidirectional, all links of the chip together
    cores_per_chip: int  # TensorCores: the `-N` of a v5p slice name counts these


# Sources (Cloud TPU documentation, "System architecture" tables, read 2025):
#   v5e: docs.cloud.google.com/tpu/docs/v5e  (197 TFLOPs bf16, 16 GB HBM2 at 819 GBps, ICI 400 GBps)
#   v6e: docs.cloud.google.com/tpu/docs/v6e  (918 TFLOPs bf16, 32 GB at 1640 GBps, ICI 800 GBps)
#   v5p: docs.cloud.google.com/tpu/docs/v5p  (459 TFLOPs bf16, 95 GiB at 2765 GBps, ICI 1200 GBps)
# ICI is the "bidirectional inter-chip interconnect bandwidth per chip" figure, i.e. every link in
# both directions at once: the optimistic end, which is what a lower bound on step time wants.
CHIPS = {
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GiB, 197e12, 819e9, 400e9, 1),
    "v6e": Chip("v6e", "TPU v6 lite", 32 * GiB, 918e12, 1640e9, 800e9, 1),
    "v5p": Chip("v5p", "TPU v5", 95 * GiB, 459e12, 2765e9, 1200e9, 2),
}
_CHIP_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}

# Standard slice shapes by chip count (Cloud TPU docs' topology tables): 2D tori for v5e/v6e, 3D for v5p.
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8"}
_FRIENDLY = re.compile(r"^(v5e|v6e|v5p|v5litepod)-(\d+)$")
_RAW = re.compile(r"^(v5e|v6e|v5p|v5litepod|v5lite|v5|v6)[:=_]((?:\d+x)+\d+)$")


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # as the user wrote it
    topology: str  # what `get_topology_desc(topology_name=...)` takes, e.g. "v5p:2x2x4"
    chip: Chip
    chips: int


def resolve_topology(name: str) -> Slice:
    """`v5e-8` / `v6e-8` (N chips), `v5p-8` / `v5p-32` (N TensorCores: N/2 chips), or a raw
    `chip:AxBxC` topology. Raises ConfigError naming the accepted forms."""
    text = name.strip().lower()
    friendly, raw = _FRIENDLY.match(text), _RAW.match(text)
    if friendly:
        chip = CHIPS[_CHIP_ALIASES.get(friendly.group(1), friendly.group(1))]
        count = int(friendly.group(2))
        if count % chip.cores_per_chip:
            raise ConfigError(
                f"--topology {name}: a {chip.name} slice name counts TensorCores "
                f"({chip.cores_per_chip} per chip), so N must be a multiple of {chip.cores_per_chip}"
            )
        chips = count // chip.cores_per_chip
        shapes = _SHAPES_3D if chip.name == "v5p" else _SHAPES_2D
        if chips not in shapes:
            sizes = ", ".join(f"{chip.name}-{n * chip.cores_per_chip}" for n in shapes)
            raise ConfigError(
                f"--topology {name}: no standard {chip.name} slice of that size; use one of "
                f"{sizes}, or a raw topology such as {chip.name}:{shapes[min(shapes)]}"
            )
        return Slice(name, f"{chip.name}:{shapes[chips]}", chip, chips)
    if raw:
        chip = CHIPS[_CHIP_ALIASES.get(raw.group(1), raw.group(1))]
        chips = math.prod(int(d) for d in raw.group(2).split("x"))
        return Slice(name, f"{chip.name}:{raw.group(2)}", chip, chips)
    raise ConfigError(
        f"--topology {name!r} is not a TPU slice: use v5e-8, v6e-8, v5p-8, v5p-32 (v5e/v6e-N "
        "counts chips, v5p-N TensorCores) or a raw topology like v5p:2x2x4"
    )


# ---------------------------------------------------------------------------------------------------
# HLO text: collectives
# ---------------------------------------------------------------------------------------------------

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# Async pairs are counted at their start; a `-done` only hands back the buffer of its start.
_COLLECTIVE_OPS = (
    {op: op for op in COLLECTIVES}
    | {f"{op}-start": op for op in COLLECTIVES}
    | {"ragged-all-to-all": "all-to-all"}
)
_ARRAY = re.compile(r"\b(pred|token|[a-z]+\d+[a-z0-9]*)\[([0-9,]*)\]")
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_NAME = re.compile(r"%([\w.\-]+)")


def dtype_bytes(dtype: str) -> float:
    """Bytes per element of an HLO element type (bf16 -> 2, f8e4m3fn -> 1, pred -> 1, s4 -> 0.5)."""
    if dtype == "pred":
        return 1.0
    if dtype == "token":
        return 0.0
    bits = re.match(r"[a-z]+?(\d+)", dtype)
    return int(bits.group(1)) / 8 if bits else 0.0


def shape_bytes(text: str) -> float:
    """Bytes of every array in an HLO type (a tuple sums its elements; layouts are ignored)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(text):
        total += dtype_bytes(dtype) * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _closing(text: str, start: int) -> int:
    """Index just past the bracket group opening at `text[start]`."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _parse_instruction(line: str) -> tuple[str, str, str, str] | None:
    """(name, result type, opcode, operand text) of one HLO instruction line, else None."""
    m = _DEF.match(line)
    if m is None:
        return None
    rest = line[m.end() :]
    if rest.startswith("("):  # a tuple type: spaces inside it
        end = _closing(rest, 0)
    else:
        end = rest.find(" ")
        if end < 0:
            return None
    result, tail = rest[:end], rest[end:].lstrip()
    op = re.match(r"([a-z][a-z0-9\-]*)\(", tail)
    if op is None:
        return None
    open_at = op.end() - 1
    return m.group(1), result, op.group(1), tail[open_at + 1 : _closing(tail, open_at) - 1]


_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    """Instruction lines per computation, and the entry computation's name."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = m.group(2)
                comps[current] = []
                entry = current if m.group(1) else entry
        elif line.strip() == "}":
            current = None
        else:
            comps[current].append(line)
    return comps, entry


def _trip_count(condition: list[str]) -> int | None:
    """N for a counted loop's condition `i < constant(N)` (how `lax.scan` compiles), else None."""
    constants = {}
    for line in condition:
        parsed = _parse_instruction(line)
        if parsed and parsed[2] == "constant":
            value = re.match(r"\s*(-?\d+)\s*$", parsed[3])
            if value:
                constants[parsed[0]] = int(value.group(1))
    for line in condition:
        parsed = _parse_instruction(line)
        if parsed and parsed[2] == "compare" and "direction=LT" in line:
            bounds = [constants[n] for n in _NAME.findall(parsed[3]) if n in constants]
            if len(bounds) == 1:
                return bounds[0]
    return None


def _multiplicities(comps: dict[str, list[str]], entry: str) -> tuple[dict[str, int], set[str]]:
    """How many times each computation runs per call of `entry` (counted loops multiply by their trip
    count; a loop whose count is only known at run time counts once), and the computations inside such
    a loop."""
    edges: dict[str, list[tuple[str, int, bool]]] = {}
    for name, lines in comps.items():
        for line in lines:
            body = re.search(r"\bbody=%([\w.\-]+)", line)
            cond = re.search(r"\bcondition=%([\w.\-]+)", line)
            trip = _trip_count(comps.get(cond.group(1), [])) if body and cond else None
            for callee in _CALLS.findall(line):
                looped = body is not None and callee == body.group(1)
                edges.setdefault(name, []).append(
                    (callee, trip if looped and trip else 1, looped and not trip)
                )
            for group in _BRANCHES.findall(line):
                edges.setdefault(name, []).extend((c, 1, False) for c in _NAME.findall(group))
    counts: dict[str, int] = {}
    uncounted: set[str] = set()

    def visit(name: str, times: int, in_dynamic_loop: bool) -> None:
        counts[name] = counts.get(name, 0) + times
        if in_dynamic_loop:
            uncounted.add(name)
        for callee, factor, dynamic in edges.get(name, []):
            if callee in comps:
                visit(callee, times * factor, in_dynamic_loop or dynamic)

    visit(entry, 1, False)
    return counts, uncounted


def collective_bytes(hlo_text: str) -> dict[str, float]:
    """Operand bytes per collective kind (and "total") that one run of an optimised HLO module moves.

    A collective inside a counted loop (`lax.scan`: the gradient-accumulation scan) is multiplied by the
    trip count; inside a loop whose count is only known at run time (the recurrence's while loop) it is
    counted once, so for those the figure is a lower bound; "in_dynamic_loops" says how many bytes that
    concerns."""
    comps, entry = _computations(hlo_text)
    if entry is None:
        return dict.fromkeys((*COLLECTIVES, "total", "in_dynamic_loops"), 0.0)
    counts, uncounted = _multiplicities(comps, entry)
    sizes: dict[str, float] = {}
    found: list[tuple[str, str, str]] = []
    for comp, lines in comps.items():
        for line in lines:
            parsed = _parse_instruction(line)
            if parsed is None:
                continue
            name, result, op, operands = parsed
            sizes[name] = shape_bytes(result)
            if op in _COLLECTIVE_OPS:
                found.append((comp, _COLLECTIVE_OPS[op], operands))
    out = dict.fromkeys((*COLLECTIVES, "in_dynamic_loops"), 0.0)
    for comp, kind, operands in found:
        # Operands are referenced by name; a typed operand list (older printers) is read directly.
        typed = shape_bytes(operands)
        size = (typed if typed else sum(sizes.get(n, 0.0) for n in _NAME.findall(operands))) * counts.get(
            comp, 0
        )
        out[kind] += size
        if comp in uncounted:
            out["in_dynamic_loops"] += size
    out["total"] = sum(out[k] for k in COLLECTIVES)
    return out


# ---------------------------------------------------------------------------------------------------
# Memory, cost, roofline
# ---------------------------------------------------------------------------------------------------

MEMORY_FIELDS = ("argument", "output", "alias", "temp", "generated_code")


def memory_breakdown(stats) -> dict[str, int]:
    """Per-chip bytes from `compiled.memory_analysis()`; `total` = arguments + outputs − aliased (donated
    buffers are counted once) + temporaries + generated code."""
    out = {f: int(getattr(stats, f"{f}_size_in_bytes", 0) or 0) for f in MEMORY_FIELDS}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
    return out


def cost_numbers(cost: Any) -> dict[str, float]:
    """FLOPs and bytes accessed from `compiled.cost_analysis()` (a dict, or a list of one per program)."""
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    cost = cost or {}
    return {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def roofline(
    chip: Chip, flops: float, hbm_bytes: float, ici_bytes: float, useful_flops: float | None = None
) -> dict[str, Any]:
    """Lower bound on one step's time per chip: max(FLOPs / peak, bytes / HBM bandwidth, collective bytes
    / ICI bandwidth), the term that sets it, and the MFU that bound allows (`useful_flops` per chip over
    peak × bound; None when not given)."""
    terms = {
        "compute": flops / chip.peak_flops,
        "hbm": hbm_bytes / chip.hbm_bw,
        "ici": ici_bytes / chip.ici_bw,
    }
    bound = max(terms.values())
    mfu = None
    if useful_flops is not None and bound > 0:
        mfu = min(1.0, useful_flops / (chip.peak_flops * bound))
    return {"seconds": bound, "limited_by": max(terms, key=terms.get), "terms_s": terms, "mfu_bound": mfu}


_SIZE = r"([\d.]+)([KMGT]?)i?B?"
# The two forms libtpu words its refusal in: an early estimate of the temporaries alone, and the final
# buffer assignment's total.
_OOM_TEMPORARIES = re.compile(rf"temporaries[^(]*\({_SIZE}\)[^(]*\({_SIZE}\)")
_OOM_TOTAL = re.compile(rf"Used {_SIZE} of {_SIZE} hbm")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_hbm_oom(message: str) -> tuple[int, int, str] | None:
    """(required, available, "temporaries" or "total") bytes from the TPU compiler's out-of-HBM error
    ("... HLO temporaries (91.08G) exceeds available HBM (15.75G)" or "Used 15.78G of 15.75G hbm")."""
    for pattern, what in ((_OOM_TEMPORARIES, "temporaries"), (_OOM_TOTAL, "total")):
        m = pattern.search(message)
        if m:
            need, have = (int(float(m.group(i)) * _UNITS[m.group(i + 1)]) for i in (1, 3))
            return need, have, what
    return None


@dataclasses.dataclass
class StepReport:
    step: str
    fits: bool
    compile_s: float
    memory: dict[str, int] | None = None  # per chip, bytes (memory_analysis)
    hbm_bytes: int = 0
    flops_xla: float | None = None
    flops_analytical: float | None = None
    bytes_accessed: float | None = None
    collectives: dict[str, float] | None = None
    roofline: dict[str, Any] | None = None
    required_bytes: int | None = None  # when the compiler refused: what it needed ...
    available_bytes: int | None = None  # ... and what it had
    required_is_total: bool = False  # False: the compiler named its temporaries only
    error: str | None = None
    shape: dict[str, Any] = dataclasses.field(default_factory=dict)
    pallas_calls: int = 0  # Mosaic (Pallas) kernel call sites in the program, e.g. splash attention

    state_bytes: int | None = None  # train step: one chip's shards of parameters + optimizer state
    compiled: bool = True  # False: refused before compiling (the train state alone exceeds HBM)

    @property
    def used_bytes(self) -> int | None:
        """Per-chip bytes: the memory analysis when it compiled, else the compiler's temporaries plus
        the train state (its refusal names temporaries only), else None."""
        if self.memory is not None:
            return self.memory["total"]
        if self.required_bytes:
            return self.required_bytes + (0 if self.required_is_total else self.state_bytes or 0)
        return None


# ---------------------------------------------------------------------------------------------------
# Report text
# ---------------------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def fit_text(r: StepReport) -> str:
    if r.memory is not None:
        return f"{_gib(r.memory['total'])} of {_gib(r.hbm_bytes)}: {'fits' if r.fits else 'DOES NOT FIT'}"
    if r.required_bytes and r.available_bytes:
        named = "" if r.required_is_total or not r.state_bytes else " with the train state"
        return f"needs {_gib(r.used_bytes)}{named}, compiler has {_gib(r.available_bytes)}: DOES NOT FIT"
    return f"DOES NOT FIT ({r.error})"


def format_report(reports: list[StepReport], info: dict, slice_: Slice) -> str:
    chip = slice_.chip
    lines = [
        f"{info['model']} on {slice_.name} ({slice_.chips} x {chip.device_kind}, {_gib(chip.hbm_bytes)} HBM, "
        f"libtpu {info['libtpu']}); mesh {info['mesh']}",
        f"micro-batch {info['micro_batch']} per device x {info['seq_len']} tokens, "
        f"accumulation {info['accum']} "
        f"(world batch {info['world_batch']}); remat {info['remat']}; attention {info['attention_impl']}; "
        f"loss_chunk_len {info['loss_chunk_len']}",
    ]
    for r in reports:
        shape = ", ".join(f"{k} {v}" for k, v in r.shape.items())
        kernels = f"; {r.pallas_calls} Pallas kernel call sites" if r.pallas_calls else ""
        lines.append(f"{r.step} step ({shape}), compiled in {r.compile_s:.1f} s{kernels}")
        if r.memory is None:
            lines.append(f"  memory per chip: {fit_text(r)}")
            continue
        m = r.memory
        lines.append(
            f"  memory per chip: arguments {_gib(m['argument'])}, outputs {_gib(m['output'])} "
            f"({_gib(m['alias'])} aliased), temporaries {_gib(m['temp'])}, generated code "
            f"{m['generated_code'] / 2**20:.1f} MiB -> {fit_text(r)}"
        )
        flops_line = f"  FLOPs per chip: XLA {r.flops_xla:.4g} (each loop body counted once)"
        if r.flops_analytical:
            per_micro = r.flops_analytical / r.shape.get("accum", 1)
            flops_line += (
                f"; analytical {r.flops_analytical:.4g} per step = {per_micro:.4g} per micro-batch "
                f"(XLA / that {r.flops_xla / per_micro:.2f})"
            )
        lines.append(flops_line)
        c = r.collectives
        parts = ", ".join(f"{k.replace('_', ' ')} {v:.3g}" for k, v in c.items() if k != "total" and v)
        lines.append(
            f"  bytes accessed {r.bytes_accessed:.4g}; collective bytes {c['total']:.4g}"
            + (f" ({parts})" if parts else "")
        )
        b = r.roofline
        terms = ", ".join(f"{k} {v * 1e3:.3g} ms" for k, v in b["terms_s"].items())
        mfu = f" -> MFU <= {100 * b['mfu_bound']:.0f}%" if b["mfu_bound"] is not None else ""
        lines.append(
            f"  roofline: step >= {b['seconds'] * 1e3:.4g} ms ({terms}; {b['limited_by']}-bound){mfu}"
        )
    return "\n".join(lines)
