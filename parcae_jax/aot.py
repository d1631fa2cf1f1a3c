"""Compile the real train, eval and decode steps for a TPU slice ahead of time, from any machine.

    python -m parcae_jax.aot --config configs/parcae_1_3b.py --topology v5p-32 [--config.a.b=v ...]
        [--micro-batch N] [--remat off|on|POLICY] [--find-max-micro-batch [--search doubling]]
        [--steps train,eval,decode] [--decode-batch ROWS] [--json PATH] [--dump DIR]
    python -m parcae_jax.aot_table docs/tpu.md [--configs ...] [--topologies ...]   (the docs/tpu.md table)

No TPU is needed: libtpu (`pip install 'parcae-jax[aot]'`) describes the slice
(`jax.experimental.topologies`) and compiles for it; inputs are `jax.ShapeDtypeStruct`s. The train
step is the trainer's own (`train_step.create_train_state(abstract=True)` + `make_train_step`, sharded
by the logical-axis rules on the config's mesh), the eval step is the validation scorer's program
(`TokenScorer`) and the decode step is the generator's one-token step (`engine`). Per chip it prints
memory (from `compiled.memory_analysis()`) against the chip's HBM, XLA's FLOPs against the analytical
count (`flops.hardware_flops_per_token`), bytes accessed, collective bytes (from the compiled HLO) and
a roofline lower bound on the step time with the MFU it allows.

Exit status: 0 every compiled step fits in HBM, 3 one does not (or no micro-batch fits, with
--find-max-micro-batch), 2 a bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import importlib.metadata
import importlib.util
import math
import os
import platform
import sys
import tempfile
import time
from typing import Any

# Set before JAX first loads the TPU plugin. libtpu asks the GCE metadata server which TPU it runs on
# unless told not to; without one (a laptop, CI) that query only costs time. And libtpu lets one process
# at a time load it (a lock file); compiling drives no chip, so compiles may run side by side.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from parcae_jax import aot_analysis, errors, flops, sharding, train_step  # noqa: E402
from parcae_jax.aot_analysis import GiB, Slice, StepReport  # noqa: E402
from parcae_jax.cli_config import load_config, split_config_args  # noqa: E402
from parcae_jax.errors import ConfigError, UserError  # noqa: E402

EXIT_DOES_NOT_FIT = 3
STEPS = ("train", "eval", "decode")
REMAT_POLICIES = ("per-block", "per-iteration", "in-coda")  # parts of model.activation_checkpoint_impl
MAX_MICRO_BATCH = 1024  # the doubling search stops here


def topology_devices(slice_: Slice) -> list:
    """The devices of `slice_` as libtpu describes them (no TPU needed); checks the chip count and kind."""
    if importlib.util.find_spec("libtpu") is None:
        raise UserError("compiling for a TPU slice needs libtpu: pip install 'parcae-jax[aot]' (or libtpu)")
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name=slice_.topology, platform="tpu").devices
    kind = devices[0].device_kind
    if len(devices) != slice_.chips or kind != slice_.chip.device_kind:
        raise RuntimeError(
            f"{slice_.name} -> {slice_.topology}: libtpu reports {len(devices)} x {kind!r}, "
            f"expected {slice_.chips} x {slice_.chip.device_kind!r}; fix aot_analysis tables"
        )
    return list(devices)


def libtpu_version() -> str:
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------------------
# Config adjustments
# ---------------------------------------------------------------------------------------------------


def apply_remat(run_cfg, remat: str | None) -> None:
    """`off`, `on` (the config's policy) or a policy (`per-iteration`, `per-block+sac`, ...)."""
    if remat is None:
        return
    if remat in ("off", "on"):
        run_cfg.model.remat = remat == "on"
        return
    if not any(p in remat for p in REMAT_POLICIES):
        raise ConfigError(
            f"--remat {remat!r}: use off, on, or a policy naming one of {REMAT_POLICIES} "
            "(optionally with +sac), e.g. per-iteration"
        )
    run_cfg.model.remat = True
    run_cfg.model.activation_checkpoint_impl = remat


def remat_label(run_cfg) -> str:
    return run_cfg.model.activation_checkpoint_impl if run_cfg.model.remat else "off"


def set_micro_batch(run_cfg, micro: int, mesh) -> str | None:
    """Use `micro` sequences per data-parallel device. Memory per chip depends on the micro-batch, not
    on the accumulation count, so a world batch that cannot hold it is raised to the next multiple
    (returned as a note) rather than letting `batch_geometry` shrink the micro-batch."""
    if micro < 1:
        raise ConfigError(f"--micro-batch must be >= 1, got {micro}")
    run_cfg.train.micro_batch_size = micro
    global_micro = micro * mesh.shape["data"] * mesh.shape["fsdp"]
    world = int(run_cfg.train.world_batch_size)
    if world % global_micro == 0:
        return None
    raised = math.ceil(world / global_micro) * global_micro
    run_cfg.train.world_batch_size = raised
    return f"world batch raised from {world} to {raised} to hold micro-batch {micro} on every device"


def max_steps_of(run_cfg) -> int:
    try:
        return flops.training_budget(run_cfg).steps
    except (ValueError, KeyError) as e:
        raise ConfigError(str(e).strip('"')) from None


# ---------------------------------------------------------------------------------------------------
# Compiling the three steps
# ---------------------------------------------------------------------------------------------------


def _key_struct(sharding_):
    # eval_shape: a concrete key would start the default backend, which this tool never needs.
    return jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=sharding_)


def _batch_sharded(mesh, shape: tuple[int, ...], batch_axis: int) -> NamedSharding:
    """Rows over the data-parallel axes where they divide; everything else replicated."""
    spec = [None] * len(shape)
    spec[batch_axis] = ("data", "fsdp")
    return NamedSharding(mesh, sharding.fit_spec(PartitionSpec(*spec), shape, mesh))


def lower_train(run_cfg, mesh):
    """(lowered train step, setup, abstract state): the trainer's own functions, nothing executed."""
    setup, state = train_step.create_train_state(run_cfg, mesh, max_steps_of(run_cfg), abstract=True)
    step_fn = train_step.make_train_step(setup, run_cfg.train)
    rows = (setup.accum, setup.global_micro_batch, setup.model_cfg.block_size)
    batch = {
        k: jax.ShapeDtypeStruct(rows, jnp.int32, sharding=setup.batch_sharding) for k in ("inputs", "labels")
    }
    key = _key_struct(NamedSharding(mesh, PartitionSpec()))
    return step_fn.lower(state, batch, key), setup, state


def lower_eval(setup, params, rows: int):
    """The validation program: `TokenScorer`'s per-token CE at the model's length, as the trainer's
    `Evaluator` builds it (depth traced)."""
    from parcae_jax.evaluation.scoring import TokenScorer, graph_apply

    T = setup.model_cfg.block_size
    scorer = TokenScorer(
        graph_apply(setup.graphdef, setup.model_cfg),
        None,
        max_len=T,
        batch_size=rows,
        mesh=setup.mesh,
        buckets=[T],
    )
    ids = jax.ShapeDtypeStruct((scorer.batch_size, T), jnp.int32, sharding=scorer.row_sharding)
    replicated = NamedSharding(setup.mesh, PartitionSpec())
    uids = jax.ShapeDtypeStruct((scorer.batch_size,), jnp.int32, sharding=scorer.uid_sharding)
    depth = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    return scorer.stats_fn.lower(params, ids, ids, depth, _key_struct(replicated), uids)


def lower_decode(setup, params, rows: int):
    """The generator's one-token step (`engine._decode_step`) with a full cache of the model's length
    and depth `mean_recurrence`, rows sharded over the data-parallel axes, weights by the rules."""
    from parcae_jax import engine
    from parcae_jax.kv_cache import CachePlan, init_cache
    from parcae_jax.model import row_states
    from parcae_jax.sampling import PLAIN

    cfg, mesh = setup.model_cfg, setup.mesh
    parcae = cfg.arch == "parcae"
    plan = CachePlan(max_len=cfg.block_size, max_depth=int(cfg.mean_recurrence) if parcae else 1)

    def place(tree, batch_axis_from_end=None):
        def one(x):
            if x.ndim == 0:
                return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, PartitionSpec()))
            axis = x.ndim - batch_axis_from_end if batch_axis_from_end else 0
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_batch_sharded(mesh, x.shape, axis))

        return jax.tree.map(one, tree)

    cache = place(
        jax.eval_shape(lambda: init_cache(cfg, rows, plan)), batch_axis_from_end=4
    )  # [.., B, L, H, D]
    h0 = None
    if parcae:
        h0 = jax.eval_shape(lambda: row_states(jax.random.key(0), cfg, jnp.arange(rows), plan.max_len))
    run = place(
        {
            "lengths": jax.ShapeDtypeStruct((rows,), jnp.int32),
            "h0": h0,
            "num_steps": jax.ShapeDtypeStruct((), jnp.int32),
            "exit_eps": jax.ShapeDtypeStruct((), jnp.float32),
            "stop": jax.ShapeDtypeStruct((rows, 1), jnp.int32),
        }
    )
    run["key"] = _key_struct(NamedSharding(mesh, PartitionSpec()))
    tok = place(jax.ShapeDtypeStruct((rows,), jnp.int32))
    t = place(jax.ShapeDtypeStruct((), jnp.int32))
    step = engine._decode_step(setup.graphdef, plan, PLAIN)
    return step.lower(params, cache, tok, t, run)


def _compile(lowered, dump_dir: str):
    """Compile, with libtpu writing the optimised HLO as text into `dump_dir`: `compiled.as_text()`
    round-trips the module through jaxlib's HLO proto, which for some programs fails ("async-update
    instruction should have 1 operands") when libtpu's XLA is newer than jaxlib's."""
    return lowered.compile(
        {"xla_dump_to": dump_dir, "xla_dump_hlo_as_text": True, "xla_dump_hlo_as_proto": False}
    )


def _optimised_hlo(compiled, dump_dir: str) -> str:
    files = sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt")))
    if files:
        with open(files[-1]) as f:
            return f.read()
    return compiled.as_text()


def analyse(
    name: str,
    lowered,
    slice_: Slice,
    shape: dict,
    useful_flops: float | None = None,
    keep_dump: str | None = None,
) -> StepReport:
    """Compile `lowered` for the slice and read its per-chip numbers; an out-of-HBM refusal by the
    compiler is a report with fits=False (and the sizes it names), not an error. `keep_dump`: a folder
    to keep libtpu's dump in (optimised HLO, buffer assignment, memory-usage report)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="parcae_aot_") as tmp:
        dump = os.path.join(keep_dump, name) if keep_dump else tmp
        try:
            compiled = _compile(lowered, dump)
        except Exception as e:  # XlaRuntimeError: RESOURCE_EXHAUSTED when the program cannot fit
            message = str(e)
            if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
                raise
            need, have, what = aot_analysis.parse_hbm_oom(message) or (None, None, "")
            return StepReport(
                name,
                False,
                time.perf_counter() - t0,
                hbm_bytes=slice_.chip.hbm_bytes,
                required_bytes=need,
                available_bytes=have,
                required_is_total=what == "total",
                error=message.strip().splitlines()[0][:300],
                shape=shape,
            )
        compile_s = time.perf_counter() - t0
        hlo = _optimised_hlo(compiled, dump)
    memory = aot_analysis.memory_breakdown(compiled.memory_analysis())
    cost = aot_analysis.cost_numbers(compiled.cost_analysis())
    collectives = aot_analysis.collective_bytes(hlo)
    # Compute bound from whichever count is larger: XLA counts a loop body once, the analytical count
    # assumes the expected depths.
    work = max(cost["flops"], useful_flops or 0.0)
    bound = aot_analysis.roofline(
        slice_.chip, work, cost["bytes_accessed"], collectives["total"], useful_flops
    )
    return StepReport(
        name,
        memory["total"] <= slice_.chip.hbm_bytes,
        compile_s,
        memory,
        slice_.chip.hbm_bytes,
        cost["flops"],
        useful_flops,
        cost["bytes_accessed"],
        collectives,
        bound,
        shape=shape,
        pallas_calls=hlo.count('custom_call_target="tpu_custom_call"'),
    )


def train_useful_flops(setup, run_cfg, chips: int) -> float:
    """Hardware FLOPs per chip of one optimiser step at the expected depths (the trainer's MFU numerator)."""
    cfg = setup.model_cfg
    if cfg.arch == "parcae":
        t, s = flops.expected_split(cfg)
        per_token = flops.hardware_flops_per_token(cfg, f=t + s, b=s)
    else:
        per_token = flops.hardware_flops_per_token(cfg)
    tokens = setup.accum * setup.global_micro_batch * cfg.block_size
    return per_token * tokens / chips


def state_bytes_per_chip(state) -> int:
    """Bytes of one device's shards of the train state (parameters, optimizer state, step)."""
    total = 0
    for x in jax.tree.leaves(state):
        total += math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
    return total


def compile_steps(
    run_cfg, slice_: Slice, devices, steps=STEPS, decode_rows: int | None = None, keep_dump: str | None = None
) -> tuple[list[StepReport], dict]:
    """Compile the requested steps of `run_cfg` on the slice; (reports, description of the setup)."""
    mesh = sharding.make_mesh(run_cfg.mesh.data, run_cfg.mesh.fsdp, run_cfg.mesh.tensor, devices=devices)
    reports = []
    # The attention picks its kernel from the mesh in context (splash under shard_map on TPU).
    with jax.set_mesh(mesh):
        lowered, setup, state = lower_train(run_cfg, mesh)
        data_devices = mesh.shape["data"] * mesh.shape["fsdp"]
        micro = setup.global_micro_batch // data_devices
        info = {
            "model": setup.model_cfg.name or setup.model_cfg.arch,
            "mesh": dict(mesh.shape),
            "micro_batch": micro,
            "accum": setup.accum,
            "world_batch": int(run_cfg.train.world_batch_size),
            "seq_len": setup.model_cfg.block_size,
            "remat": remat_label(run_cfg),
            "attention_impl": setup.model_cfg.attention_impl,
            "loss_chunk_len": int(run_cfg.train.loss_chunk_len),
            "libtpu": libtpu_version(),
        }
        if "train" in steps:
            shape = {"micro_batch": micro, "accum": setup.accum, "seq_len": setup.model_cfg.block_size}
            report = analyse(
                "train", lowered, slice_, shape, train_useful_flops(setup, run_cfg, len(devices)), keep_dump
            )
            report.state_bytes = state_bytes_per_chip(state)
            reports.append(report)
        rows = decode_rows or setup.global_micro_batch
        if "eval" in steps:
            reports.append(
                analyse(
                    "eval",
                    lower_eval(setup, state["params"], setup.global_micro_batch),
                    slice_,
                    {"rows": setup.global_micro_batch, "seq_len": setup.model_cfg.block_size},
                    keep_dump=keep_dump,
                )
            )
        if "decode" in steps:
            reports.append(
                analyse(
                    "decode",
                    lower_decode(setup, state["params"], rows),
                    slice_,
                    {"rows": rows, "cache_len": setup.model_cfg.block_size},
                    keep_dump=keep_dump,
                )
            )
    return reports, info


# ---------------------------------------------------------------------------------------------------
# Largest micro-batch that fits
# ---------------------------------------------------------------------------------------------------


def predicted_max_micro(micro: int, report: StepReport, hbm_bytes: int) -> int | None:
    """The micro-batch at which memory reaches HBM if it grows linearly in the micro-batch on top of
    the train state (activations and logits scale with the rows; parameters, moments and gradients do
    not); None when the compile said nothing about its size."""
    used, state = report.used_bytes, report.state_bytes or 0
    if used is None:
        return None
    return int((hbm_bytes - state) // (max(used - state, 1) / micro))


def state_exceeds_hbm(run_cfg, slice_: Slice, mesh, micro: int) -> StepReport | None:
    """A refusal without compiling when one chip's shards of the parameters and optimizer state alone
    exceed its HBM (then no micro-batch fits on this mesh, and for the large configs the compiler takes
    minutes per try to say so); None when the state fits."""
    cfg = run_cfg.copy_and_resolve_references()
    set_micro_batch(cfg, micro, mesh)
    _, state = train_step.create_train_state(cfg, mesh, max_steps_of(cfg), abstract=True)
    state_bytes = state_bytes_per_chip(state)
    if state_bytes <= slice_.chip.hbm_bytes:
        return None
    return StepReport("train", False, 0.0, hbm_bytes=slice_.chip.hbm_bytes, required_bytes=state_bytes,
                      required_is_total=True, state_bytes=state_bytes, compiled=False,
                      error=f"the train state alone is {state_bytes / GiB:.2f} GiB per chip",
                      shape={"micro_batch": micro})


def find_max_micro_batch(
    run_cfg, slice_: Slice, devices, start: int, bisect: bool = True, log=print
) -> tuple[int | None, dict[int, StepReport]]:
    """Largest micro-batch per device whose train step fits, with few compiles.

    A compile that fits takes minutes, one the compiler refuses for HBM a fraction of that, so: nothing
    is compiled when the train state alone exceeds a chip's HBM (`state_exceeds_hbm`); else compile
    `start`; jump to the largest power of two below the linear memory prediction from it; then double
    up (or halve down) until a fit and a failure bracket the answer, and bisect between them
    (`bisect=False`: stop at the bracket, i.e. powers of two). Returns (micro-batch or None, report
    per micro-batch tried)."""
    tried: dict[int, StepReport] = {}
    mesh = sharding.make_mesh(run_cfg.mesh.data, run_cfg.mesh.fsdp, run_cfg.mesh.tensor, devices=devices)
    lo, hi = 0, MAX_MICRO_BATCH + 1  # largest known fit, smallest known failure

    def fits(micro: int) -> bool:
        nonlocal lo, hi
        cfg = run_cfg.copy_and_resolve_references()
        set_micro_batch(cfg, micro, mesh)
        (report,), _ = compile_steps(cfg, slice_, devices, steps=("train",))
        tried[micro] = report
        log(f"  micro-batch {micro:>4}: {aot_analysis.fit_text(report)} ({report.compile_s:.0f} s)")
        if report.fits:
            lo = max(lo, micro)
        else:
            hi = min(hi, micro)
        return report.fits

    too_big = state_exceeds_hbm(run_cfg, slice_, mesh, start)
    if too_big is not None:
        tried[start] = too_big
        log(f"  micro-batch {start:>4}: {aot_analysis.fit_text(too_big)} (not compiled)")
        return None, tried
    fits(start)
    guess = predicted_max_micro(start, tried[start], slice_.chip.hbm_bytes)
    if guess is not None:
        m = 2 ** int(math.log2(guess)) if guess >= 1 else 1
        if lo < m < hi:
            fits(m)

    def bracketed() -> bool:
        return lo >= 1 and hi <= MAX_MICRO_BATCH and (hi - lo <= 1 or (not bisect and hi <= 2 * lo))

    while not bracketed():
        if lo >= 1 and hi <= MAX_MICRO_BATCH:
            # Narrow the bracket; powers of two: from the top, where a miss is a cheap refusal.
            m = (lo + hi) // 2 if bisect else lo * 2 ** int(math.log2((hi - 1) / lo))
        else:
            m = lo * 2 if lo >= 1 else hi // 2  # no failure yet: grow; no fit yet: shrink
        if m < 1 or m > MAX_MICRO_BATCH or m in tried:
            break
        fits(m)
    return (lo or None), tried


def machine_note() -> str:
    return f"{platform.machine()} {os.cpu_count()}-core CPU, libtpu {libtpu_version()}, jax {jax.__version__}"


def write_json(path: str, payload: dict) -> None:
    from parcae_jax import fileio

    fileio.write_json_atomic(path, fileio.to_jsonable(payload))


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m parcae_jax.aot", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--topology", help="v5e-8, v6e-8, v5p-8, v5p-32 (v5p-N counts TensorCores) or raw v5p:2x2x4"
    )
    p.add_argument("--micro-batch", type=int, help="train.micro_batch_size (world batch raised if needed)")
    p.add_argument(
        "--remat", help="off, on (the config's policy) or a policy, e.g. per-iteration, per-block+sac"
    )
    p.add_argument(
        "--find-max-micro-batch",
        action="store_true",
        help="search the largest micro-batch whose train step fits (doubling, then bisection)",
    )
    p.add_argument(
        "--search",
        choices=("bisect", "doubling"),
        default="bisect",
        help="with --find-max-micro-batch: bisect to the exact size, or stop at powers of two",
    )
    p.add_argument(
        "--steps", default=",".join(STEPS), help="which steps to compile (comma list of train,eval,decode)"
    )
    p.add_argument(
        "--decode-batch", type=int, help="decode rows in all (default: the train step's global micro-batch)"
    )
    p.add_argument("--json", help="write the report here")
    p.add_argument(
        "--dump", help="keep libtpu's dump of each step here (optimised HLO, buffer assignment, memory usage)"
    )
    return p


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path, overrides, rest = split_config_args(argv)
    args = _parser().parse_args(rest)
    if "JAX_PLATFORMS" not in os.environ:
        # Nothing runs here: keep JAX off any local accelerator (e.g. a TPU VM busy training).
        jax.config.update("jax_platforms", "cpu")
    if path is None or not args.topology:
        raise ConfigError(
            "--config FILE and --topology SLICE are required (e.g. --config configs/tiny.py --topology v5e-8)"
        )
    steps = tuple(s.strip() for s in args.steps.split(",") if s.strip())
    unknown = sorted(set(steps) - set(STEPS))
    if unknown or not steps:
        raise ConfigError(f"--steps {args.steps!r}: choose from {','.join(STEPS)}")
    slice_ = aot_analysis.resolve_topology(args.topology)
    run_cfg = load_config(path, overrides)
    apply_remat(run_cfg, args.remat)
    devices = topology_devices(slice_)
    mesh = sharding.make_mesh(run_cfg.mesh.data, run_cfg.mesh.fsdp, run_cfg.mesh.tensor, devices=devices)
    payload: dict[str, Any] = {
        "command": "python -m parcae_jax.aot " + " ".join(argv),
        "topology": slice_.name,
        "libtpu_topology": slice_.topology,
        "chips": slice_.chips,
        "chip": dataclasses.asdict(slice_.chip),
        "machine": machine_note(),
        "date": datetime.date.today().isoformat(),
    }
    known: dict[str, StepReport] = {}
    if args.find_max_micro_batch:
        start = args.micro_batch or int(run_cfg.train.micro_batch_size)
        print(
            f"searching the largest micro-batch for {path} on {slice_.name} (remat {remat_label(run_cfg)}):"
        )
        best, tried = find_max_micro_batch(run_cfg, slice_, devices, start, bisect=args.search == "bisect")
        payload["search"] = {
            "best_micro_batch": best,
            "remat": remat_label(run_cfg),
            "tried": {m: dataclasses.asdict(r) for m, r in sorted(tried.items())},
        }
        if best is None:
            print("no micro-batch fits")
            if args.json:
                write_json(args.json, payload)
            return EXIT_DOES_NOT_FIT
        print(f"largest micro-batch that fits: {best}")
        args.micro_batch = best
        known["train"] = tried[best]  # compiled already: only eval and decode are left
    note = set_micro_batch(run_cfg, args.micro_batch, mesh) if args.micro_batch else None
    if note:
        print(note)
    todo = tuple(s for s in steps if s not in known)
    fresh, info = compile_steps(run_cfg, slice_, devices, todo, args.decode_batch, args.dump)
    reports = [known.get(s) or next(r for r in fresh if r.step == s) for s in steps]
    print(aot_analysis.format_report(reports, info, slice_))
    payload.update(setup=info, note=note, steps={r.step: dataclasses.asdict(r) for r in reports})
    if args.json:
        write_json(args.json, payload)
    return 0 if all(r.fits for r in reports) else EXIT_DOES_NOT_FIT


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default sys.argv[1:]) in the error boundary; its exit status."""
    return errors.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
