"""What every claim shares: the scales, one training run as a scaling-runner point, running a claim's
runs (resumable), reading their metrics, and writing the claim's results.

A claim's runs live under `ROOT/<run>/` exactly as the points of an isoFLOP sweep do (`point.json`,
`command.sh`, the training workdir, `result.json` once done), with `ROOT/sweep.json` naming them, so
`python -m parcae_jax.scaling status --root ROOT` works on a claim too. Re-running the claim's command
skips the finished runs and resumes an interrupted one from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
from collections.abc import Callable, Sequence

import ml_collections

from parcae_jax import fileio
from parcae_jax.errors import ConfigError, UserError
from parcae_jax.scaling import runner, state, sweep

SCALES = ("micro", "cpu", "gpu", "tpu")
BASE = "configs/tiny.py"
RESULTS_FILE = "results.json"

# A narrow Parcae with one layer per stage (the released configs' P = R = C shape at width 64); the
# shakespeare corpus at the tiny config's 4096-piece tokenizer.
CPU_MODEL = (
    "model.n_embd=64",
    "model.num_attention_heads=2",
    "model.num_key_value_heads=2",
    "model.intermediate_size=256",
    "model.recurrent_embedding_dimension=64",
    "model.recurrent_intermediation_embedding_dimension=256",
    "model.n_layers_in_prelude=1",
    "model.n_layers_in_recurrent_block=1",
    "model.n_layers_in_coda=1",
    "model.block_size=128",
)
# The smallest model that still has every part; for checking a claim's plumbing in about a minute.
MICRO_MODEL = (
    "model.n_embd=32",
    "model.num_attention_heads=2",
    "model.num_key_value_heads=2",
    "model.intermediate_size=64",
    "model.recurrent_embedding_dimension=32",
    "model.recurrent_intermediation_embedding_dimension=64",
    "model.n_layers_in_prelude=1",
    "model.n_layers_in_recurrent_block=1",
    "model.n_layers_in_coda=1",
    "model.block_size=32",
)
# gpu/tpu: the released 140M shapes (d 768, 6 heads, P = R = C = 2) in their recipe's bf16, on
# prepared FineWeb-Edu shards.
ACCELERATOR_BASE = "configs/parcae_140m.py"


@dataclasses.dataclass(frozen=True)
class Scale:
    """A claim's scale as overrides: the model shape (empty: the base's own), the batch and the
    evaluation/checkpoint cadence, and the stop criterion."""

    base: str
    shape: tuple[str, ...]
    train: tuple[str, ...]
    stop: tuple[str, ...]


def scale_setup(scale: str, spec: dict) -> Scale:
    """`spec` holds the batch (`batch` sequences per step) and the length: `steps` (micro, cpu) or
    `tokens` (gpu, tpu). Validation runs once, at the end, unless a claim asks for a curve; checkpoints
    come three times per run so an interrupted run resumes close to where it stopped."""
    if scale not in SCALES:
        raise ConfigError(f"--scale must be one of {SCALES}, got {scale!r}")
    batch = int(spec["batch"])
    if scale in ("gpu", "tpu"):
        steps = int(spec["tokens"]) // (batch * 2048)
        base, shape = ACCELERATOR_BASE, ()
        train = (f"train.world_batch_size={batch}", f"train.micro_batch_size={min(batch, 32)}")
        stop = (f"train.max_tokens={int(spec['tokens'])}",)
    else:
        steps = int(spec["steps"])
        micro = scale == "micro"
        base, shape = BASE, MICRO_MODEL if micro else CPU_MODEL
        train = (
            f"train.world_batch_size={batch}",
            f"train.micro_batch_size={1 if micro else batch}",
            f"train.eval_iters={2 if micro else 8}",
        )
        stop = (f"train.max_steps={steps}",)
    cadence = (
        f"train.eval_every={10**9}",
        f"train.checkpoint_every={10**9 if scale == 'micro' else max(1, steps // 3)}",
        f"train.log_every={1 if steps < 1000 else 10}",
    )
    return Scale(base, shape, (*train, *cadence), stop)


def recipe_rates(base: str) -> dict[str, float]:
    """The AdamW and Muon learning rates of a base config (what the claims scale)."""
    from parcae_jax.cli_config import load_config

    cfg = load_config(str(sweep.REPO / base))
    return {"lr": float(cfg.train.lr), "muon_lr": float(cfg.train.muon_lr)}


class ClaimIncomplete(UserError):
    """Some of a claim's runs failed for a reason the claim does not measure."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of a claim: a base config and its overrides (plus the depth sweep after it)."""

    name: str
    overrides: tuple[str, ...]
    base: str = BASE
    test_depths: tuple[int, ...] = ()
    depth_sweep_batches: int | None = None
    depth_sweep_batch_size: int = 8
    flop_budget: float | None = None


def data_overrides(data_dir: str | None, vocab_size: int | None = None) -> tuple[str, ...]:
    """Where the tokens come from: a prepared dataset when given (its vocabulary sizes the model),
    else the base config's own source (the embedded corpus for the CPU base)."""
    if data_dir is None:
        return ()
    out = ("data.source=dir", f"data.dataset_dir={os.path.abspath(data_dir)}")
    if vocab_size is not None:
        out += (f"model.vocab_size={vocab_size}", f"data.vocab_size={vocab_size}")
    return out


def dataset_vocab(data_dir: str | None) -> int | None:
    """The tokenizer size a prepared dataset was made with (its metadata), or None for the corpus."""
    if data_dir is None:
        return None
    meta = pathlib.Path(data_dir) / "metadata.json"
    if not meta.exists():
        raise ConfigError(f"{meta} not found: --data-dir must be a prepared dataset folder")
    return int(json.loads(meta.read_text())["tokenizer"]["vocab_size"])


def plan(claim: str, scale: str, root: str | os.PathLike, runs: Sequence[Run]) -> list[sweep.Point]:
    """Lay the runs out under `root` as scaling-runner points (refusing to change a started one)."""
    points = [
        sweep.make_point(
            r.name,
            r.base,
            list(r.overrides),
            root,
            flop_budget=r.flop_budget,
            test_depths=r.test_depths,
            depth_sweep_batches=r.depth_sweep_batches,
            depth_sweep_batch_size=r.depth_sweep_batch_size,
        )
        for r in runs
    ]
    spec = ml_collections.ConfigDict({"name": f"{claim}-{scale}", "claim": claim, "scale": scale})
    sweep.write_plan(spec, f"parcae_jax.experiments {claim}", root, points)
    return points


def execute(root: str | os.PathLike, launcher: str, say: Callable[[str], None]) -> dict[str, str]:
    """Train and evaluate every pending run (the scaling runner: resumes, skips finished ones)."""
    return runner.run_sweep(root, launcher=launcher, say=say)


def read_rows(workdir: str) -> list[dict]:
    """Every row of WORKDIR/metrics.jsonl (a line cut by a crash is skipped)."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def run_outcome(root: str | os.PathLike, point: sweep.Point) -> dict:
    """{"state", "result" (result.json or None), "rows" (metrics), "error"} for one run."""
    folder = pathlib.Path(root) / point.name
    status = state.point_status(folder, point)
    failed = state.read_json(folder / state.FAILED_FILE)
    return {
        "state": status.state,
        "result": state.read_json(folder / state.RESULT_FILE),
        "rows": read_rows(point.workdir),
        "error": None if failed is None else failed.get("error"),
        "log_tail": None if failed is None else failed.get("log_tail"),
    }


def finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def environment(scale: str, seconds: float, command: str) -> dict:
    """Where and how the results were produced."""
    import jax

    return {
        "scale": scale,
        "command": command,
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {jax.devices()[0].device_kind}",
        "jax": jax.__version__,
        "wall_seconds": round(seconds, 1),
    }


def train_seconds(outcomes: dict[str, dict]) -> float:
    """Summed wall time of the runs' own training and evaluation (from their result.json)."""
    return sum(
        o["result"]["wall_s"]["total"] for o in outcomes.values() if o["result"] and "wall_s" in o["result"]
    )


def write_results(out: str | os.PathLike, results: dict) -> pathlib.Path:
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILE
    fileio.write_json_atomic(path, fileio.to_jsonable(results))
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: pathlib.Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path.name
