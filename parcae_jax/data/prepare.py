"""Tokenise a document source into train/val token shards (see `shards` for the on-disk format).

    python -m parcae_jax.data.prepare --source 'parquet:data/fineweb/**/*.parquet' \\
        --tokenizer tokenizers/fw32k --output data/fw32k --val-fraction 0.01 --workers 16

How it works:
  * Split: a document goes to val when the 64-bit blake2b hash of its text, as a fraction of 2^64, is
    below --val-fraction, else to train. It depends only on the text, so a held-out document (and any
    exact duplicate of it) is never in train, whatever the document order or the number of workers.
  * Tokens of a document = `tokenizer.encode(text)`, no BOS/EOS (the input pipeline adds BOS at document
    starts). Empty documents are dropped (but counted, see resume).
  * Worker processes tokenise chunks of documents; results are consumed in submission order with a
    bounded number of chunks in flight, so shard contents do not depend on --workers and memory stays
    bounded however large the source is.
  * A split's shard is written as soon as its buffer holds >= --shard-tokens tokens (the last one holds
    the rest), so the document -> shard assignment is fixed by the arguments alone.
  * Resume: every shard record stores `source_documents` (documents of its split it consumed, empty
    ones included) and `plan` (a hash of the arguments). A re-run with the same arguments keeps the
    leading complete shards of each split, skips that many documents of the split *without tokenising
    them*, and writes the rest; the result is byte-identical to an uninterrupted run. `progress.json`
    holds the arguments so a re-run with different ones fails instead of mixing two datasets.
  * `metadata.json` is written last; until it exists the folder does not count as a dataset.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import datetime
import fcntl
import hashlib
import json
import multiprocessing
import os
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from parcae_jax import errors, fileio
from parcae_jax.data import shards, sources
from parcae_jax.data.tokenizer import (
    MODEL_FILE,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_tokenizer,
)
from parcae_jax.errors import UserError

SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_VAL_FRACTION = 0.01
SHAKESPEARE_VAL_FRACTION = 0.08  # 54 of 781 scenes, 6.8 % of the text: ~113k val tokens at vocab 4096
SPLIT_RULE = "blake2b64-of-text-v1"
PROGRESS_FILE = "progress.json"
_CHUNK_DOCS, _CHUNK_CHARS = 512, 2_000_000  # one unit of work for a tokeniser process


class PrepareError(UserError, ValueError):
    """The preparation cannot start or continue (message says why and what to do)."""


def split_of(text: str, val_fraction: float) -> str:
    """'val' or 'train', from a hash of the document text (see the module docstring)."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return "val" if int.from_bytes(digest) < val_fraction * 2.0**64 else "train"


# ---------------------------------------------------------------------------------------------------
# Tokenising in worker processes
# ---------------------------------------------------------------------------------------------------

_worker_tokenizer: Tokenizer | None = None
_worker_dtype: np.dtype | None = None


def _init_worker(tokenizer: Tokenizer, dtype: str, single_threaded: bool) -> None:
    global _worker_tokenizer, _worker_dtype
    if single_threaded:  # the processes are the parallelism; threads inside each would oversubscribe
        os.environ["RAYON_NUM_THREADS"] = "1"  # HF tokenizers, read when its thread pool first starts
        if isinstance(tokenizer, SentencePieceTokenizer):
            tokenizer.num_threads = 1
    _worker_tokenizer, _worker_dtype = tokenizer, np.dtype(dtype)


def tokenize_chunk(texts: list[str]) -> list[np.ndarray]:
    """Token arrays (the shard dtype, small to send back) of a chunk, in the worker's tokenizer."""
    return [np.asarray(ids, dtype=_worker_dtype) for ids in _worker_tokenizer.encode_batch(texts)]


def _process_pool(workers: int, tokenizer: Tokenizer, dtype: np.dtype):
    # forkserver, not fork: the caller (train.py) may already run JAX threads, which must not be forked.
    # Preloading this module in the server makes each worker a cheap fork of an already-imported process.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["parcae_jax.data.prepare"])
    return concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(tokenizer, dtype.name, True)
    )


def _ordered_token_chunks(chunks: Iterator[tuple[list[str], list[str]]], tokenizer: Tokenizer,
                          dtype: np.dtype, workers: int) -> Iterator[tuple[list[str], list[np.ndarray]]]:
    """(splits, token arrays) per chunk, in input order; at most 2 x workers chunks in flight."""
    if workers <= 1:
        _init_worker(tokenizer, dtype.name, False)
        for splits, texts in chunks:
            yield splits, tokenize_chunk(texts)
        return
    with _process_pool(workers, tokenizer, dtype) as pool:
        in_flight: collections.deque = collections.deque()
        for splits, texts in chunks:
            in_flight.append((splits, pool.submit(tokenize_chunk, texts)))
            if len(in_flight) >= 2 * workers:
                done_splits, future = in_flight.popleft()
                yield done_splits, future.result()
        while in_flight:
            done_splits, future = in_flight.popleft()
            yield done_splits, future.result()


# ---------------------------------------------------------------------------------------------------
# Shard writing and resume
# ---------------------------------------------------------------------------------------------------


@dataclass
class _SplitState:
    """Shards written so far for one split, and the buffer of the next one."""

    next_index: int = 0
    tokens: int = 0
    documents: int = 0
    skip: int = 0  # documents of this split already in complete shards (resume)
    buffer: list[np.ndarray] = field(default_factory=list)
    buffer_tokens: int = 0
    buffer_source_documents: int = 0  # consumed from the source, empty documents included


def _resume_state(output: str, split: str, plan: str) -> _SplitState:
    """Leading complete shards made with this plan are kept; everything after them is redone."""
    state = _SplitState()
    while shards.shard_is_complete(output, split, state.next_index):
        record = fileio.read_json(shards.shard_paths(output, split, state.next_index)[2])
        if record.get("plan") != plan:
            break
        state.next_index += 1
        state.tokens += int(record["tokens"])
        state.documents += int(record["documents"])
        state.skip += int(record["source_documents"])
    return state


def _flush(output: str, split: str, state: _SplitState, dtype: np.dtype, plan: str) -> None:
    record = shards.write_shard(output, split, state.next_index, state.buffer, dtype,
                                extra={"source_documents": state.buffer_source_documents, "plan": plan})
    state.next_index += 1
    state.tokens += record["tokens"]
    state.documents += record["documents"]
    state.buffer, state.buffer_tokens, state.buffer_source_documents = [], 0, 0


def _chunks(source: str, val_fraction: float, states: dict[str, _SplitState], on_decode_error: str):
    """Chunks of (splits, texts) still to tokenise; documents in complete shards are skipped here."""
    splits: list[str] = []
    texts: list[str] = []
    chars = 0
    for text in sources.iter_documents(source, on_decode_error):
        split = split_of(text, val_fraction)
        if states[split].skip:
            states[split].skip -= 1
            continue
        splits.append(split)
        texts.append(text)
        chars += len(text)
        if len(texts) >= _CHUNK_DOCS or chars >= _CHUNK_CHARS:
            yield splits, texts
            splits, texts, chars = [], [], 0
    if texts:
        yield splits, texts


# ---------------------------------------------------------------------------------------------------
# The whole preparation
# ---------------------------------------------------------------------------------------------------


def _arguments(source: str, tokenizer: Tokenizer, val_fraction: float, shard_tokens: int,
               dtype: np.dtype, on_decode_error: str) -> dict:
    """Everything that determines the shard bytes (not --workers, which does not). The decode-error
    rule is recorded only when it is not the default, so datasets made before it existed still match."""
    arguments = {"format": shards.FORMAT, "source": source, "tokenizer_fingerprint": tokenizer.fingerprint,
                 "val_fraction": val_fraction, "shard_tokens": shard_tokens, "dtype": dtype.name,
                 "split_rule": SPLIT_RULE}
    if on_decode_error != "strict":
        arguments["on_decode_error"] = on_decode_error
    return arguments


def _plan_key(arguments: dict) -> str:
    return hashlib.sha256(json.dumps(arguments, sort_keys=True).encode()).hexdigest()[:16]


def _damaged_shards(output: str, checksums: bool) -> list[tuple[str, str]]:
    """(record path, problem) of every shard of a complete dataset that is not intact."""
    meta = fileio.read_json(shards.join(output, "metadata.json"))
    damaged = []
    for split, info in meta["splits"].items():
        for index in range(int(info["shards"])):
            problem = shards.shard_problem(output, split, index, checksums=checksums)
            if problem is not None:
                damaged.append((shards.shard_paths(output, split, index)[2], problem))
    return damaged


def _check_output(output: str, arguments: dict, overwrite: bool, repair: bool, log) -> bool:
    """True when `output` is already a complete, intact dataset made with `arguments` (damaged shards
    are scheduled for rebuilding: False); raises on conflicts."""
    metadata_path = shards.join(output, "metadata.json")
    progress_path = shards.join(output, PROGRESS_FILE)
    previous = fileio.read_json(progress_path).get("arguments") if fileio.exists(progress_path) else None
    complete = fileio.exists(metadata_path)
    if complete and previous is None:  # e.g. a copied dataset without progress.json: trust the metadata
        meta = fileio.read_json(metadata_path)
        made_with = {"source": meta.get("source"), "val_fraction": meta.get("val_fraction"),
                     "dtype": meta.get("dtype"), "tokenizer_fingerprint": meta.get("tokenizer", {}).get(
                         "fingerprint")}
        previous = {**arguments, **made_with} if meta.get("format") == shards.FORMAT else {}
    if complete and previous == arguments:
        damaged = _damaged_shards(output, checksums=repair)
        if not damaged:
            return True
        for record_path, problem in damaged:
            log(f"prepare: damaged shard ({problem}): rebuilding it and the shards after it")
            fileio.delete(record_path)
        fileio.delete(metadata_path)  # the folder stops looking complete until the rebuild ends
        return False
    if overwrite:
        fileio.delete(metadata_path)  # first: the folder must stop looking complete
        fileio.delete(progress_path)
        return False
    if complete:
        raise PrepareError(f"{output}: already holds a complete dataset made with other arguments "
                           f"({previous}); pass --overwrite or choose another --output")
    started_shards = any(shards.shard_is_complete(output, split, 0) for split in SPLITS)
    if previous is not None and previous != arguments and started_shards:
        changed = sorted(k for k in arguments if previous.get(k) != arguments[k])
        raise PrepareError(f"{output}: an interrupted preparation used other arguments (differing: "
                           f"{', '.join(changed)}); re-run with the same arguments to resume it, or pass "
                           "--overwrite to start over")
    if previous is None and not fileio.is_remote(output) and os.path.isdir(output) and os.listdir(output):
        raise PrepareError(f"{output}: folder exists, is not empty and is not a dataset folder; choose an "
                           "empty or new --output (or pass --overwrite to write into it anyway)")
    return False


def prepare(source: str, tokenizer_path: str, output: str, val_fraction: float = DEFAULT_VAL_FRACTION,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, workers: int | None = None, dtype: str | None = None,
            overwrite: bool = False, command: str | None = None, show_progress: bool = True,
            log=print, on_decode_error: str = "strict", repair: bool = False) -> dict:
    """Tokenise `source` into `output` (local folder or TensorStore URL); returns the metadata dict.
    A complete dataset is checked (shard sizes; with `repair` also checksums) and damaged shards are
    rebuilt; `on_decode_error='replace'` turns invalid UTF-8 into U+FFFD instead of failing."""
    import parcae_jax

    if not 0.0 <= val_fraction < 1.0:
        raise PrepareError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise PrepareError(f"--shard-tokens must be positive, got {shard_tokens}")
    sources.validate_spec(source)
    tokenizer = load_tokenizer(tokenizer_path)
    token_dtype = shards.token_dtype(tokenizer.vocab_size, dtype)
    workers = max(1, os.cpu_count() or 1) if workers is None else max(1, workers)
    if not fileio.is_remote(output):
        output = os.path.abspath(os.path.expanduser(output))
    arguments = _arguments(source, tokenizer, val_fraction, shard_tokens, token_dtype, on_decode_error)
    plan = _plan_key(arguments)
    if _check_output(output, arguments, overwrite, repair, log):
        log(f"prepare: {output} is already complete")
        return shards.load_metadata(output)
    progress = {"arguments": arguments, "plan": plan}
    fileio.write_json_atomic(shards.join(output, PROGRESS_FILE), progress, sort_keys=True)

    states = {split: _resume_state(output, split, plan) for split in SPLITS}
    skipped = sum(s.skip for s in states.values())
    if skipped:
        kept = ", ".join(f"{split} {s.next_index}" for split, s in states.items())
        log(f"prepare: resuming; keeping complete shards ({kept}), skipping {skipped} documents")
    started = time.time()
    new_tokens = 0
    bar = _progress_bar(source, skipped, show_progress)
    try:
        chunks = _chunks(source, val_fraction, states, on_decode_error)
        for splits, arrays in _ordered_token_chunks(chunks, tokenizer, token_dtype, workers):
            for split, ids in zip(splits, arrays, strict=True):
                state = states[split]
                state.buffer_source_documents += 1
                if ids.size:
                    state.buffer.append(ids)
                    state.buffer_tokens += ids.size
                    new_tokens += ids.size
                if state.buffer_tokens >= shard_tokens:
                    _flush(output, split, state, token_dtype, plan)
            bar.update(len(splits))
            bar.set_postfix_str(f"{new_tokens / max(time.time() - started, 1e-9):,.0f} tok/s", refresh=False)
        for split, state in states.items():
            if state.buffer:
                _flush(output, split, state, token_dtype, plan)
    finally:
        bar.close()

    if val_fraction > 0 and states["val"].documents == 0:
        log("prepare: warning: the val split is empty; raise --val-fraction or add documents")
    metadata = {
        "format": shards.FORMAT,
        "tokenizer": {"fingerprint": tokenizer.fingerprint, "kind": tokenizer.kind,
                      "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
                      "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
                      "declared_pad_id": tokenizer.declared_pad_id,
                      "path": os.path.abspath(os.path.expanduser(tokenizer_path))},
        "dtype": token_dtype.name,
        "splits": {split: {"shards": s.next_index, "tokens": s.tokens, "documents": s.documents}
                   for split, s in states.items()},
        "source": source,
        "val_fraction": val_fraction,
        "command": command if command is not None else shlex.join([sys.executable, *sys.argv]),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "parcae_jax_version": parcae_jax.__version__,
    }
    # last: marks completion
    fileio.write_json_atomic(shards.join(output, "metadata.json"), metadata, sort_keys=True)
    summary = ", ".join(f"{k} {v['tokens']:,} tokens / {v['documents']:,} docs / {v['shards']} shards"
                        for k, v in metadata["splits"].items())
    log(f"prepare: wrote {output} in {time.time() - started:.1f} s ({summary})")
    return metadata


def _progress_bar(source: str, skipped: int, enabled: bool):
    from tqdm import tqdm

    total = sources.count_hint(source) if enabled else None
    return tqdm(total=total, initial=skipped, unit="doc", unit_scale=True, smoothing=0.1,
                desc="tokenising", disable=not enabled, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------------
# The embedded Shakespeare dataset (used by configs/tiny.py)
# ---------------------------------------------------------------------------------------------------


def shakespeare_dirs(cache_dir: str, vocab_size: int) -> tuple[str, str]:
    """(dataset_dir, tokenizer_dir) of the Shakespeare corpus at `vocab_size`, built or not:
    `cache_dir/shakespeare-v{vocab_size}/{data,tokenizer}`."""
    root = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), f"shakespeare-v{vocab_size}")
    return os.path.join(root, "data"), os.path.join(root, "tokenizer")


def ensure_shakespeare_dataset(cache_dir: str, vocab_size: int, log=print) -> tuple[str, str]:
    """`shakespeare_dirs`, built on first use and reused afterwards. Concurrent callers (e.g. several
    processes of one run) serialise on a file lock; the first builds, the others reuse."""
    data_dir, tokenizer_dir = shakespeare_dirs(cache_dir, vocab_size)
    root = os.path.dirname(data_dir)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not os.path.isfile(os.path.join(tokenizer_dir, MODEL_FILE)):
            train_tokenizer([sources.SHAKESPEARE], vocab_size, tokenizer_dir, overwrite=True, log=log)
        prepare(sources.SHAKESPEARE, tokenizer_dir, data_dir, val_fraction=SHAKESPEARE_VAL_FRACTION,
                workers=1, overwrite=True, command=f"ensure_shakespeare_dataset({cache_dir!r}, {vocab_size})",
                show_progress=False, log=log)
    return data_dir, tokenizer_dir


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parcae_jax.data.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True,
                        help="shakespeare, parquet:GLOB, jsonl:GLOB, text:GLOB, or a path")
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder or file (see data.tokenizer)")
    parser.add_argument("--output", required=True, help="dataset folder (local or gs://...)")
    parser.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION)
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    parser.add_argument("--workers", type=int, default=None, help="tokeniser processes (default: all cores)")
    parser.add_argument("--dtype", choices=("uint16", "uint32"), default=None,
                        help="token dtype (default: uint16 when the vocabulary fits)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a dataset made with other arguments")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--on-decode-error", choices=sources.DECODE_ERRORS, default="strict",
                        help="invalid UTF-8 in text/jsonl sources: fail naming file and byte (strict), or "
                             "replace it with U+FFFD (recorded in the dataset's arguments)")
    parser.add_argument("--repair", action="store_true",
                        help="check every shard's checksum too (sizes are always checked) and rebuild "
                             "damaged ones")
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "-m", "parcae_jax.data.prepare", *given])
    prepare(args.source, args.tokenizer, args.output, args.val_fraction, args.shard_tokens, args.workers,
            args.dtype, args.overwrite, command=command, show_progress=not args.no_progress,
            on_decode_error=args.on_decode_error, repair=args.repair)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default sys.argv[1:]) in the error boundary; its exit status."""
    return errors.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
