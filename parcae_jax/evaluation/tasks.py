"""One function per `eval.py` task; each returns the task's JSON section (see `runner.run`)."""

from __future__ import annotations

from parcae_jax.evaluation import bundle as bundles
from parcae_jax.evaluation.core import DEFAULT_FEWSHOT_SEED, run_suite
from parcae_jax.evaluation.depth_sweep import default_depths, run_depth_sweep
from parcae_jax.evaluation.lambada import LAMBADA_FILE, run_lambada
from parcae_jax.evaluation.lm_loss import document_rows, evaluate_loss, shard_rows
from parcae_jax.evaluation.runner import parse_ints, resolve_dataset_dir


def loss_rows(config, ckpt, tokenizer, max_len: int):
    """(rows, source description) for `loss` and `depth_sweep`: raw text if `config.text`, else shards."""
    if config.text:
        rows = document_rows(config.text, tokenizer, block_size=max_len,
                             max_documents=int(config.max_documents))
        return rows, {"text": config.text, "documents": len(rows), "rule": "one document per row"}
    dataset_dir = resolve_dataset_dir(ckpt, config.dataset_dir)
    if dataset_dir is None:
        raise ValueError("the loss tasks need held-out data: --config.dataset_dir=PREPARED_SHARDS or "
                         "--config.text=parquet:GLOB|jsonl:GLOB")
    if tokenizer is not None:
        from parcae_jax.data import shards

        shards.check_tokenizer(shards.load_metadata(dataset_dir), tokenizer.fingerprint, dataset_dir,
                               tokenizer.path)
    rows = shard_rows(dataset_dir, split=config.split, block_size=max_len, max_rows=int(config.max_rows))
    return rows, {"dataset_dir": dataset_dir, "split": config.split, "rows": len(rows), "block_size": max_len}


def _byte_lengths(tokenizer):
    return None if tokenizer is None else tokenizer.token_byte_lengths()


def _bundle(config) -> bundles.Bundle:
    path = config.bundle_dir or bundles.DEFAULT_BUNDLE_DIR
    if config.download_bundle:
        bundles.download_bundle(path)
    return bundles.Bundle(path)


def run_task(task: str, config, *, ckpt, scorer, tokenizer, depths, keys, plot_path, log, bos_id=None,
             on_sample=None) -> dict:
    cfg = ckpt.model.config
    looped = cfg.arch == "parcae"
    if task == "loss":
        rows, source = loss_rows(config, ckpt, tokenizer, scorer.max_len)
        log(f"  {source}")
        return {"source": source, "depths": evaluate_loss(scorer, rows, _byte_lengths(tokenizer),
                                                          depths=depths, keys=keys)}
    if task == "depth_sweep":
        if not looped:
            return {"skipped": f"{cfg.arch} is not a looped model"}
        rows, source = loss_rows(config, ckpt, tokenizer, scorer.max_len)
        sweep = parse_ints(config.sweep_depths, default_depths(cfg.mean_recurrence))
        log(f"  depths {sweep} on {source}")
        out = run_depth_sweep(scorer, rows, _byte_lengths(tokenizer), depths=sweep, keys=keys,
                              mean_recurrence=cfg.mean_recurrence, plot_path=plot_path,
                              title=f"{cfg.name or cfg.arch} step {ckpt.step}" if ckpt.step else cfg.name)
        return {"source": source, **out}
    if task in ("core", "core_extended"):
        seeds = parse_ints(config.fewshot_seeds, [DEFAULT_FEWSHOT_SEED])
        return run_suite(task, scorer, tokenizer, _bundle(config), depths=depths, keys=keys,
                         fewshot_seeds=seeds, max_per_task=int(config.max_per_task),
                         max_seq_len=scorer.max_len, bos_id=bos_id, on_sample=on_sample, log=log)
    if task == "lambada":
        bundle = _bundle(config)
        path = bundle.find_file(LAMBADA_FILE)
        if path is None:
            return {"missing": f"{LAMBADA_FILE} is not in {bundle.root}/eval_data"}
        return run_lambada(scorer, tokenizer, path, depths=depths, keys=keys,
                           max_examples=int(config.max_per_task))
    if task == "sample":
        from parcae_jax.evaluation.sample import sample_texts

        prompts = config.prompts.split("|") if isinstance(config.prompts, str) else list(config.prompts)
        samples, generator = sample_texts(
            ckpt.model, tokenizer, prompts, max_new_tokens=int(config.max_new_tokens),
            temperature=float(config.temperature), top_k=int(config.top_k) or None, depth=depths[0],
            key=keys[0], seed=int(config.seed))
        return {"depth": depths[0], "temperature": float(config.temperature), "generator": generator,
                "samples": samples}
    raise ValueError(f"unknown task {task!r}")
