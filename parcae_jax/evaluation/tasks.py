"""The `eval.py` task registry: one function per task, each returning the task's JSON section (see
`runner.run`).

`configs/eval.py` reads `TASKS` to check the task list, and a config file should load without JAX:
so this module imports nothing that imports JAX, and each task imports its implementation when it
runs.
"""

from __future__ import annotations

from parcae_jax.errors import ConfigError
from parcae_jax.evaluation import bundle as bundles

DEFAULT_SHARD_ROWS = 256  # `max_rows=0` on anything but a workdir's own validation set


def parse_ints(text, default: list[int]) -> list[int]:
    """'1,2,4' / (1, 2, 4) / 4 -> [1, 2, 4]; '' or None -> default."""
    if text is None or text == "" or text == ():
        return default
    if isinstance(text, int):
        return [text]
    items = text.split(",") if isinstance(text, str) else list(text)
    return [int(x) for x in items if str(x).strip()]


def loss_rows(config, ckpt, tokenizer, max_len: int):
    """(rows, source description) for `loss` and `depth_sweep`: raw text if `config.text`, else shards."""
    from parcae_jax import loading
    from parcae_jax.evaluation.lm_loss import ValidationSet, document_rows, shard_rows

    if config.text:
        rows = document_rows(config.text, tokenizer, block_size=max_len,
                             max_documents=int(config.max_documents))
        return rows, {"text": config.text, "documents": len(rows), "rule": "one document per row"}
    if not config.dataset_dir and int(config.max_rows) == 0 and ckpt.validation:
        # A workdir's own validation set: the rows (and so the numbers) of the trainer's val_loss_<d>.
        validation = ValidationSet.from_dict(ckpt.validation)
        rows = validation.rows()
        return rows, {**validation.to_dict(), "rows": len(rows), "rule": "the training run's validation set"}
    dataset_dir = config.dataset_dir or loading.find_dataset(ckpt.run_config)
    if dataset_dir is None:
        raise ConfigError("the loss tasks need held-out data: --config.dataset_dir=PREPARED_SHARDS or "
                         "--config.text=parquet:GLOB|jsonl:GLOB")
    if tokenizer is not None:
        from parcae_jax.data import shards

        shards.check_tokenizer(shards.load_metadata(dataset_dir), tokenizer.fingerprint, dataset_dir,
                               tokenizer.path)
    max_rows = int(config.max_rows) or DEFAULT_SHARD_ROWS
    rows = shard_rows(dataset_dir, split=config.split, block_size=max_len, max_rows=max_rows)
    return rows, {"dataset_dir": dataset_dir, "split": config.split, "rows": len(rows), "block_size": max_len}


def _byte_lengths(tokenizer):
    return None if tokenizer is None else tokenizer.token_byte_lengths()


def _bundle(config) -> bundles.Bundle:
    path = config.bundle_dir or bundles.DEFAULT_BUNDLE_DIR
    if config.download_bundle:
        bundles.download_bundle(path)
    return bundles.Bundle(path)


def _loss(task, config, *, ckpt, scorer, tokenizer, depths, keys, log, **_) -> dict:
    from parcae_jax.evaluation.lm_loss import evaluate_loss

    rows, source = loss_rows(config, ckpt, tokenizer, scorer.max_len)
    log(f"  {source}")
    return {"source": source, "depths": evaluate_loss(scorer, rows, _byte_lengths(tokenizer),
                                                      depths=depths, keys=keys)}


def _depth_sweep(task, config, *, ckpt, scorer, tokenizer, keys, plot_path, log, **_) -> dict:
    from parcae_jax.evaluation.depth_sweep import default_depths, run_depth_sweep

    cfg = ckpt.model.config
    if cfg.arch != "parcae":
        return {"skipped": f"{cfg.arch} is not a looped model"}
    rows, source = loss_rows(config, ckpt, tokenizer, scorer.max_len)
    sweep = parse_ints(config.sweep_depths, default_depths(cfg.mean_recurrence))
    log(f"  depths {sweep} on {source}")
    out = run_depth_sweep(scorer, rows, _byte_lengths(tokenizer), depths=sweep, keys=keys,
                          mean_recurrence=cfg.mean_recurrence, plot_path=plot_path,
                          title=f"{cfg.name or cfg.arch} step {ckpt.step}" if ckpt.step else cfg.name)
    return {"source": source, **out}


def _core(task, config, *, scorer, tokenizer, depths, keys, log, bos_id, on_sample, **_) -> dict:
    from parcae_jax.evaluation.core import DEFAULT_FEWSHOT_SEED, run_suite

    seeds = parse_ints(config.fewshot_seeds, [DEFAULT_FEWSHOT_SEED])
    return run_suite(task, scorer, tokenizer, _bundle(config), depths=depths, keys=keys,
                     fewshot_seeds=seeds, max_per_task=int(config.max_per_task),
                     max_seq_len=scorer.max_len, bos_id=bos_id, on_sample=on_sample, log=log)


def _lambada(task, config, *, scorer, tokenizer, depths, keys, **_) -> dict:
    from parcae_jax.evaluation.lambada import LAMBADA_FILE, run_lambada

    bundle = _bundle(config)
    path = bundle.find_file(LAMBADA_FILE)
    if path is None:
        return {"missing": f"{LAMBADA_FILE} is not in {bundle.root}/eval_data"}
    return run_lambada(scorer, tokenizer, path, depths=depths, keys=keys,
                       max_examples=int(config.max_per_task))


def _sample(task, config, *, ckpt, tokenizer, depths, keys, **_) -> dict:
    from parcae_jax.evaluation.sample import sample_texts
    from parcae_jax.sampling import Sampling

    prompts = config.prompts.split("|") if isinstance(config.prompts, str) else list(config.prompts)
    sampling = Sampling(temperature=float(config.temperature), top_k=int(config.top_k) or None)
    samples, generator = sample_texts(ckpt.model, tokenizer, prompts, sampling=sampling, depth=depths[0],
                                      max_new_tokens=int(config.max_new_tokens), key=keys[0],
                                      seed=int(config.seed))
    return {"depth": depths[0], "temperature": float(config.temperature), "generator": generator,
            "samples": samples}


_RUNNERS = {"loss": _loss, "depth_sweep": _depth_sweep, "core": _core, "core_extended": _core,
            "lambada": _lambada, "sample": _sample}
TASKS = tuple(_RUNNERS)


def run_task(task: str, config, *, ckpt, scorer, tokenizer, depths, keys, plot_path, log, bos_id=None,
             on_sample=None) -> dict:
    """The JSON section of `task` (one of `TASKS`) for the loaded checkpoint `ckpt` (`loading.Loaded`)."""
    if task not in _RUNNERS:
        raise ConfigError(f"unknown task {task!r}")
    return _RUNNERS[task](task, config, ckpt=ckpt, scorer=scorer, tokenizer=tokenizer, depths=depths,
                          keys=keys, plot_path=plot_path, log=log, bos_id=bos_id, on_sample=on_sample)
