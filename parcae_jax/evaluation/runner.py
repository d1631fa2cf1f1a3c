"""`eval.py`'s engine: load any checkpoint and its tokenizer, build the scorer on the mesh, run the
requested tasks, and write one JSON document (plus a printed table).

Checkpoints: a training workdir (`WORKDIR/checkpoints/<step>/`, latest step unless `step` is set), one
step folder `WORKDIR/checkpoints/<step>`, a parcae-jax pretrained folder or an official PyTorch folder
(converted on the fly). The JSON records what was evaluated: checkpoint path, kind, step and a digest
of the parameter bytes; the model config and its digest; the evaluation config; the tokenizer's
fingerprint; the bundle's fingerprint; the PRNG seed of the initial recurrent states.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import pathlib
import time
from typing import Any

import jax

from parcae_jax import sharding
from parcae_jax.evaluation import report

TASKS = ("loss", "depth_sweep", "core", "core_extended", "lambada", "sample")
FORMAT = "parcae-jax-eval-v1"


class CheckpointPathError(FileNotFoundError):
    """The checkpoint path is not something eval can load (message says what it expected)."""


@dataclasses.dataclass
class LoadedCheckpoint:
    model: Any
    kind: str  # "workdir" | "native" | "official"
    path: str
    step: int | None = None
    run_config: dict | None = None  # WORKDIR/config.json of a training run


def load_checkpoint(path: str, *, step: int | None = None, **overrides) -> LoadedCheckpoint:
    """A model from a workdir, a checkpoint step folder, or a pretrained (native/official) folder."""
    from parcae_jax import checkpointing, pretrained

    p = pathlib.Path(os.path.expanduser(str(path))).resolve()
    expected = ("a training workdir (with checkpoints/), a step folder WORKDIR/checkpoints/STEP, or a model "
                "folder with config.json (parcae-jax or official PyTorch)")
    if not p.exists():
        raise CheckpointPathError(f"checkpoint {p} does not exist; expected {expected}")
    if p.parent.name == checkpointing.CHECKPOINT_DIR and p.name.isdigit():
        if step is not None and step != int(p.name):
            raise CheckpointPathError(f"{p} is step {p.name} but step={step} was asked for")
        p, step = p.parent.parent, int(p.name)
    if (p / checkpointing.CHECKPOINT_DIR).is_dir():
        model = checkpointing.load_model_from_workdir(p, step=step, **overrides)
        if step is None:  # the step load_model_from_workdir took: the latest finished one
            import orbax.checkpoint as ocp

            manager = ocp.CheckpointManager(p / checkpointing.CHECKPOINT_DIR)
            step = manager.latest_step()
            manager.close()
        run_config = None
        if (p / "config.json").is_file():
            with open(p / "config.json") as f:
                run_config = json.load(f)
        return LoadedCheckpoint(model, "workdir", str(p), step, run_config)
    if (p / "config.json").is_file():
        kind = "native" if pretrained.is_native(p) else "official"
        return LoadedCheckpoint(pretrained.load_pretrained(p, **overrides), kind, str(p))
    raise CheckpointPathError(f"{p} is not a checkpoint: expected {expected}")


def params_digest(model) -> tuple[str, int]:
    """(sha256 over parameter names, shapes and bytes, parameter count): identifies the exact weights."""
    from parcae_jax import weights

    digest, count = hashlib.sha256(), 0
    for path, array in sorted(weights.model_arrays(model).items(), key=lambda kv: str(kv[0])):
        digest.update(f"{'/'.join(map(str, path))}:{array.shape}:{array.dtype}".encode())
        digest.update(array.tobytes())
        count += array.size
    return digest.hexdigest()[:16], count


def _run_data(ckpt: LoadedCheckpoint) -> dict:
    return (ckpt.run_config or {}).get("data", {}) or {}


def resolve_tokenizer(ckpt: LoadedCheckpoint, explicit: str | None):
    """The tokenizer: explicit path; the run's (data.tokenizer, the embedded corpus', or the one its
    shards record); one shipped in a model folder (tokenizer/, tokenizer.model or tokenizer.json).
    None when there is none."""
    from parcae_jax.data.tokenizer import load_tokenizer

    if explicit:
        return load_tokenizer(explicit)
    data = _run_data(ckpt)
    if data.get("tokenizer"):
        return load_tokenizer(data["tokenizer"])
    if data.get("source") == "shakespeare":
        from parcae_jax.data.prepare import ensure_shakespeare_dataset

        _, tok_dir = ensure_shakespeare_dataset(data.get("cache_dir", "~/.cache/parcae_jax"),
                                                int(data.get("vocab_size", 4096)), log=lambda *a: None)
        return load_tokenizer(tok_dir)
    if data.get("source") == "dir" and data.get("dataset_dir"):  # the tokenizer the shards were made with
        from parcae_jax.data import shards

        made_with = shards.load_metadata(data["dataset_dir"]).get("tokenizer", {}).get("path")
        if made_with and os.path.exists(made_with):
            return load_tokenizer(made_with)
    folder = pathlib.Path(ckpt.path)
    for candidate in (folder / "tokenizer", folder / "tokenizer.model", folder / "tokenizer.json"):
        if candidate.exists():
            return load_tokenizer(str(candidate))
    return None


def resolve_dataset_dir(ckpt: LoadedCheckpoint, explicit: str | None) -> str | None:
    if explicit:
        return explicit
    data = _run_data(ckpt)
    if data.get("source") == "dir" and data.get("dataset_dir"):
        return data["dataset_dir"]
    if data.get("source") == "shakespeare":
        from parcae_jax.data.prepare import ensure_shakespeare_dataset

        return ensure_shakespeare_dataset(data.get("cache_dir", "~/.cache/parcae_jax"),
                                          int(data.get("vocab_size", 4096)), log=lambda *a: None)[0]
    return None


def core_bos_id(kind: str, tokenizer, explicit: int = -1) -> int | None:
    """BOS of CORE prompts: `explicit` when >= 0; for an official folder the official harness's rule
    (the BOS the tokenizer declares, else id 1, even when a token named <|bos|> exists); for a
    parcae-jax checkpoint the tokenizer's BOS, the one its training rows started documents with."""
    if explicit is not None and explicit >= 0:
        if tokenizer is not None and explicit >= tokenizer.vocab_size:
            raise ValueError(f"--config.bos_id={explicit} is outside the tokenizer's vocabulary "
                             f"({tokenizer.vocab_size} ids); pick an id below it or -1 for the official rule")
        return int(explicit)
    if tokenizer is None:
        return None
    if kind == "official":
        declared = tokenizer.declared_bos_id
        return 1 if declared is None else int(declared)
    return tokenizer.bos_id


def samples_path(output: str) -> str:
    return os.path.splitext(os.path.abspath(os.path.expanduser(output)))[0] + ".samples.jsonl"


def write_samples(records: list[dict], path: str) -> str:
    from parcae_jax.data.shards import write_bytes_atomic

    write_bytes_atomic(path, "".join(json.dumps(_jsonable(r)) + "\n" for r in records).encode())
    return path


def parse_ints(text, default: list[int]) -> list[int]:
    """'1,2,4' / (1, 2, 4) / 4 -> [1, 2, 4]; '' or None -> default."""
    if text is None or text == "" or text == ():
        return default
    if isinstance(text, int):
        return [text]
    items = text.split(",") if isinstance(text, str) else list(text)
    return [int(x) for x in items if str(x).strip()]


def _jsonable(obj):
    """Plain JSON: NaN/inf become null, numpy scalars become numbers, tuples lists."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, str):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(results: dict, path: str) -> str:
    from parcae_jax.data.shards import write_bytes_atomic

    path = os.path.abspath(os.path.expanduser(path))
    write_bytes_atomic(path, json.dumps(_jsonable(results), indent=2, allow_nan=False).encode())
    return path


def _plot_path(config) -> str:
    if config.plot:
        return config.plot
    if config.output:
        return os.path.splitext(config.output)[0] + "_depth_sweep.png"
    return "depth_sweep.png"


def run(config, log=print) -> dict:
    """Evaluate `config.checkpoint` on `config.tasks`; returns (and writes to `config.output`) the results."""
    from parcae_jax.evaluation.scoring import TokenScorer

    tasks = [t for t in config.tasks if t]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise ValueError(f"unknown or no tasks {unknown or tasks}: choose from {', '.join(TASKS)}")
    if not config.checkpoint:
        raise ValueError("--config.checkpoint=PATH is required (workdir, step folder or model folder)")
    if config.log_samples and not config.output:
        raise ValueError("--config.log_samples=True writes <output stem>.samples.jsonl next to the results: "
                         "set --config.output=FILE")
    t_start = time.perf_counter()
    overrides = {"compute_dtype": config.compute_dtype} if config.compute_dtype else {}
    ckpt = load_checkpoint(config.checkpoint, step=config.step, **overrides)
    model, cfg = ckpt.model, ckpt.model.config
    looped = cfg.arch == "parcae"
    digest, num_params = params_digest(model)
    tokenizer = resolve_tokenizer(ckpt, config.tokenizer)
    needs_tokenizer = {"core", "core_extended", "lambada", "sample"} & set(tasks)
    if tokenizer is None and (needs_tokenizer or config.text):
        needed_by = sorted(needs_tokenizer) or "config.text"
        raise ValueError(f"no tokenizer found for {ckpt.path} (needed by {needed_by}); "
                         "pass --config.tokenizer=PATH")
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    max_len = min(int(config.max_seq_len) or cfg.block_size, cfg.block_size)
    pad_id = tokenizer.pad_id if tokenizer is not None and tokenizer.pad_id is not None else 0
    scorer = TokenScorer.for_model(model, max_len=max_len, batch_size=int(config.batch_size), pad_id=pad_id,
                                   mesh=mesh)
    base_key = jax.random.key(int(config.seed))
    keys = [jax.random.fold_in(base_key, i) for i in range(max(1, int(config.state_init_seeds)))]
    bos_id = core_bos_id(ckpt.kind, tokenizer, int(config.bos_id))
    samples: list[dict] | None = [] if config.log_samples else None
    r_bar = int(cfg.mean_recurrence) if looped else 0
    depths = parse_ints(config.depths, [r_bar]) if looped else [0]
    results: dict[str, Any] = {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "checkpoint": {"path": ckpt.path, "kind": ckpt.kind, "step": ckpt.step, "arch": cfg.arch,
                       "params_digest": digest, "num_params": num_params},
        "model_config": cfg.to_dict(),
        "model_config_digest": hashlib.sha256(json.dumps(_jsonable(cfg.to_dict()), sort_keys=True)
                                              .encode()).hexdigest()[:16],
        "eval_config": config.to_dict(),
        "tokenizer": None if tokenizer is None else {
            "path": tokenizer.path, "fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
            "core_bos_id": bos_id},
        "state_init": {"kind": cfg.state_init if looped else None, "seed": int(config.seed),
                       "num_seeds": len(keys), "keys": "fold_in(key(seed), i) for i < num_seeds; row noise "
                       "fold_in(that key, row uid)"},
        "devices": {"platform": jax.devices()[0].platform, "count": jax.device_count(),
                    "processes": jax.process_count(), "mesh": dict(mesh.shape)},
        "depths": depths,
        "tasks": {},
        "timing": {},
    }
    log(f"evaluating {ckpt.kind} checkpoint {ckpt.path}" + (f" (step {ckpt.step})" if ckpt.step else "")
        + f": {cfg.arch}, {num_params:,} parameters, depths {depths}, {len(keys)} state seed(s)")
    from parcae_jax.evaluation import tasks as task_runners

    for task in tasks:
        t0 = time.perf_counter()
        log(f"== {task}")
        results["tasks"][task] = task_runners.run_task(
            task, config, ckpt=ckpt, scorer=scorer, tokenizer=tokenizer, depths=depths, keys=keys,
            plot_path=_plot_path(config), bos_id=bos_id,
            on_sample=None if samples is None else samples.append, log=log)
        results["timing"][task] = round(time.perf_counter() - t0, 2)
    results["timing"]["total"] = round(time.perf_counter() - t_start, 2)
    results["compiled_programs"] = scorer.compiled_programs()
    if samples is not None:
        results["samples"] = write_samples(samples, samples_path(config.output))
    if config.output:
        results["output"] = write_json(results, config.output)
    log(report.format_results(results))
    return results
