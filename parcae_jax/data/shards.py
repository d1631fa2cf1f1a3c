"""Token shards on local disk or any TensorStore key-value store (`gs://bucket/dir`, `file://...`).

Why raw binary files and not ArrayRecord or zarr: a training row is a *contiguous* token range, so the
ideal access is one byte-range read. Raw little-endian arrays give exactly that: `np.memmap` on local
disk (no read at all until the pages are touched, ~µs per row) and one ranged GET through
TensorStore's kvstore on `gs://` (its GCS driver handles auth, retries and parallel requests). zarr
would add chunk bookkeeping for the same bytes; ArrayRecord stores records, not a token stream, and
would fix the row length at preparation time.

Layout of a dataset folder:

    DIR/metadata.json                      written last: its presence marks the dataset complete
    DIR/<split>/shard_00000.tokens         uint16 or uint32 tokens, documents back to back, no separators
    DIR/<split>/shard_00000.docs           int64 document start offsets into the tokens, plus the end
    DIR/<split>/shard_00000.json           {"tokens", "documents", "dtype", ...}: written after both
                                           files, so it marks the shard complete (resume skips it)

A shard is only trusted when its `.json` exists and both files have exactly the recorded sizes; any
other state (an interrupted write, a truncated copy) raises `ShardError` naming the file and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from parcae_jax import fileio, integrity
from parcae_jax.errors import UserError

FORMAT = "parcae-jax-token-shards-v1"
SHARD_NAME = "shard_{:05d}"
_DOC_DTYPE = np.dtype("<i8")


class ShardError(UserError, ValueError):
    """A shard or dataset folder is missing, incomplete or inconsistent (message names file and fix)."""


def token_dtype(vocab_size: int, requested: str | None = None) -> np.dtype:
    """uint16 when every id fits, else uint32; `requested='uint16'` with a larger vocabulary fails."""
    need = np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")
    if requested is None:
        return need
    dt = np.dtype(requested).newbyteorder("<")
    if dt.kind != "u" or dt.itemsize not in (2, 4):
        raise ShardError(f"token dtype must be uint16 or uint32, got {requested!r}")
    if vocab_size > np.iinfo(dt).max + 1:
        raise ShardError(
            f"a vocabulary of {vocab_size} ids does not fit {dt.name} shards (max {np.iinfo(dt).max + 1}); "
            "use uint32 (drop the dtype option) or a smaller tokenizer"
        )
    return dt


def join(path: str, *parts: str) -> str:
    if fileio.is_remote(path):
        return "/".join([str(path).rstrip("/"), *parts])
    return os.path.join(path, *parts)


def size_of(path: str) -> int:
    if not fileio.is_remote(path):
        return os.path.getsize(path)
    return len(fileio.read_bytes(path))  # object stores: a metadata call would do, the kvstore API has none


def shard_paths(dataset_dir: str, split: str, index: int) -> tuple[str, str, str]:
    stem = join(dataset_dir, split, SHARD_NAME.format(index))
    return stem + ".tokens", stem + ".docs", stem + ".json"


def write_shard(
    dataset_dir: str,
    split: str,
    index: int,
    documents: Sequence[np.ndarray],
    dtype: np.dtype,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write one complete shard from token arrays (one per document); returns its record."""
    tokens_path, docs_path, record_path = shard_paths(dataset_dir, split, index)
    dtype = np.dtype(dtype).newbyteorder("<")
    lengths = np.array([len(d) for d in documents], dtype=np.int64)
    offsets = np.zeros(len(documents) + 1, dtype=_DOC_DTYPE)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate([np.asarray(d) for d in documents]) if documents else np.zeros(0, np.int64)
    limit = np.iinfo(dtype).max
    if flat.size and (flat.min() < 0 or flat.max() > limit):
        raise ShardError(f"token id {int(flat.max())} does not fit {dtype.name} shards; use uint32")
    token_bytes, doc_bytes = flat.astype(dtype).tobytes(), offsets.tobytes()
    fileio.write_bytes_atomic(tokens_path, token_bytes)
    fileio.write_bytes_atomic(docs_path, doc_bytes)
    record = {"tokens": int(offsets[-1]), "documents": len(documents), "dtype": dtype.name,
              "crc32": {"tokens": integrity.crc32_hex(token_bytes), "docs": integrity.crc32_hex(doc_bytes)},
              **(extra or {})}
    fileio.write_json_atomic(record_path, record, sort_keys=True)  # last: marks the shard complete
    return record


def shard_is_complete(dataset_dir: str, split: str, index: int) -> bool:
    return shard_problem(dataset_dir, split, index) is None


def shard_problem(dataset_dir: str, split: str, index: int, *, checksums: bool = False) -> str | None:
    """What is wrong with a shard (incomplete, resized, or with `checksums` changed bytes), or None."""
    try:
        reader = ShardReader(dataset_dir, split, index)
    except (ShardError, FileNotFoundError) as e:
        return str(e).split(";")[0]
    if checksums:
        record = fileio.read_json(shard_paths(dataset_dir, split, index)[2])
        for name, path in (("tokens", reader.tokens_path), ("docs", reader.docs_path)):
            expected = record.get("crc32", {}).get(name)
            if expected is not None and integrity.crc32_hex(fileio.read_bytes(path)) != expected:
                return f"{path}: bytes changed since it was written (checksum mismatch)"
    return None


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------


class ShardReader:
    """Random access to one complete shard: `read(start, stop)` tokens, `doc_offsets` in memory.

    Local files are memory-mapped lazily (so the object pickles cheaply into Grain worker processes);
    remote files are read with one ranged request per call.
    """

    def __init__(self, dataset_dir: str, split: str, index: int):
        self.tokens_path, self.docs_path, record_path = shard_paths(dataset_dir, split, index)
        if not fileio.exists(record_path):
            raise ShardError(
                f"{record_path}: shard is incomplete or missing (preparation interrupted?); "
                "re-run `python -m parcae_jax.data.prepare` with the same arguments to finish it"
            )
        record = fileio.read_json(record_path)
        self.num_tokens, self.num_documents = int(record["tokens"]), int(record["documents"])
        self.dtype = np.dtype(record["dtype"]).newbyteorder("<")
        for path, expected in (
            (self.tokens_path, self.num_tokens * self.dtype.itemsize),
            (self.docs_path, (self.num_documents + 1) * _DOC_DTYPE.itemsize),
        ):
            if not fileio.exists(path):
                raise ShardError(f"{path}: missing; re-run preparation (it redoes only incomplete shards)")
            size = size_of(path)
            if size != expected:
                raise ShardError(
                    f"{path}: {size} bytes, expected {expected} (truncated or corrupted copy); re-run "
                    "`python -m parcae_jax.data.prepare` with the same arguments: it rebuilds damaged shards"
                )
        self.doc_offsets = np.frombuffer(fileio.read_bytes(self.docs_path), dtype=_DOC_DTYPE).astype(np.int64)
        self._memmap = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_memmap"] = None
        return state

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as a fresh array of the shard's dtype."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside {self.tokens_path} ({self.num_tokens})")
        if not fileio.is_remote(self.tokens_path):
            if self._memmap is None:
                if self.num_tokens == 0:
                    return np.zeros(0, self.dtype)
                self._memmap = np.memmap(self.tokens_path, dtype=self.dtype, mode="r")
            return np.array(self._memmap[start:stop])
        itemsize = self.dtype.itemsize
        raw = fileio.read_bytes(self.tokens_path, start * itemsize, stop * itemsize)
        return np.frombuffer(raw, dtype=self.dtype).copy()

    def document(self, i: int) -> np.ndarray:
        return self.read(int(self.doc_offsets[i]), int(self.doc_offsets[i + 1]))


# ---------------------------------------------------------------------------------------------------
# Dataset metadata
# ---------------------------------------------------------------------------------------------------


def load_metadata(dataset_dir: str) -> dict[str, Any]:
    path = join(dataset_dir, "metadata.json")
    if not fileio.exists(path):
        raise ShardError(
            f"{path}: not found, so {dataset_dir} is not a (complete) prepared dataset; run "
            f"`python -m parcae_jax.data.prepare --output {dataset_dir} ...` first"
        )
    meta = fileio.read_json(path)
    if meta.get("format") != FORMAT:
        raise ShardError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}; re-run preparation")
    return meta


def open_split(dataset_dir: str, split: str) -> list[ShardReader]:
    meta = load_metadata(dataset_dir)
    if split not in meta["splits"]:
        raise ShardError(f"{dataset_dir} has no split {split!r} (splits: {sorted(meta['splits'])})")
    n = int(meta["splits"][split]["shards"])
    return [ShardReader(dataset_dir, split, i) for i in range(n)]


def check_tokenizer(meta: dict[str, Any], fingerprint: str, dataset_dir: str, tokenizer_desc: str) -> None:
    """Fail when shards were made with another tokenizer than the one the run uses."""
    made_with = meta.get("tokenizer", {}).get("fingerprint")
    if made_with != fingerprint:
        raise ShardError(
            f"{dataset_dir}: shards were tokenized with tokenizer {made_with}, but the run uses "
            f"{tokenizer_desc} ({fingerprint}); re-run preparation with this tokenizer or point "
            "the config at the tokenizer the shards were made with"
        )


def unigram_entropy(dataset_dir: str, split: str = "train") -> float:
    """Entropy (nats) of the split's token frequencies: the loss of the best context-free model, the
    bar a trained LM must clear by far."""
    counts = None
    for reader in open_split(dataset_dir, split):
        tokens = reader.read(0, reader.num_tokens)
        c = np.bincount(tokens.astype(np.int64))
        counts = c if counts is None else np.pad(counts, (0, max(0, len(c) - len(counts)))) + np.pad(
            c, (0, max(0, len(counts) - len(c)))
        )
    if counts is None or counts.sum() == 0:
        raise ShardError(f"{dataset_dir}/{split} holds no tokens")
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
