"""Does the input pipeline keep up with training? Tokens/s delivered vs tokens/s consumed.

    python -m parcae_jax.bench.data --config configs/tiny.py [--config.a.b=v ...] [--steps N]
        [--dataset-dir DIR | --synthetic] [--num-workers 0,2] [--packing bos,best-fit] [--train-steps 3]

For the config's block size and world batch it times (1) `pipeline.train_iterator` after warm-up, for
each packing and worker count, and (2) the jitted training step of the same config on this machine's
devices, and prints their ratio (target: the pipeline at least 20x faster, so it never stalls a step).

Dataset: `--dataset-dir`, else the config's `data.dataset_dir`, else the embedded Shakespeare corpus
(prepared on first use) when the config's source is 'shakespeare', else -- or with `--synthetic` -- a
synthetic dataset in a temporary folder: random tokens, log-normal document lengths (mean about 700
tokens, roughly web text), so the bench needs no tokenizer. The output says which one was used.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np

from parcae_jax import errors, fileio
from parcae_jax.cli_config import load_config, split_config_args
from parcae_jax.data import pipeline, shards

TARGET_RATIO = 20.0


def write_synthetic_dataset(
    root: str, vocab_size: int, *, shards_count: int = 4, tokens_per_shard: int = 500_000, seed: int = 0
) -> str:
    """Random-token shards with log-normal document lengths (median ~450, mean ~700 tokens)."""
    rng = np.random.default_rng(seed)
    dtype = shards.token_dtype(vocab_size)
    totals = {"shards": shards_count, "tokens": 0, "documents": 0}
    for index in range(shards_count):
        lengths = []
        while sum(lengths) < tokens_per_shard:
            lengths += [int(x) for x in np.clip(rng.lognormal(6.1, 0.9, size=256), 8, 20_000)]
        docs = [rng.integers(3, vocab_size, size=n) for n in lengths]  # ids 0-2: BOS, EOS, PAD
        record = shards.write_shard(root, "train", index, docs, dtype)
        totals["tokens"] += record["tokens"]
        totals["documents"] += record["documents"]
    meta = {
        "format": shards.FORMAT,
        "tokenizer": {
            "fingerprint": "synthetic",
            "kind": "synthetic",
            "vocab_size": vocab_size,
            "bos_id": 0,
            "eos_id": 1,
            "pad_id": 2,
            "path": "",
        },
        "dtype": dtype.name,
        "splits": {"train": totals},
        "source": "synthetic (parcae_jax.bench.data)",
    }
    fileio.write_json_atomic(shards.join(root, "metadata.json"), meta, sort_keys=True)
    return root


def pick_dataset(args, cfg, scratch: str) -> tuple[str, str]:
    """(dataset_dir, description)."""
    if args.dataset_dir:
        return args.dataset_dir, f"{args.dataset_dir} (--dataset-dir)"
    if not args.synthetic and cfg.data.dataset_dir:
        return cfg.data.dataset_dir, f"{cfg.data.dataset_dir} (config data.dataset_dir)"
    if not args.synthetic and cfg.data.source == "shakespeare":
        try:
            from parcae_jax.data.prepare import ensure_shakespeare_dataset
        except ImportError as e:
            print(f"(Shakespeare preparation unavailable: {e}; using synthetic data)")
        else:
            data_dir, _ = ensure_shakespeare_dataset(cfg.data.cache_dir, int(cfg.data.vocab_size))
            return data_dir, f"{data_dir} (embedded Shakespeare corpus)"
    root = write_synthetic_dataset(os.path.join(scratch, "synthetic"), int(cfg.model.vocab_size))
    meta = shards.load_metadata(root)["splits"]["train"]
    return root, (
        f"synthetic in {root}: {meta['shards']} shards, {meta['tokens']:,} random tokens, "
        f"{meta['documents']:,} documents (log-normal lengths)"
    )


def time_pipeline(dataset_dir: str, *, steps: int, warmup: int, **iterator_options) -> tuple[float, float]:
    """(tokens/s delivered to this process after `warmup` batches, padding fraction);
    `iterator_options` go to `pipeline.train_iterator` as the trainer passes them."""
    with pipeline.train_iterator(dataset_dir, **iterator_options) as it:
        for _ in range(warmup):  # includes worker start-up and filling the read-ahead
            next(it)
        start = time.perf_counter()
        tokens = 0
        for _ in range(steps):
            tokens += next(it)["inputs"].size
        return tokens / (time.perf_counter() - start), it.padding_fraction


def time_train_step(cfg, dataset_dir: str, steps: int) -> tuple[float, int, int, float]:
    """(tokens/s consumed by the jitted train step, accum, global micro-batch, compile seconds)."""
    from parcae_jax.train_step import create_train_state, make_train_step

    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(-1, 1, 1), ("data", "fsdp", "tensor"))
    setup, state = create_train_state(cfg, mesh, int(cfg.train.max_steps or 1000))
    step_fn = make_train_step(setup, cfg.train)
    block_size = int(cfg.model.block_size)
    world_batch, seed = int(cfg.train.world_batch_size), int(cfg.train.seed)
    it = pipeline.train_iterator(
        dataset_dir, block_size=block_size, world_batch=world_batch, accum=setup.accum, seed=seed, prefetch=0
    )
    batches = [pipeline.global_batch(next(it), setup.batch_sharding) for _ in range(steps + 1)]
    key = jax.random.key(0)
    start = time.perf_counter()
    state, metrics = step_fn(state, batches[0], key)  # compiles
    jax.block_until_ready((state, metrics))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for batch in batches[1:]:
        state, metrics = step_fn(state, batch, key)
    jax.block_until_ready((state, metrics))
    elapsed = time.perf_counter() - start
    tokens = steps * setup.accum * setup.global_micro_batch * block_size
    return tokens / elapsed, setup.accum, setup.global_micro_batch, compile_s


def _main(argv: list[str] | None = None) -> int:
    config_path, overrides, rest = split_config_args(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m parcae_jax.bench.data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=50, help="pipeline batches timed (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3, help="pipeline batches before timing")
    parser.add_argument("--train-steps", type=int, default=3, help="train steps timed (after compiling)")
    parser.add_argument("--dataset-dir", default=None)
    parser.add_argument("--synthetic", action="store_true", help="use a synthetic dataset")
    parser.add_argument("--num-workers", default="0,2", help="comma-separated worker counts to time")
    parser.add_argument("--packing", default="bos,best-fit", help="comma-separated packings to time")
    args = parser.parse_args(rest)
    if config_path is None:
        parser.error("--config is required (e.g. --config configs/tiny.py)")
    cfg = load_config(config_path, overrides)
    block_size, world_batch = int(cfg.model.block_size), int(cfg.train.world_batch_size)

    with tempfile.TemporaryDirectory(prefix="parcae-bench-") as scratch:
        dataset_dir, description = pick_dataset(args, cfg, scratch)
        print(f"dataset: {description}")
        print(f"config: {config_path} {' '.join(overrides)}".rstrip())
        train_rate, accum, global_micro, compile_s = time_train_step(cfg, dataset_dir, args.train_steps)
        print(
            f"block_size={block_size} world_batch={world_batch} accum={accum} global_micro={global_micro} "
            f"devices={jax.device_count()} x {jax.devices()[0].platform} processes={jax.process_count()}"
        )
        # Per process: each process's pipeline delivers 1/process_count of what the step consumes.
        needed = train_rate / jax.process_count()
        print(
            f"train step: {train_rate:,.0f} tokens/s over {args.train_steps} steps "
            f"({world_batch * block_size / train_rate:.3f} s/step; compile + first step {compile_s:.1f} s)"
        )
        ok = True
        for packing in args.packing.split(","):
            for workers in (int(w) for w in args.num_workers.split(",")):
                rate, padding = time_pipeline(
                    dataset_dir,
                    block_size=block_size,
                    world_batch=world_batch,
                    accum=accum,
                    seed=int(cfg.train.seed),
                    packing=packing,
                    num_workers=workers,
                    prefetch=int(cfg.data.prefetch),
                    steps=args.steps,
                    warmup=args.warmup,
                )
                ratio = rate / needed
                ok &= ratio >= TARGET_RATIO
                print(
                    f"pipeline packing={packing:<8} workers={workers}: {rate:,.0f} tokens/s, "
                    f"{ratio:,.1f}x the train step (target >= {TARGET_RATIO:.0f}x), padding {padding:.1%}"
                )
    print("OK: the pipeline keeps up" if ok else "WARNING: some pipeline settings are below the target ratio")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default sys.argv[1:]) in the error boundary; its exit status."""
    return errors.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
