"""`eval.py`'s engine: load any checkpoint and its tokenizer, build the scorer on the mesh, run the
requested tasks, and write one JSON document (plus a printed table).

Checkpoints: anything `parcae_jax.loading.load_model` takes (a training workdir, one of its step
folders, a parcae-jax pretrained folder or an official PyTorch folder). The JSON records what was
evaluated: checkpoint path, kind, step and a digest of the parameter bytes; the model config and its
digest; the evaluation config; the tokenizer's fingerprint; the bundle's fingerprint; the PRNG seed of
the initial recurrent states.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from typing import Any

import jax

from parcae_jax import fileio, loading, sharding
from parcae_jax.errors import ConfigError
from parcae_jax.evaluation import report
from parcae_jax.evaluation.tasks import TASKS, parse_ints, run_task

FORMAT = "parcae-jax-eval-v1"


def params_digest(model) -> tuple[str, int]:
    """(sha256 over parameter names, shapes and bytes, parameter count): identifies the exact weights."""
    from parcae_jax import weights

    digest, count = hashlib.sha256(), 0
    for path, array in sorted(weights.model_arrays(model).items(), key=lambda kv: str(kv[0])):
        digest.update(f"{'/'.join(map(str, path))}:{array.shape}:{array.dtype}".encode())
        digest.update(array.tobytes())
        count += array.size
    return digest.hexdigest()[:16], count


def core_bos_id(kind: str, tokenizer, explicit: int = -1) -> int | None:
    """BOS of CORE prompts: `explicit` when >= 0; for an official folder the official harness's rule
    (the BOS the tokenizer declares, else id 1, even when a token named <|bos|> exists); for a
    parcae-jax checkpoint the tokenizer's BOS, the one its training rows started documents with."""
    if explicit is not None and explicit >= 0:
        if tokenizer is not None and explicit >= tokenizer.vocab_size:
            raise ConfigError(f"--config.bos_id={explicit} is outside the tokenizer's vocabulary "
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
    lines = "".join(json.dumps(fileio.to_jsonable(r)) + "\n" for r in records)
    fileio.write_bytes_atomic(path, lines.encode())
    return path


def write_json(results: dict, path: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    fileio.write_json_atomic(path, fileio.to_jsonable(results), allow_nan=False)
    return path


def _plot_path(config) -> str:
    if config.plot:
        return config.plot
    if config.output:
        return os.path.splitext(config.output)[0] + "_depth_sweep.png"
    return "depth_sweep.png"


def run(config, log=print) -> dict:
    """Evaluate `config.checkpoint` on `config.tasks`; returns (and writes to `config.output`) the results."""
    from parcae_jax.data.tokenizer import load_tokenizer
    from parcae_jax.evaluation import lm_loss
    from parcae_jax.evaluation.scoring import TokenScorer

    tasks = [t for t in config.tasks if t]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise ConfigError(f"unknown or no tasks {unknown or tasks}: choose from {', '.join(TASKS)}")
    if not config.checkpoint:
        raise ConfigError("--config.checkpoint=PATH is required (workdir, step folder or model folder)")
    if config.log_samples and not config.output:
        raise ConfigError("--config.log_samples=True writes <output stem>.samples.jsonl next to the results: "
                         "set --config.output=FILE")
    t_start = time.perf_counter()
    overrides = {"compute_dtype": config.compute_dtype} if config.compute_dtype else {}
    ckpt = loading.load_model(config.checkpoint, step=config.step, **overrides)
    model, cfg = ckpt.model, ckpt.model.config
    looped = cfg.arch == "parcae"
    digest, num_params = params_digest(model)
    tok_path = loading.find_tokenizer(ckpt, config.tokenizer)
    tokenizer = None if tok_path is None else load_tokenizer(tok_path)
    needs_tokenizer = {"core", "core_extended", "lambada", "sample"} & set(tasks)
    if tokenizer is None and (needs_tokenizer or config.text):
        needed_by = sorted(needs_tokenizer) or "config.text"
        raise ConfigError(f"no tokenizer found for {ckpt.path} (needed by {needed_by}); "
                         "pass --config.tokenizer=PATH")
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    max_len = min(int(config.max_seq_len) or cfg.block_size, cfg.block_size)
    pad_id = tokenizer.pad_id if tokenizer is not None and tokenizer.pad_id is not None else 0
    scorer = TokenScorer.for_model(model, max_len=max_len, batch_size=int(config.batch_size), pad_id=pad_id,
                                   mesh=mesh)
    keys = lm_loss.state_keys(int(config.seed), int(config.state_init_seeds))
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
        "model_config_digest": hashlib.sha256(json.dumps(fileio.to_jsonable(cfg.to_dict()), sort_keys=True)
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
    for task in tasks:
        t0 = time.perf_counter()
        log(f"== {task}")
        results["tasks"][task] = run_task(
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
