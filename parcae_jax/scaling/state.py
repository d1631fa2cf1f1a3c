"""Where each point of a sweep stands: done / running / pending / failed, read from its folder.

Files the runner keeps next to `point.json` (all small JSON, written atomically):

    running.json   {"pid", "host", "started"}: a runner is training or evaluating this point
    failed.json    {"returncode", "stage", "log_tail", ...}: the last attempt failed (cleared on retry)
    result.json    final losses and the depth sweep: the point is finished

A point is **done** when its workdir holds a finished checkpoint at the budget's step count and a
`result.json`; **running** while the process in `running.json` is alive on this host; **failed**
after a failed attempt; otherwise **pending** (with the step a resumed run would start from).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import socket

from etils import epath

from parcae_jax.scaling.sweep import Point

RUNNING_FILE = "running.json"
FAILED_FILE = "failed.json"
RESULT_FILE = "result.json"
STATES = ("done", "running", "pending", "failed")


def read_json(path: str | os.PathLike) -> dict | None:
    path = pathlib.Path(path)
    if not path.exists():
        return None
    return json.loads(path.read_text())


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps of the finished checkpoints in `workdir` (local or gs://), without starting JAX/Orbax.

    Orbax writes a checkpoint into a temporary folder and renames it to the bare step number when
    every host has finished, then the step folder holds `_CHECKPOINT_METADATA`.
    """
    directory = epath.Path(workdir) / "checkpoints"
    try:
        if not directory.exists():
            return []
        entries = list(directory.iterdir())
    except OSError:
        return []
    steps = []
    for entry in entries:
        if entry.name.isdigit() and (entry / "_CHECKPOINT_METADATA").exists():
            steps.append(int(entry.name))
    return sorted(steps)


def last_logged_step(workdir: str) -> int | None:
    """The step of the last row of WORKDIR/metrics.jsonl (progress of a running point)."""
    path = epath.Path(workdir) / "metrics.jsonl"
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        return int(json.loads(lines[-1])["step"]) if lines else None
    except (OSError, ValueError, KeyError):  # absent, or a line cut mid-write
        return None


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def running_here(info: dict | None) -> bool:
    """True if `running.json` names a live process on this host. A process on another host cannot be
    checked from here: it counts as running (a lock left by a crashed host must be removed by hand)."""
    if not info:
        return False
    if info.get("host") != socket.gethostname():
        return True
    return process_alive(int(info["pid"]))


@dataclasses.dataclass(frozen=True)
class PointStatus:
    name: str
    state: str  # one of STATES
    detail: str  # e.g. "resume@100", "eval only", "train rc=1"
    last_step: int | None  # latest finished checkpoint
    val_loss: float | None  # final validation loss at the training recurrence (done points)


def point_status(folder: str | os.PathLike, point: Point) -> PointStatus:
    folder = pathlib.Path(folder)
    steps = checkpoint_steps(point.workdir)
    last = steps[-1] if steps else None
    final = point.steps in steps
    result = read_json(folder / RESULT_FILE)
    if final and result is not None:
        return PointStatus(point.name, "done", "", last, result.get("val_loss"))
    if running_here(read_json(folder / RUNNING_FILE)):
        step = last_logged_step(point.workdir) or last or 0
        return PointStatus(point.name, "running", f"step {step}/{point.steps}", last, None)
    failed = read_json(folder / FAILED_FILE)
    if failed is not None:
        return PointStatus(
            point.name, "failed", f"{failed.get('stage', '?')} rc={failed.get('returncode')}", last, None
        )
    if final:
        detail = "eval only"
    elif last is not None:
        detail = f"resume@{last}"
    else:
        detail = ""
    return PointStatus(point.name, "pending", detail, last, None)
