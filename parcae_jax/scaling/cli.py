"""`python -m parcae_jax.scaling plan|run|status|fit`: isoFLOP sweeps from plan to fitted laws.

plan    --sweep configs/sweeps/paper_140m.py --root DIR [--workdir-root gs://...]
        [--device h100 --mfu 0.4 --num-devices 8]
run     --root DIR [--launcher local|pod] [--launcher-args "--name SLICE --zone ZONE"]
        [--depth-sweep auto|eval|builtin] [--only POINT ...] [--retry-failed] [--dry-run]
status  --root DIR
fit     --root DIR [--out DIR] [--no-plots]
"""

from __future__ import annotations

import argparse
import collections
import shlex
import sys

from parcae_jax import errors, flops
from parcae_jax.errors import ConfigError
from parcae_jax.metrics import format_duration
from parcae_jax.scaling import fit, plots, runner, state, sweep

DEFAULT_SWEEP = "configs/sweeps/paper_140m.py"


def peak_for(device: str) -> float:
    """Peak bf16 FLOP/s of a device name as `flops.peak_flops_per_device` knows it ("h100", "NVIDIA
    H200", "v5p", "TPU v6 lite", ...)."""
    for kind in (device, f"tpu {device}"):
        peak = flops.peak_flops_per_device(kind)
        if peak is not None:
            return peak
    raise ConfigError(f"unknown device {device!r}: try h100, h200, a100, v4, v5e, v5p, v6e")


def plan_table(points: list[sweep.Point], peak: float, mfu: float, num_devices: int) -> str:
    header = (
        f"{'point':<22} {'r̄':>3} {'k̄':>3} {'budget':>8} {'FLOPs/token':>15} {'tokens':>15} "
        f"{'steps':>8} {'FLOPs':>10} {'est. time':>10}"
    )
    lines = [header, "-" * len(header)]
    for p in points:
        seconds = sweep.estimated_seconds([p], peak, mfu, num_devices)
        lines.append(
            f"{p.name:<22} {p.mean_recurrence:>3} {p.mean_backprop_depth:>3} {p.flop_budget:>8.3g} "
            f"{p.flops_per_token:>15,} {p.trained_tokens:>15,} {p.steps:>8,} {p.total_flops:>10.3e} "
            f"{format_duration(seconds):>10}"
        )
    official = sum(p.total_flops for p in points)
    hardware = sum(p.trained_tokens * p.hardware_flops_per_token for p in points)
    total_s = sweep.estimated_seconds(points, peak, mfu, num_devices)
    lines += [
        "-" * len(header),
        f"{len(points)} points; total {official:.4e} FLOPs (official formula), "
        f"{hardware:.4e} hardware FLOPs (causal attention, head, expected depth split)",
        f"estimated wall time {format_duration(total_s)} ({total_s / 3600:.1f} h) on {num_devices} × "
        f"{peak / 1e12:.0f} TFLOP/s at {mfu:.0%} MFU (hardware FLOPs / (peak × MFU × devices))",
    ]
    return "\n".join(lines)


def status_table(root: str) -> str:
    _, points = sweep.read_plan(root)
    header = f"{'point':<22} {'r̄':>3} {'budget':>8} {'steps':>8} {'state':<8} {'detail':<20} {'val loss':>9}"
    lines = [header, "-" * len(header)]
    counts: collections.Counter = collections.Counter()
    for p in points:
        s = state.point_status(f"{root}/{p.name}", p)
        counts[s.state] += 1
        loss = f"{s.val_loss:.4f}" if s.val_loss is not None else ""
        lines.append(
            f"{p.name:<22} {p.mean_recurrence:>3} {p.flop_budget:>8.3g} {p.steps:>8,} {s.state:<8} "
            f"{s.detail:<20} {loss:>9}"
        )
    lines.append("-" * len(header))
    lines.append(", ".join(f"{counts[k]} {k}" for k in state.STATES))
    return "\n".join(lines)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parcae_jax.scaling", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="write one run folder per (recurrence, budget) point")
    p.add_argument("--sweep", default=DEFAULT_SWEEP, help=f"sweep config (default {DEFAULT_SWEEP})")
    p.add_argument("--root", required=True, help="sweep folder")
    p.add_argument("--workdir-root", default=None, help="put training workdirs here (e.g. gs://bucket/sweep)")
    p.add_argument("--device", default="h100", help="device for the wall-time estimate (h100, v5p, ...)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the estimate")
    p.add_argument("--num-devices", type=int, default=1, help="devices per run for the estimate")

    r = sub.add_parser("run", help="train and evaluate pending points, one after another")
    r.add_argument("--root", required=True)
    r.add_argument("--launcher", choices=runner.LAUNCHERS, default="local")
    r.add_argument(
        "--launcher-args",
        default="",
        help='pod launcher flags before the train.py arguments, e.g. "--name SLICE --zone ZONE"',
    )
    r.add_argument("--poll-seconds", type=float, default=60.0, help="pod: workdir polling interval")
    r.add_argument("--only", nargs="+", default=None, metavar="POINT", help="run only these points")
    r.add_argument("--retry-failed", action="store_true", help="run failed points again")
    r.add_argument("--dry-run", action="store_true", help="print the training commands, run nothing")

    s = sub.add_parser("status", help="done / running / pending / failed per point")
    s.add_argument("--root", required=True)

    f = sub.add_parser("fit", help="fit the scaling laws, write fits.json and PNGs")
    f.add_argument("--root", required=True)
    f.add_argument("--out", default=None, help="output folder (default ROOT/fits)")
    f.add_argument("--no-plots", action="store_true")

    args = parser.parse_args(argv)
    if args.command == "plan":
        if not 0 < args.mfu <= 1:
            parser.error("--mfu must be in (0, 1]")
        peak = peak_for(args.device)
        config = sweep.load_sweep(args.sweep)
        points = sweep.plan_points(config, args.root, args.workdir_root)
        sweep.write_plan(config, args.sweep, args.root, points)
        print(f"sweep {config.name}: {config.base_config}, plan in {args.root}")
        print(plan_table(points, peak, args.mfu, args.num_devices))
    elif args.command == "run":
        try:
            outcome = runner.run_sweep(
                args.root,
                launcher=args.launcher,
                launcher_args=shlex.split(args.launcher_args),
                poll_seconds=args.poll_seconds,
                retry_failed=args.retry_failed,
                only=args.only,
                dry_run=args.dry_run,
            )
        except KeyboardInterrupt:
            print("interrupted: the point in progress resumes from its last checkpoint on the next `run`")
            return 130
        if not args.dry_run:
            print(status_table(args.root))
        return 1 if "failed" in outcome.values() else 0
    elif args.command == "status":
        print(status_table(args.root))
    elif args.command == "fit":
        fits = fit.run_fit(args.root, args.out, plot=None if args.no_plots else plots.plot_all)
        out = args.out or f"{args.root}/fits"
        print(fit.summary(fits))
        print(f"wrote {out}/fits.json" + "".join(f", {name}" for name in fits["plots"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default sys.argv[1:]) in the error boundary; its exit status."""
    return errors.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
