"""The training loop: data, sharded state, the compiled step, evaluation, checkpoints, metrics.

`train(run_cfg, workdir)` runs (or resumes) a whole run and returns its last logged row. Everything a
step depends on is a function of (config, step): the batch (the pipeline state is checkpointed), the
depths and initial states (drawn from `fold_in(key(seed), step)`), and the train state itself, so a
resumed run reproduces the uninterrupted one bit for bit.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any

import jax
import ml_collections
from etils import epath

from parcae_jax import checkpointing, fileio, flops, sharding, train_step
from parcae_jax.config import ModelConfig
from parcae_jax.data import pipeline, shards
from parcae_jax.errors import ConfigError
from parcae_jax.evaluation import lm_loss
from parcae_jax.evaluation.scoring import TokenScorer, graph_apply
from parcae_jax.metrics import MetricsWriter, Throughput, progress_line

log = logging.getLogger("parcae_jax")

GUARDRAILS = ("stop", "rollback", "none")
MAX_ROLLBACKS = 3


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (loss guardrail, non-finite loss); the message says why."""


@dataclasses.dataclass
class DataInfo:
    dataset_dir: str
    tokenizer_dir: str | None
    metadata: dict


def resolve_data(run_cfg: ml_collections.ConfigDict) -> DataInfo:
    """Prepare the embedded corpus on first use, or open `data.dataset_dir`; check the tokenizer."""
    data = run_cfg.data
    if data.source == "shakespeare":
        from parcae_jax.data.prepare import ensure_shakespeare_dataset

        cache = os.path.expanduser(data.cache_dir)
        dataset_dir, tokenizer_dir = ensure_shakespeare_dataset(cache, int(data.vocab_size))
    elif data.source == "dir":
        if not data.dataset_dir:
            raise ConfigError("data.source='dir' needs --config.data.dataset_dir=PATH (prepared shards)")
        dataset_dir, tokenizer_dir = data.dataset_dir, data.tokenizer
    else:
        raise ConfigError(f"data.source must be 'shakespeare' or 'dir', got {data.source!r}")
    meta = shards.load_metadata(dataset_dir)
    if data.tokenizer:
        from parcae_jax.data.tokenizer import load_tokenizer

        tok = load_tokenizer(data.tokenizer)
        shards.check_tokenizer(meta, tok.fingerprint, dataset_dir, data.tokenizer)
    vocab = int(meta["tokenizer"]["vocab_size"])
    if vocab > run_cfg.model.vocab_size:
        raise ConfigError(
            f"{dataset_dir} was tokenized with {vocab} ids but model.vocab_size={run_cfg.model.vocab_size}; "
            f"set --config.model.vocab_size={vocab} (or larger)"
        )
    return DataInfo(dataset_dir, tokenizer_dir, meta)


def _eval_depths(run_cfg) -> list[int | None]:
    model = run_cfg.model
    if model.arch != "parcae":
        return [None]
    depths = sorted({int(d) for d in run_cfg.train.partial_depth_eval} | {int(model.mean_recurrence)})
    return depths


class Evaluator:
    """Validation loss at several depths: the evaluation package's loss task (`lm_loss.rows_loss`) on
    the run's `ValidationSet`, so `eval.py` on the workdir reproduces every `val_loss_<d>`. One
    compiled program (depth traced); h0 by the one rule with the evaluation default key."""

    def __init__(self, run_cfg, setup: train_step.TrainSetup, data: DataInfo):
        self.depths = _eval_depths(run_cfg)
        block = int(run_cfg.model.block_size)
        self.validation = lm_loss.ValidationSet(
            dataset_dir=data.dataset_dir,
            block_size=block,
            packing=run_cfg.data.packing,
            batch_rows=setup.global_micro_batch,
            pack_rows=train_step.rank_rows(setup),
            max_batches=int(run_cfg.train.eval_iters),
        )
        has_val = "val" in data.metadata["splits"] and data.metadata["splits"]["val"]["tokens"] > 0
        self.rows = self.validation.rows() if has_val else []
        self.scorer = TokenScorer(graph_apply(setup.graphdef, setup.model_cfg), None, max_len=block,
                                  batch_size=setup.global_micro_batch, mesh=setup.mesh, buckets=[block])
        self.key = lm_loss.state_keys(lm_loss.VALIDATION_SEED)[0]

    def __call__(self, params) -> dict[str, float]:
        if not self.rows:
            return {}
        self.scorer.state = params  # already placed on the training mesh
        out = {}
        for depth in self.depths:
            metrics = lm_loss.rows_loss(self.scorer, self.rows, None, depth=depth or 0, key=self.key)
            out["val_loss" if depth is None else f"val_loss_{depth}"] = metrics["val_loss"]
        return out


def _run_meta(run_cfg, setup, step: int, counters: dict, validation) -> dict:
    return {
        "format": "parcae-jax-train-checkpoint",
        "step": step,
        "model": setup.model_cfg.to_dict(),
        "config": run_cfg.to_dict(),
        "seed": int(run_cfg.train.seed),
        "validation": validation.to_dict(),  # the rows val_loss is computed on (eval.py rebuilds them)
        **counters,
    }


def check_run_config(run_cfg: ml_collections.ConfigDict) -> tuple[flops.Budget, int]:
    """Validate the model fields and the training choices; returns (budget, steps this run takes).
    Raises ConfigError, so the entry point can print one line."""
    train_cfg = run_cfg.train
    choices = (("train.loss_guardrail", train_cfg.loss_guardrail, GUARDRAILS),
               ("train.loss_normalization", train_cfg.loss_normalization, train_step.LOSS_NORMALIZATIONS),
               ("train.tokens_per_param_counts", train_cfg.tokens_per_param_counts, flops.PARAM_COUNT_BASES),
               ("data.packing", run_cfg.data.packing, pipeline.PACKINGS))
    for name, value, allowed in choices:
        if value not in allowed:
            raise ConfigError(f"{name}={value!r} is not one of {allowed}; set --config.{name}=...")
    for name in ("loss_chunk_len", "depth_groups"):
        if int(train_cfg[name]) < 0:
            raise ConfigError(f"train.{name}={train_cfg[name]} is negative; use 0 to turn it off")
    try:
        ModelConfig.from_dict(run_cfg.model.to_dict())
        budget = flops.training_budget(run_cfg)
    except (ValueError, KeyError) as e:
        raise ConfigError(str(e).strip('"')) from None
    # The official trainer stops once τ_opt >= max_steps - 1 (spec §7.5); the schedules span max_steps.
    last_step = budget.steps - 1 if train_cfg.stop_before_last_step else budget.steps
    if last_step < 1:
        raise ConfigError(
            f"the budget gives max_steps={budget.steps}, and the official rule (train.stop_before_last_step) "
            "runs max_steps - 1 of them: raise the budget or set --config.train.stop_before_last_step=False"
        )
    return budget, last_step


def train(run_cfg: ml_collections.ConfigDict, workdir: str, *, stop_after_steps: int | None = None) -> dict:
    """Train (or resume) the run in `workdir`; returns the last logged metrics row.

    `stop_after_steps` ends the process early (tests, benchmarks) without changing the schedule.
    """
    train_cfg = run_cfg.train
    # Everything that can be checked is checked before anything is created or compiled.
    budget, last_step = check_run_config(run_cfg)
    max_steps = budget.steps
    data = resolve_data(run_cfg)
    _make_workdir(workdir)

    mesh = sharding.make_mesh(run_cfg.mesh.data, run_cfg.mesh.fsdp, run_cfg.mesh.tensor)
    setup, state = train_step.create_train_state(run_cfg, mesh, max_steps)
    cfg = setup.model_cfg
    log.info("mesh %s, %d process(es); accumulation %d x global micro-batch %d",
             dict(mesh.shape), jax.process_count(), setup.accum, setup.global_micro_batch)
    log.info("stop: %s -> max_steps %d (running %d), %.3g tokens, %.3g FLOPs (%d FLOPs/token, official "
             "formula)", budget.criterion, max_steps, last_step, budget.tokens, budget.total_flops,
             budget.flops_per_token)

    checkpointer = checkpointing.Checkpointer(
        workdir, keep_last=int(train_cfg.keep_last), keep_period=train_cfg.keep_period
    )
    start = checkpointer.latest_intact_step(move_aside=True)
    if start is not None:  # fail on an incompatible checkpoint before spending time compiling
        where = f"{checkpointer.directory}/{start}"
        checkpointing.check_compatible(checkpointer.read_meta(start), cfg, where)

    step_fn = train_step.make_train_step(setup, train_cfg)
    t0 = time.perf_counter()
    compiled, memory = train_step.compile_train_step(step_fn, state, setup, cfg.block_size)
    log.info("train step compiled in %.1f s; memory: %s", time.perf_counter() - t0, _memory_summary(memory))

    counters = {"tokens": 0, "real_tokens": 0, "flops": 0, "rollbacks": 0}
    data_state = None
    if start is not None:
        state, data_state, meta = checkpointer.restore(start, train_step.abstract_state(state), cfg)
        counters.update({k: meta[k] for k in counters if k in meta})
        log.info("resumed from %s/%d", checkpointer.directory, start)
    else:
        start = 0
        if jax.process_index() == 0:
            config_path = shards.join(str(workdir), "config.json")
            fileio.write_json_atomic(config_path, fileio.to_jsonable(run_cfg.to_dict()))

    batches = pipeline.train_iterator(
        data.dataset_dir,
        block_size=cfg.block_size,
        world_batch=int(train_cfg.world_batch_size),
        accum=setup.accum,
        seed=int(train_cfg.seed),
        packing=run_cfg.data.packing,
        num_workers=int(run_cfg.data.num_workers),
        prefetch=int(run_cfg.data.prefetch),
        pack_rows=train_step.rank_rows(setup),
    )
    if data_state:
        batches.set_state(data_state)
    evaluator = Evaluator(run_cfg, setup, data)
    writer = MetricsWriter(
        workdir,
        resume_step=start,
        wandb_cfg=dict(project=train_cfg.wandb_project, dir=workdir) if train_cfg.wandb else None,
        config=run_cfg.to_dict(),
    )
    preempted = checkpointing.PreemptionFlag()
    key = jax.random.key(int(train_cfg.seed))
    tokens_per_step = budget.tokens_per_step
    t_hw, s_hw = flops.expected_split(cfg)
    throughput = Throughput(
        flops.hardware_flops_per_token(cfg, f=t_hw + s_hw, b=s_hw) if cfg.arch == "parcae"
        else flops.hardware_flops_per_token(cfg),
        flops.peak_flops_per_device(),
        jax.device_count(),
    )
    run_t0 = time.perf_counter()
    last_row: dict[str, Any] = {}
    end = last_step if stop_after_steps is None else min(last_step, stop_after_steps)
    pending_real = []  # per-step real-token counts (device scalars), summed when a row is logged

    def save(step):
        writer.flush()  # rows up to a checkpoint must be stored before it: a resume starts there
        checkpointer.save(step, state, batches.get_state(), _run_meta(run_cfg, setup, step, counters,
                                                                                evaluator.validation))

    step = start
    try:
        while step < end:
            local = next(batches)
            batch = pipeline.global_batch(local, setup.batch_sharding)
            state, metrics = compiled(state, batch, key)
            step += 1
            checkpointer.check_for_errors()  # a failed save stops the run now, not at the next save
            pending_real.append(metrics["target_tokens"])
            counters["tokens"] += tokens_per_step
            counters["flops"] += tokens_per_step * flops.training_flops_per_token(cfg, step)
            throughput.add(tokens_per_step)
            is_last = step == end
            do_eval = step % int(train_cfg.eval_every) == 0 or is_last
            if step % int(train_cfg.log_every) == 0 or do_eval or is_last:
                row = {k: float(v) for k, v in jax.device_get(metrics).items()}
                counters["real_tokens"] += sum(int(x) for x in jax.device_get(pending_real))
                pending_real.clear()
                tokens_per_s, mfu, _ = throughput.rates()
                throughput.reset()
                elapsed = time.perf_counter() - run_t0
                row.update(
                    step=step,
                    tokens=counters["tokens"],
                    real_tokens=counters["real_tokens"],
                    flops=counters["flops"],
                    tokens_per_s=tokens_per_s,
                    mfu=mfu,
                    padding_fraction=float(getattr(batches, "padding_fraction", 0.0)),
                    eta_s=elapsed / max(step - start, 1) * (end - step),
                )
                verdict = _guardrail(row, counters, train_cfg)
                if do_eval:
                    row.update(evaluator(state["params"]))
                writer.write(row)
                if jax.process_index() == 0:
                    log.info(progress_line(row, last_step))
                last_row = row
                if verdict == "stop":
                    raise TrainingStopped(
                        f"loss guardrail: loss {row['loss']:.3f} at step {step} "
                        f"(limit {train_cfg.guardrail_loss} after {train_cfg.guardrail_after_tokens} tokens, "
                        "or non-finite); lower the learning rate or use train.loss_guardrail=rollback"
                    )
                if verdict == "rollback":
                    state, step = _rollback(checkpointer, state, setup, counters, step)
                    continue
            if step % int(train_cfg.checkpoint_every) == 0 or is_last:
                save(step)
            if checkpointing.any_process(preempted.is_set()):
                save(step)
                log.warning("preempted: checkpoint at step %d written; rerun the command to resume", step)
                break
    finally:
        batches.close()
        checkpointer.close()
        writer.close()
        preempted.restore_handlers()
    return last_row


def _make_workdir(workdir: str) -> None:
    """Create the workdir (local or gs://) and prove it writable before anything is compiled."""
    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write_test_{jax.process_index()}"
    probe.write_text("")
    probe.unlink()


def _guardrail(row: dict, counters: dict, train_cfg) -> str | None:
    """'stop' / 'rollback' when the loss is non-finite or above the limit late in training."""
    if train_cfg.loss_guardrail == "none" and math.isfinite(row["loss"]):
        return None
    bad = not math.isfinite(row["loss"]) or (
        counters["tokens"] > train_cfg.guardrail_after_tokens and row["loss"] > train_cfg.guardrail_loss
    )
    if not bad:
        return None
    if train_cfg.loss_guardrail == "rollback" and counters["rollbacks"] < MAX_ROLLBACKS:
        return "rollback"
    return "stop"


def _rollback(checkpointer, state, setup, counters, step):
    """Restore the last checkpoint's train state but keep the data position (skip the bad batches)."""
    last = checkpointer.latest_step()
    if last is None:
        raise TrainingStopped(f"loss guardrail at step {step} and no checkpoint to roll back to")
    checkpointer.wait()
    state, _, _ = checkpointer.restore(last, train_step.abstract_state(state), setup.model_cfg)
    counters["rollbacks"] += 1
    log.warning("loss guardrail: rolled back from step %d to checkpoint %d (rollback %d of %d)",
                step, last, counters["rollbacks"], MAX_ROLLBACKS)
    return state, last


def _memory_summary(memory) -> str:
    if memory is None:
        return "n/a"
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
    parts = [f"{f.replace('_size_in_bytes', '')} {getattr(memory, f, 0) / 2**20:.1f} MiB"
             for f in fields if hasattr(memory, f)]
    return ", ".join(parts) + " per device"
