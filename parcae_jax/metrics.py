"""Run metrics: the progress line, `WORKDIR/metrics.jsonl`, TensorBoard events, optional W&B.

Only process 0 writes (every process computes the same global scalars). On local disk `metrics.jsonl`
is appended line by line and flushed, so a killed run keeps everything it logged. Object stores
(gs://) cannot append: there the file is rewritten whole, at most every UPLOAD_EVERY_S seconds and
on `flush` (the trainer flushes before each checkpoint) and `close`, so a long run makes few uploads
and a killed one loses only rows after its last checkpoint, which a resume drops anyway. A resumed
run drops lines of steps after the checkpoint it restarted from, so the file never holds two
histories.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import jax
import numpy as np

from parcae_jax import fileio
from parcae_jax.data import shards

log = logging.getLogger("parcae_jax")

METRICS_FILE = "metrics.jsonl"
UPLOAD_EVERY_S = 60.0


def to_python(value: Any) -> Any:
    if isinstance(value, jax.Array | np.ndarray | np.generic):
        value = np.asarray(value)
        return value.item() if value.size == 1 else value.tolist()
    return value


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_line(row: dict[str, Any], max_steps: int) -> str:
    """step, loss, throughput, MFU, ETA, depths and Parcae telemetry in one line."""
    parts = [f"step {row['step']:>6}/{max_steps}", f"loss {row['loss']:.4f}"]
    for key in sorted(k for k in row if k.startswith("val_loss")):
        parts.append(f"{key} {row[key]:.4f}")
    parts.append(f"{row.get('tokens_per_s', 0):,.0f} tok/s")
    if "target_tokens" in row:  # real (non-pad) label tokens of this step, and the padding share so far
        pad = row.get("padding_fraction", 0.0) * 100
        parts.append(f"real {row['target_tokens']:,.0f} tok (pad {pad:.1f}%)")
    mfu = row.get("mfu")
    parts.append(f"MFU {mfu * 100:.1f}%" if mfu is not None else "MFU n/a")
    parts.append(f"lr {row.get('lr', 0):.2e}")
    parts.append(f"|g| {row.get('grad_norm', 0):.3f}")
    if "num_steps_no_grad" in row:
        parts.append(f"depth {row['num_steps_no_grad'] + row['num_steps_with_grad']:.1f}"
                     f" (bptt {row['num_steps_with_grad']:.1f})")
    if "rho_A" in row:
        parts.append(f"ρ(A) {row['rho_A']:.3f}")
    if "state_norm" in row:
        parts.append(f"|h| {row['state_norm']:.2f}")
    if "rel_residual" in row:
        parts.append(f"Δh/h {row['rel_residual']:.3f}")
    if row.get("skipped_nonfinite_steps"):
        parts.append(f"skipped {row['skipped_nonfinite_steps']}")
    parts.append(f"ETA {format_duration(row.get('eta_s', float('nan')))}")
    return " | ".join(parts)


class MetricsWriter:
    def __init__(self, workdir: str, *, resume_step: int = 0, wandb_cfg: dict | None = None, config=None):
        self.enabled = jax.process_index() == 0
        self.path = shards.join(str(workdir), METRICS_FILE)
        self.remote = fileio.is_remote(workdir)
        self._tb = None
        self._wandb = None
        if not self.enabled:
            return
        self._lines = self._lines_up_to(resume_step)
        self._write_all()
        self._file = None if self.remote else open(self.path, "a")
        try:
            from tensorboardX import SummaryWriter

            # tensorboardX writes gs:// itself only with extra packages: remote runs log events locally.
            local_tb = os.path.expanduser("~/.cache/parcae_jax/tensorboard")
            tb_dir = os.path.join(workdir, "tensorboard")
            if self.remote:
                tb_dir = os.path.join(local_tb, str(workdir).rstrip("/").rpartition("/")[2])
            self._tb = SummaryWriter(tb_dir)
        except ImportError:  # tensorboardX is a core dependency, but keep running without it
            log.warning("tensorboardX not installed: no TensorBoard events")
        if wandb_cfg:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("train.wandb=True needs `pip install wandb`") from e
            self._wandb = wandb.init(**wandb_cfg, config=config, resume="allow")

    def _lines_up_to(self, step: int) -> list[str]:
        """Existing lines of steps <= `step` (a resumed run drops the killed run's later lines)."""
        if not fileio.exists(self.path):
            return []
        keep = []
        for line in fileio.read_bytes(self.path).decode().splitlines(keepends=True):
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:  # a line cut by a kill
                continue
        return keep

    def _write_all(self) -> None:
        fileio.write_bytes_atomic(self.path, "".join(self._lines).encode())
        self._uploaded = len(self._lines)
        self._last_upload = time.monotonic()

    def flush(self) -> None:
        """Object stores: upload the rows not uploaded yet (local files are flushed on every write)."""
        if self.enabled and self.remote and self._uploaded < len(self._lines):
            self._write_all()

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {k: to_python(v) for k, v in row.items()}
        line = json.dumps(row) + "\n"
        if self.remote:
            self._lines.append(line)
            if time.monotonic() - self._last_upload >= UPLOAD_EVERY_S:
                self._write_all()
        else:
            self._file.write(line)
            self._file.flush()
        step = row["step"]
        scalars = {k: v for k, v in row.items() if isinstance(v, int | float) and k != "step"}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.flush()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    text = fileio.read_bytes(shards.join(str(workdir), METRICS_FILE)).decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class Throughput:
    """Tokens/s and MFU over the last log interval (wall clock, after blocking on the step)."""

    def __init__(self, flops_per_token: float, peak_flops: float | None, num_devices: int):
        self.flops_per_token = flops_per_token
        self.peak = peak_flops * num_devices if peak_flops else None
        self._t = time.perf_counter()
        self._tokens = 0

    def reset(self) -> None:
        self._t = time.perf_counter()
        self._tokens = 0

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def rates(self) -> tuple[float, float | None, float]:
        elapsed = max(time.perf_counter() - self._t, 1e-9)
        tokens_per_s = self._tokens / elapsed
        mfu = tokens_per_s * self.flops_per_token / self.peak if self.peak else None
        return tokens_per_s, mfu, elapsed
