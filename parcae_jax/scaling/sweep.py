"""Sweep configs and plans: one training run per (mean recurrence, FLOP budget) point.

A sweep config (`configs/sweeps/*.py`, `get_config()`) names a base run config, overrides for every
point, the mean recurrences with a backprop-depth rule, the FLOP budgets and the test-time depth
sweep. `plan_points` turns it into points: the exact `parcae_jax.train` overrides, the token and step budget
from `flops.training_budget` (tokens = ⌊budget / FLOPs-per-token⌋, steps = tokens // tokens-per-step),
and the FLOPs. `write_plan` lays them out as

    ROOT/sweep.json            the sweep config and the point names, in run order
    ROOT/<point>/point.json    one point (below); the folder is also the training workdir
    ROOT/<point>/command.sh    its exact training command
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shlex
from typing import Any

import ml_collections

from parcae_jax import fileio, flops
from parcae_jax.cli_config import load_config
from parcae_jax.errors import ConfigError, NotFoundError

REPO = pathlib.Path(__file__).resolve().parents[2]  # where configs/ live; commands run there
PLAN_FILE = "sweep.json"
POINT_FILE = "point.json"
COMMAND_FILE = "command.sh"


def backprop_depth(rule: str, mean_recurrence: int) -> int:
    """Mean backprop depth k̄ for a mean recurrence r̄: `ceil_half` ⌈r̄/2⌉ (the paper's), `equal` r̄,
    or `fixed:K` min(K, r̄)."""
    if rule == "ceil_half":
        return math.ceil(mean_recurrence / 2)
    if rule == "equal":
        return mean_recurrence
    if rule.startswith("fixed:"):
        return min(int(rule.partition(":")[2]), mean_recurrence)
    raise ConfigError(f"backprop_depth rule must be ceil_half, equal or fixed:K, got {rule!r}")


def format_budget(value: float) -> str:
    """1e18 -> '1e18', 1.6e19 -> '1.6e19', 2e11 -> '2e11' (short, exact for grid values)."""
    text = f"{value:.6g}".replace("e+", "e")
    mantissa, _, exponent = text.partition("e")
    return f"{mantissa}e{int(exponent)}" if exponent else mantissa


def point_name(mean_recurrence: int, budget: float) -> str:
    return f"rec{mean_recurrence:02d}_flops{format_budget(budget)}"


def sweep_depths(depth_cfg, mean_recurrence: int) -> list[int]:
    """Depths of the test-time sweep for a model trained at r̄ (always includes r̄)."""
    limit = max(depth_cfg.max_factor * mean_recurrence, depth_cfg.min_max_depth)
    return sorted({int(d) for d in depth_cfg.depths if d <= limit} | {mean_recurrence})


@dataclasses.dataclass(frozen=True)
class Point:
    """One planned run (what `point.json` holds)."""

    name: str
    mean_recurrence: int
    mean_backprop_depth: int
    flop_budget: float | None  # the isoFLOP budget it belongs to (None: a run outside a sweep)
    base_config: str
    overrides: tuple[str, ...]  # `a.b=value`, in the order they are passed to training
    workdir: str
    tokens: int  # token budget ⌊budget / flops_per_token⌋
    steps: int
    trained_tokens: int  # steps × tokens_per_step
    tokens_per_step: int
    flops_per_token: int  # official formula at f = r̄, b = k̄
    hardware_flops_per_token: int  # expected split, for wall-time estimates at a given MFU
    total_flops: int  # trained_tokens × flops_per_token (≤ budget)
    params: dict[str, int]  # embedding, core, non_core, total
    test_depths: tuple[int, ...]
    depth_sweep_batches: int | None
    depth_sweep_batch_size: int

    def train_args(self) -> list[str]:
        """Everything after `python -m parcae_jax.train`."""
        args = ["--config", self.base_config, "--workdir", self.workdir]
        return args + [f"--config.{o}" for o in self.overrides]

    def command(self, python: str = "python") -> list[str]:
        # the module, not the checkout's train.py, so that an installed package runs sweeps too
        return [python, "-m", "parcae_jax.train", *self.train_args()]

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["command"] = shlex.join(self.command())
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Point:
        fields = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in fields}
        data["overrides"] = tuple(data["overrides"])
        data["test_depths"] = tuple(data["test_depths"])
        return cls(**data)


def load_sweep(path: str) -> ml_collections.ConfigDict:
    """A sweep config file (`file.py` or `file.py:arg`); relative paths are tried from the repository."""
    file, sep, arg = path.partition(":")
    if not os.path.exists(file) and (REPO / file).exists():
        path = f"{REPO / file}{sep}{arg}"
    sweep = load_config(path)
    for key in ("name", "base_config", "mean_recurrences", "backprop_depth", "flop_budgets", "depth_sweep"):
        if key not in sweep:
            raise ConfigError(f"{path}: a sweep config needs the field {key!r}")
    return sweep


def _absolute_spec(base: str) -> str:
    """`file.py[:arg]` with the file made absolute (a relative one is relative to the repository, where
    train.py runs); the command keeps the spec as written."""
    file, sep, arg = base.partition(":")
    path = file if os.path.isabs(file) else str(REPO / file)
    if not os.path.exists(path):
        raise NotFoundError(f"base config {file} not found (relative paths are from {REPO})")
    return f"{path}{sep}{arg}"


def point_overrides(base_run_cfg, sweep, mean_recurrence: int, budget: float) -> list[str]:
    """The point's own overrides (recurrence, backprop depth, stop criterion), then the sweep's."""
    k = backprop_depth(sweep.backprop_depth, mean_recurrence)
    out = [f"model.mean_recurrence={mean_recurrence}", f"model.mean_backprop_depth={k}"]
    # Exactly one stop criterion: clear the base config's, then set the FLOP budget.
    out += [
        f"train.{c}=None"
        for c in flops.STOP_CRITERIA
        if c != "max_flops" and base_run_cfg.train[c] is not None
    ]
    out.append(f"train.max_flops={format_budget(budget)}")
    return out + list(sweep.get("overrides", ()))


def make_point(
    name: str,
    base: str,
    overrides: list[str],
    root: str | os.PathLike,
    *,
    workdir_root: str | None = None,
    flop_budget: float | None = None,
    test_depths: tuple[int, ...] = (),
    depth_sweep_batches: int | None = None,
    depth_sweep_batch_size: int = 8,
) -> Point:
    """One run of `base` (a config spec, relative to the repository or absolute) with `overrides`: its
    token/step budget, FLOPs and parameter counts come from the run config itself.

    `workdir_root` puts the training workdir elsewhere (e.g. `gs://bucket/sweep` for a TPU pod); by
    default the point's folder under `root` is its workdir."""
    run_cfg = load_config(_absolute_spec(base), overrides)
    b = flops.training_budget(run_cfg)
    p = flops.param_counts(run_cfg)
    root = os.path.abspath(os.fspath(root))
    workdir = os.path.join(root, name) if workdir_root is None else f"{workdir_root.rstrip('/')}/{name}"
    return Point(
        name=name,
        # a GPT has no loop: one pass, counted as recurrence 1 (its validation loss has no depth suffix)
        mean_recurrence=int(run_cfg.model.get("mean_recurrence") or 1),
        mean_backprop_depth=int(run_cfg.model.get("mean_backprop_depth") or 1),
        flop_budget=flop_budget,
        base_config=base,
        overrides=tuple(overrides),
        workdir=workdir,
        tokens=b.tokens,
        steps=b.steps,
        trained_tokens=b.trained_tokens,
        tokens_per_step=b.tokens_per_step,
        flops_per_token=b.flops_per_token,
        hardware_flops_per_token=flops.hardware_flops_per_token(run_cfg),
        total_flops=b.total_flops,
        params={"embedding": p.embedding, "core": p.core, "non_core": p.non_core, "total": p.total},
        test_depths=tuple(test_depths),
        depth_sweep_batches=depth_sweep_batches,
        depth_sweep_batch_size=int(depth_sweep_batch_size),
    )


def plan_points(sweep, root: str | os.PathLike, workdir_root: str | None = None) -> list[Point]:
    """All points of a sweep, budget-major (cheap budgets first), recurrences ascending."""
    base_run_cfg = load_config(_absolute_spec(sweep.base_config))
    points = []
    for budget in sorted(float(b) for b in sweep.flop_budgets):
        for r in sorted(int(x) for x in sweep.mean_recurrences):
            overrides = point_overrides(base_run_cfg, sweep, r, budget)
            points.append(make_point(
                point_name(r, budget), sweep.base_config, overrides, root,
                workdir_root=workdir_root, flop_budget=budget,
                test_depths=tuple(sweep_depths(sweep.depth_sweep, r)),
                depth_sweep_batches=sweep.depth_sweep.batches,
                depth_sweep_batch_size=sweep.depth_sweep.batch_size,
            ))  # fmt: skip
    return points


def write_plan(sweep, sweep_path: str, root: str | os.PathLike, points: list[Point]) -> None:
    """Write sweep.json and every point's folder. Re-planning keeps the folders' run state, but a point
    whose command changed would mix two runs in one workdir: refuse unless it has not started."""
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for point in points:
        folder = root / point.name
        old = folder / POINT_FILE
        if old.exists():
            previous = Point.from_json(json.loads(old.read_text()))
            started = (folder / "checkpoints").exists() or (folder / "metrics.jsonl").exists()
            if previous.command() != point.command() and started:
                raise ConfigError(
                    f"{folder} already holds a run with another command:\n"
                    f"  {shlex.join(previous.command())}\nnow:\n  {shlex.join(point.command())}\n"
                    "use a new --root (or delete that point's folder)"
                )
        folder.mkdir(exist_ok=True)
        fileio.write_json_atomic(folder / POINT_FILE, point.to_json())
        script = "#!/usr/bin/env bash\nset -euo pipefail\n"
        script += f"cd {shlex.quote(str(REPO))}\n{shlex.join(point.command())}\n"
        (folder / COMMAND_FILE).write_text(script)
        (folder / COMMAND_FILE).chmod(0o755)
    plan = {
        "name": sweep.name,
        "sweep": sweep_path,
        "config": sweep.to_dict(),
        "points": [p.name for p in points],
    }
    fileio.write_json_atomic(root / PLAN_FILE, fileio.to_jsonable(plan))


def read_plan(root: str | os.PathLike) -> tuple[dict, list[Point]]:
    root = pathlib.Path(root)
    path = root / PLAN_FILE
    if not path.exists():
        raise NotFoundError(
            f"{path} not found: run `python -m parcae_jax.scaling plan --root {root}` first"
        )
    plan = json.loads(path.read_text())
    points = [Point.from_json(json.loads((root / name / POINT_FILE).read_text())) for name in plan["points"]]
    return plan, points


def estimated_seconds(points: list[Point], peak_flops: float, mfu: float, num_devices: int = 1) -> float:
    """Wall time at a given MFU. MFU is measured against *hardware* FLOPs (what the trainer reports),
    so the estimate divides hardware FLOPs, not the official budget FLOPs."""
    hardware = sum(p.trained_tokens * p.hardware_flops_per_token for p in points)
    return hardware / (peak_flops * mfu * num_devices)
