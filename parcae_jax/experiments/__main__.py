"""`python -m parcae_jax.experiments CLAIM --root DIR [--scale micro|cpu|gpu|tpu]`: run one claim.

    python -m parcae_jax.experiments list
    python -m parcae_jax.experiments stability --root runs/experiments/stability --scale cpu

Trains the claim's runs under DIR (re-running the command resumes: finished runs are kept, an
interrupted one continues from its last checkpoint), then writes DIR/results.json (or --out) and the
PNGs and prints a summary. `--scale gpu|tpu` needs prepared shards (`--data-dir`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from parcae_jax import errors
from parcae_jax.errors import ConfigError
from parcae_jax.experiments import CLAIMS, common


def first_paragraph(module) -> str:
    return " ".join(module.__doc__.split("\n\n")[1].split())


def run_claim(
    claim: str,
    root: str,
    scale: str,
    *,
    out: str | None = None,
    data_dir: str | None = None,
    launcher: str | None = None,
    retry_failed: bool = False,
    bundle: str | None = None,
    max_per_task: int = 100,
    say=print,
) -> dict:
    """Plan, train (resuming), analyse and write one claim; returns its results document."""
    import pathlib

    from parcae_jax.scaling import runner

    module = _claim_module(claim, scale)
    if bundle and not hasattr(module, "score_bundle"):
        raise ConfigError(f"--bundle scores the parcae-vs-gpt models; {claim} has none to score")
    if scale in ("gpu", "tpu") and data_dir is None:
        raise ConfigError(
            f"--scale {scale} trains on prepared shards: pass --data-dir DIR (make one with "
            "`python -m parcae_jax.data.prepare`, e.g. FineWeb-Edu)"
        )
    start = time.perf_counter()
    points = common.plan(claim, scale, root, module.runs(scale, data_dir))
    launcher = launcher or ("inprocess" if scale in ("micro", "cpu") else "local")
    say(f"{claim} at scale {scale}: {len(points)} runs under {root} ({launcher})")
    runner.run_sweep(root, launcher=launcher, retry_failed=retry_failed, say=say)
    outcomes = {p.name: common.run_outcome(root, p) for p in points}
    unfinished = {n: o for n, o in outcomes.items() if o["state"] != "done"}
    # A stopped run is a result only where stopping is what the claim measures (a divergence).
    if unfinished and not getattr(module, "STOPPED_RUNS_ARE_RESULTS", False):
        first = next(iter(unfinished.items()))
        raise common.ClaimIncomplete(
            f"{len(unfinished)} of {len(points)} runs did not finish ({first[0]}: {first[1]['state']}, "
            f"{first[1]['error']}); fix the cause and re-run with --retry-failed"
        )
    results = {"claim": claim, "paper_claim": first_paragraph(module)}
    results |= module.analyze(points, outcomes, scale)
    if bundle:
        results["core"] = module.score_bundle(points, root, bundle, max_per_task, say)
    results["runs_seconds"] = round(common.train_seconds(outcomes), 1)
    command = f"python -m parcae_jax.experiments {claim} --root {root} --scale {scale}"
    results["environment"] = common.environment(scale, time.perf_counter() - start, command)
    out_dir = pathlib.Path(out or root)
    out_dir.mkdir(parents=True, exist_ok=True)
    results["plots"] = module.draw(results, out_dir)
    path = common.write_results(out_dir, results)
    for line in module.summary(results):
        say(line)
    say(f"wrote {path} and {', '.join(results['plots'])}")
    return results


# What a dry run assumes for its wall-time estimate: the scale's device and a model FLOPs utilisation.
# (device, chips, MFU): the gpu scale is sized for one H100, the tpu scale for a v5e-8.
ESTIMATE = {"micro": ("cpu", 1, 0.1), "cpu": ("cpu", 1, 0.1), "gpu": ("h100", 1, 0.4), "tpu": ("v5e", 8, 0.4)}
CPU_PEAK = 2e11  # FLOP/s: order of a 2-core CPU at fp32 (its MFU figure is then nominal)


def dry_run(claim: str, scale: str, say=print) -> float:
    """Print the claim's runs at this scale (steps, tokens, FLOPs) and an estimated training time;
    writes nothing. The base config's vocabulary is assumed (no dataset is read)."""
    from parcae_jax.scaling import cli, sweep

    module = _claim_module(claim, scale)
    device, chips, mfu = ESTIMATE[scale]
    peak = CPU_PEAK if device == "cpu" else cli.peak_for(device)
    total = 0.0
    for run in module.runs(scale, None):
        p = sweep.make_point(run.name, run.base, list(run.overrides), "/nonexistent")
        seconds = sweep.estimated_seconds([p], peak, mfu, chips)
        total += seconds
        say(
            f"{p.name:<24} {p.steps:>8,} steps {p.trained_tokens:>14,} tokens {p.total_flops:>10.3g} FLOPs "
            f"~{seconds / 60:,.0f} min"
        )
    say(f"{claim} at scale {scale}: ~{total / 3600:.1f} h of training on {chips} x {device} at {mfu:.0%} MFU")
    return total


def _claim_module(claim: str, scale: str):
    if claim not in CLAIMS:
        raise ConfigError(f"unknown claim {claim!r}; the claims are {', '.join(CLAIMS)}")
    if scale not in common.SCALES:
        raise ConfigError(f"--scale must be one of {', '.join(common.SCALES)}, got {scale!r}")
    return importlib.import_module(CLAIMS[claim])


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m parcae_jax.experiments", description=__doc__.split("\n")[0]
    )
    parser.add_argument("claim", help=f"list, or one of: {', '.join(CLAIMS)}")
    parser.add_argument("--root", help="folder of the claim's runs (re-use it to resume)")
    parser.add_argument("--scale", default="cpu", help=f"one of {', '.join(common.SCALES)} (default cpu)")
    parser.add_argument("--out", default=None, help="where results.json and the PNGs go (default --root)")
    parser.add_argument("--data-dir", default=None, help="prepared dataset (required for gpu and tpu)")
    parser.add_argument(
        "--launcher",
        default=None,
        choices=("inprocess", "local", "pod"),
        help="how runs train (default: inprocess at micro/cpu scale, local otherwise)",
    )
    parser.add_argument("--retry-failed", action="store_true", help="train failed runs again")
    parser.add_argument("--bundle", default=None, help="parcae-vs-gpt: score the models on this eval bundle")
    parser.add_argument("--max-per-task", type=int, default=100, help="--bundle: examples per task (-1: all)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and a time estimate only")
    args = parser.parse_args(argv)
    if args.claim == "list":
        for name, module_name in CLAIMS.items():
            print(f"{name:<16} {first_paragraph(importlib.import_module(module_name))}")
        return 0
    if args.dry_run:
        dry_run(args.claim, args.scale)
        return 0
    if not args.root:
        raise ConfigError(f"--root is required: e.g. --root runs/experiments/{args.claim}")
    try:
        run_claim(
            args.claim,
            args.root,
            args.scale,
            out=args.out,
            data_dir=args.data_dir,
            launcher=args.launcher,
            retry_failed=args.retry_failed,
            bundle=args.bundle,
            max_per_task=args.max_per_task,
        )
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume")
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    return errors.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
