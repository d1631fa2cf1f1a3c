"""`scaling run`: train the pending points one after another, then evaluate them for the fits.

Each point is a subprocess (`python -m parcae_jax.train`, then the depth sweep), so this process
never holds an accelerator: JAX in the orchestrator would pre-allocate GPU memory the next training
run needs. A point whose workdir already has its final checkpoint skips training; an interrupted one resumes
(training restores the workdir's latest checkpoint by itself). After training:

* the final validation losses come from the last row of `WORKDIR/metrics.jsonl`
  (`val_loss_<d>` for d in train.partial_depth_eval + [r̄]);
* the depth sweep is the evaluation package's `depth_sweep` task (`python -m parcae_jax.eval`), on
  the run's own validation set unless the sweep spec gives `batches`;
* both go into `result.json`, which marks the point done.

`--launcher inprocess` trains and evaluates in the runner's own process instead: one JAX runtime for
every point, so no per-point start-up, and programs of the same shape compile once (notebooks, and
many short runs on one CPU); a crash of a point is then a crash of the runner.

`--launcher pod` runs training through the TPU pod launcher of the repository checkout
(`bash tpu_setup/launch.sh`, given `--launcher-args "--name SLICE --zone ZONE"` and the training
arguments); the launcher returns once training runs on the workers, so the runner then polls the
shared workdir (plan with `--workdir-root gs://...`) for the final checkpoint before evaluating
from this host.
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from etils import epath

from parcae_jax import fileio
from parcae_jax.errors import ConfigError, NotFoundError
from parcae_jax.evaluation import config as eval_config
from parcae_jax.scaling import state
from parcae_jax.scaling.sweep import REPO, Point, read_plan

LAUNCHERS = ("local", "pod", "inprocess")
POD_LAUNCHER = "tpu_setup/launch.sh"
DEPTH_SWEEP_FILE = "depth_sweep.json"
LOG_FILE = "train.log"


class PointFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, log_path: pathlib.Path):
        super().__init__(f"{stage} failed with exit code {returncode}; see {log_path}")
        self.stage, self.returncode, self.log_path = stage, returncode, log_path


def _train_in_process(point: Point, log_path: pathlib.Path) -> None:
    from parcae_jax import trainer
    from parcae_jax.cli_config import load_config

    try:
        trainer.train(load_config(str(REPO / point.base_config), list(point.overrides)), point.workdir)
    except trainer.TrainingStopped as e:  # e.g. a non-finite loss: the point failed, the sweep goes on
        with open(log_path, "a") as log:
            log.write(f"training stopped: {e}\n")
        raise PointFailed("train", 1, log_path) from e


def _depth_sweep_in_process(point: Point, output: str) -> None:
    import warnings

    from parcae_jax.cli_config import load_config
    from parcae_jax.evaluation import runner as eval_runner

    argv = depth_sweep_command(point, output)[5:]  # the `--config.a=b` overrides after the config spec
    overrides = [a.removeprefix("--config.") for a in argv]
    with warnings.catch_warnings():  # as eval.py: restoring onto this process's devices is intended
        warnings.filterwarnings("ignore", message="Sharding info not provided when restoring")
        config = load_config(f"{eval_config.__file__}:depth_sweep", overrides)
        eval_runner.run(config, log=lambda *a, **k: None)


def train_command(
    point: Point, launcher: str, launcher_args: Sequence[str] = (), python: str = sys.executable
) -> list[str]:
    """local: `python -m parcae_jax.train ARGS`; pod: `bash tpu_setup/launch.sh LAUNCHER_ARGS ARGS`, where the
    launcher args name the slice (`--name N --zone Z`, see `launch.sh --help`)."""
    if launcher == "local":
        return point.command(python)
    if launcher == "pod":
        return ["bash", POD_LAUNCHER, *launcher_args, *point.train_args()]
    raise ConfigError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")


def wait_for_final_checkpoint(point: Point, poll_seconds: float, say: Callable[[str], None]) -> None:
    """The pod launcher starts train.py on the workers in the background and returns: wait until the
    (shared, gs://) workdir holds the final checkpoint. Ctrl-C stops waiting, not the pod's run."""
    while point.steps not in state.checkpoint_steps(point.workdir):
        step = state.last_logged_step(point.workdir)
        say(f"{point.name}: waiting for the pod run (step {step or 0}/{point.steps})")
        time.sleep(poll_seconds)


def depth_sweep_command(point: Point, output: str, python: str = sys.executable) -> list[str]:
    """The evaluation package's depth_sweep task (`python -m parcae_jax.eval`, with the package's own
    eval config, so an installed copy works without a checkout). Without `batches` in the sweep spec
    it scores the run's own validation set, so at the training recurrence it reproduces the trainer's
    final `val_loss`; with it, the split's first batches × batch_size rows."""
    depths = ",".join(str(d) for d in point.test_depths)
    batches = point.depth_sweep_batches
    rows = 0 if batches is None else batches * point.depth_sweep_batch_size
    return [
        python, "-m", "parcae_jax.eval", "--config", f"{eval_config.__file__}:depth_sweep",
        f"--config.checkpoint={point.workdir}", f"--config.output={output}",
        f"--config.sweep_depths={depths}", f"--config.batch_size={point.depth_sweep_batch_size}",
        f"--config.max_rows={rows}",
    ]  # fmt: skip


def read_depth_sweep(path: pathlib.Path) -> dict:
    """{"depths", "losses", "source"} (+ "fit") from eval's results document (`tasks.depth_sweep`)."""
    data = json.loads(path.read_text())
    task = data.get("tasks", {}).get("depth_sweep")
    if task is None or "losses" not in task:
        raise ValueError(f"{path}: no per-depth losses (tasks.depth_sweep)")
    out = {"depths": task["depths"], "losses": task["losses"], "source": "eval.py"}
    return out | ({"fit": task["fit"]} if task.get("fit") else {})


def final_metrics(workdir: str) -> dict:
    """The last row of WORKDIR/metrics.jsonl (the final step, with its validation losses)."""
    path = epath.Path(workdir) / "metrics.jsonl"
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} is empty")
    return json.loads(rows[-1])


def build_result(point: Point, last_row: dict, sweep: dict | None) -> dict:
    """result.json: what the fits read (no JAX needed to produce it)."""
    if last_row.get("step") != point.steps:
        raise ValueError(
            f"{point.workdir}: last metrics row is step {last_row.get('step')}, not {point.steps}"
        )
    val = {k[len("val_loss_") :]: v for k, v in last_row.items() if k.startswith("val_loss_")}
    r = point.mean_recurrence
    if not val and "val_loss" in last_row:  # a GPT: one validation loss, at its single pass
        val = {str(r): last_row["val_loss"]}
    if str(r) not in val:
        raise ValueError(f"{point.workdir}: the final metrics row has no val_loss_{r} (keys {sorted(val)})")
    return {
        "name": point.name,
        "mean_recurrence": r,
        "mean_backprop_depth": point.mean_backprop_depth,
        "flop_budget": point.flop_budget,
        "steps": point.steps,
        "tokens": int(last_row.get("tokens", point.trained_tokens)),
        "flops": last_row.get("flops"),  # trainer's cumulative count at the expected split
        "flops_per_token": point.flops_per_token,
        "params": point.params,
        "effective_params": point.params["non_core"] + r * point.params["core"],
        "train_loss": last_row.get("loss"),
        "val_loss": val[str(r)],
        "val_loss_by_depth": {d: val[d] for d in sorted(val, key=int)},
        "depth_sweep": sweep,
    }


def _run_logged(cmd: list[str], log_path: pathlib.Path, folder: pathlib.Path, stage: str) -> None:
    with open(log_path, "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {stage}: {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        info = {"pid": proc.pid, "runner_pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
                "started": time.time()}  # fmt: skip
        fileio.write_json_atomic(folder / state.RUNNING_FILE, info)
        try:
            returncode = proc.wait()
        except BaseException:  # Ctrl-C: stop the child too; train.py saves on SIGTERM
            proc.terminate()
            proc.wait()
            raise
        finally:
            (folder / state.RUNNING_FILE).unlink(missing_ok=True)
    if returncode != 0:
        raise PointFailed(stage, returncode, log_path)


def run_point(
    folder: pathlib.Path,
    point: Point,
    launcher: str,
    say: Callable[[str], None],
    launcher_args: Sequence[str] = (),
    poll_seconds: float = 60.0,
) -> dict:
    """Train (or resume, or skip) then evaluate one point; returns its result."""
    log_path = folder / LOG_FILE
    (folder / state.FAILED_FILE).unlink(missing_ok=True)
    t0 = time.perf_counter()
    if point.steps not in state.checkpoint_steps(point.workdir):
        say(f"{point.name}: training {point.steps} steps ({point.trained_tokens:,} tokens), log {log_path}")
        if launcher == "inprocess":
            _train_in_process(point, log_path)
        else:
            _run_logged(train_command(point, launcher, launcher_args), log_path, folder, "train")
        if launcher == "pod":
            wait_for_final_checkpoint(point, poll_seconds, say)
        if point.steps not in state.checkpoint_steps(point.workdir):
            raise PointFailed("train (no final checkpoint)", 0, log_path)
    train_s = time.perf_counter() - t0
    last_row = final_metrics(point.workdir)
    sweep = None
    if point.test_depths:
        output = folder / DEPTH_SWEEP_FILE
        say(f"{point.name}: depth sweep at {list(point.test_depths)}")
        t1 = time.perf_counter()
        if launcher == "inprocess":
            _depth_sweep_in_process(point, str(output))
        else:
            _run_logged(depth_sweep_command(point, str(output)), log_path, folder, "depth_sweep")
        sweep = read_depth_sweep(output) | {"seconds": time.perf_counter() - t1}
    result = build_result(point, last_row, sweep)
    result["wall_s"] = {"train": train_s, "total": time.perf_counter() - t0}
    fileio.write_json_atomic(folder / state.RESULT_FILE, result)
    return result


def run_sweep(
    root: str | os.PathLike,
    *,
    launcher: str = "local",
    launcher_args: Sequence[str] = (),
    poll_seconds: float = 60.0,
    retry_failed: bool = False,
    only: list[str] | None = None,
    dry_run: bool = False,
    say: Callable[[str], None] = print,
) -> dict[str, str]:
    """Run every pending point of the plan in order; returns {point: state after this call}."""
    root = pathlib.Path(root)
    _, points = read_plan(root)
    if only:
        unknown = set(only) - {p.name for p in points}
        if unknown:
            raise ConfigError(f"unknown points {sorted(unknown)}; the plan has {[p.name for p in points]}")
        points = [p for p in points if p.name in only]
    if launcher == "pod" and not dry_run and not (REPO / POD_LAUNCHER).exists():
        raise NotFoundError(
            f"{REPO / POD_LAUNCHER} not found: --launcher pod needs the TPU scripts of a repository "
            "checkout (tpu_setup/); run from a checkout, use --launcher local, or --dry-run to print"
        )
    outcome = {}
    for point in points:
        folder = root / point.name
        status = state.point_status(folder, point)
        if status.state in ("done", "running") or (status.state == "failed" and not retry_failed):
            say(f"{point.name}: {status.state} {status.detail}".rstrip() + ", skipped")
            outcome[point.name] = status.state
            continue
        if dry_run:
            say(shlex.join(train_command(point, launcher, launcher_args)))
            outcome[point.name] = status.state
            continue
        try:
            result = run_point(folder, point, launcher, say, launcher_args, poll_seconds)
        except (PointFailed, ValueError, OSError) as e:
            stage = getattr(e, "stage", "evaluate")
            tail = _tail(folder / LOG_FILE)
            fileio.write_json_atomic(folder / state.FAILED_FILE, {
                "stage": stage, "returncode": getattr(e, "returncode", None), "error": str(e),
                "time": time.time(), "log_tail": tail,
            })  # fmt: skip
            say(f"{point.name}: FAILED ({e})")
            outcome[point.name] = "failed"
            continue
        say(f"{point.name}: done, val loss {result['val_loss']:.4f} in {result['wall_s']['total']:.0f} s")
        outcome[point.name] = "done"
    return outcome


def _tail(path: pathlib.Path, lines: int = 20) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
