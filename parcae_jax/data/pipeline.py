"""The Grain input pipeline: token shards -> shuffled, per-process batches of `block_size + 1` rows.

Every batch is a pure function of (dataset, seed, global step), so the pipeline is random access:
a Grain `MapDataset` over step numbers, read ahead by threads (`to_iter_dataset`) or worker processes
(`mp_prefetch`). The iterator state is therefore just the next step plus two counters, the same in
both modes, and it can be restored with another worker count, prefetch depth or process count.

Rows (`block_size + 1 = T + 1` tokens; inputs = row[:-1], labels = row[1:]):

* `packing="bos"` (default): per shard, the stream [BOS] doc0 [BOS] doc1 ... is cut into consecutive
  non-overlapping windows, row r = stream[r*T : r*T + T + 1] (the last token of a row is the first of
  the next). Rows never cross shards (each shard's tail is dropped), and nothing is padding. A row is
  one contiguous token read plus BOS insertion.
* `packing="best-fit"`: the official packer (PARCAE_SPEC §7.10): documents in a seeded order, no
  separators, grouped `pack_rows` at a time (the per-device micro-batch: the official collator gets
  one rank's micro-batch of documents per call); each group is packed into `pack_rows` rows by
  "longest document that fits, else the shortest one truncated, else padding". Padding is the
  official pad id (the tokenizer's declared PAD, else 0), and every label equal to it gets
  `IGNORE_INDEX` (the official `ignore_index`). Group g of an epoch holds the shuffled documents
  g·pack_rows ... ; micro-batch a of step s is groups (s·accum + a)·R ... + R - 1 for its R devices.

Batch layout. Global step s has a global list g of `world_batch` rows; reshaped to
`[accum, process_count, world_batch // accum // process_count]`, process p takes `[:, p, :]`. The
union over processes is exactly the single-process batch, and the per-process blocks stack along
axis 1 in process order, which is what `global_batch` (`jax.make_array_from_process_local_data`)
expects for a micro-batch axis sharded over data devices ordered by process. A process reads only
its own rows.

Epochs: `bos` shuffles the epoch's rows with a seeded random-access permutation (Grain's
`index_shuffle`, seeded by hash(seed, epoch)); `best-fit` shuffles the documents the same way. The
remainder of an epoch that does not fill a whole global batch is dropped (a different remainder each
epoch); iteration repeats epochs forever.
"""

from __future__ import annotations

import bisect
import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags
from grain.experimental import index_shuffle

from parcae_jax.data import shards
from parcae_jax.errors import ConfigError
from parcae_jax.losses import IGNORE_INDEX

PACKINGS = ("bos", "best-fit")
STATE_FORMAT = "parcae-jax-batches-v1"
_FOREVER = sys.maxsize // 2  # step count of the (conceptually infinite) step dataset


def epoch_seed(seed: int, epoch: int) -> int:
    """A 32-bit seed for `index_shuffle` from (seed, epoch); hashing avoids seed+1 == next epoch."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, np.uint32)[0])


def shuffled(positions: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Where each position lands in a seeded permutation of range(size) (random access, O(1) memory)."""
    if size == 1:
        return np.zeros_like(positions)
    return np.array(
        [index_shuffle(int(i), max_index=size - 1, seed=seed, rounds=4) for i in positions], np.int64
    )


def _resolve_processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    p = jax.process_index() if process_index is None else int(process_index)
    n = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= p < n:
        raise ValueError(f"process_index={p} is outside [0, process_count={n})")
    return p, n


def _open(dataset_dir: str, split: str) -> tuple[dict[str, Any], list[shards.ShardReader]]:
    meta = shards.load_metadata(dataset_dir)  # raises a one-line error naming the file and the fix
    return meta, shards.open_split(dataset_dir, split)


# ---------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------


class BosRows:
    """Random access to `bos` rows [T+1] across the shards of one split (row ids: shard by shard)."""

    def __init__(self, readers: Sequence[shards.ShardReader], block_size: int, bos_id: int, where: str):
        self.readers, self.block_size, self.bos_id = list(readers), int(block_size), int(bos_id)
        # Stream position of each document's BOS: its token offset plus the BOS of the docs before.
        self.bos_positions = [r.doc_offsets[:-1] + np.arange(r.num_documents) for r in self.readers]
        stream = np.array([r.num_tokens + r.num_documents for r in self.readers], dtype=np.int64)
        rows = np.where(stream >= self.block_size + 1, (stream - 1) // self.block_size, 0)
        self.row_starts = np.concatenate([[0], np.cumsum(rows)])  # first global row id of each shard
        self.num_rows = int(self.row_starts[-1])
        if self.num_rows == 0:
            raise ConfigError(
                f"{where}: no shard holds block_size+1={self.block_size + 1} tokens (largest stream with "
                f"BOS: {int(stream.max(initial=0))}); use a smaller block_size or prepare more data"
            )

    def row(self, row_id: int) -> np.ndarray:
        """Row `row_id` as int32 [T+1]: one contiguous read, BOS inserted at document starts."""
        shard = int(np.searchsorted(self.row_starts, row_id, side="right")) - 1
        start = (int(row_id) - int(self.row_starts[shard])) * self.block_size
        stop = start + self.block_size + 1
        bos = self.bos_positions[shard]
        lo, hi = np.searchsorted(bos, [start, stop], side="left")  # BOS before start / before stop
        # A non-BOS stream position q holds token q - (number of BOS before q).
        tokens = self.readers[shard].read(start - int(lo), stop - int(hi))
        out = np.full(self.block_size + 1, self.bos_id, dtype=np.int32)
        is_token = np.ones(self.block_size + 1, dtype=bool)
        is_token[bos[lo:hi] - start] = False
        out[is_token] = tokens
        return out


def pack_best_fit(lengths: Sequence[int], num_rows: int, capacity: int) -> tuple[list[list], list[int]]:
    """The official best-fit rule (PARCAE_SPEC §7.10) for one call: documents `lengths` (arrival order)
    into `num_rows` rows of `capacity` tokens. Returns (rows, unplaced document indices); each row is a
    list of (document index, tokens taken from its start). Per row: place the longest buffered document
    that fits the remaining space; if none fits, the shortest one cut to the remaining space (its rest
    is discarded); if the buffer is empty, the rest of the row is padding. Ties go to the earliest
    arrival (Python's `max`/`min` over the buffer in arrival order)."""
    order = sorted(range(len(lengths)), key=lambda i: (int(lengths[i]), i))  # by length, then arrival
    keys = [int(lengths[i]) for i in order]
    rows = []
    for _ in range(num_rows):
        row, remaining = [], capacity
        while remaining > 0 and order:
            fitting = bisect.bisect_right(keys, remaining)
            if fitting:
                j = bisect.bisect_left(keys, keys[fitting - 1])  # earliest among the longest that fit
                take = keys[j]
            else:
                j, take = 0, remaining
            row.append((order.pop(j), take))
            keys.pop(j)
            remaining -= take
        rows.append(row)
    return rows, order


class BestFitDocs:
    """The non-empty documents of a split (flat arrays over shards) and their per-group packing."""

    def __init__(self, readers: Sequence[shards.ShardReader], block_size: int, pad_id: int, where: str):
        self.readers, self.capacity, self.pad_id = list(readers), int(block_size) + 1, int(pad_id)
        starts = [r.doc_offsets[:-1] for r in self.readers]
        lengths = [np.diff(r.doc_offsets) for r in self.readers]
        keep = [n > 0 for n in lengths]  # an empty document would only waste a slot of the group
        self.doc_shard = np.concatenate([np.full(k.sum(), i, np.int32) for i, k in enumerate(keep)] or [[]])
        self.doc_start = np.concatenate([s[k] for s, k in zip(starts, keep, strict=True)] or [[]])
        self.doc_len = np.concatenate([n[k] for n, k in zip(lengths, keep, strict=True)] or [[]])
        self.num_docs = int(self.doc_len.size)
        if self.num_docs == 0:
            raise ConfigError(f"{where}: no non-empty documents; prepare the split again")

    def pack_group(self, doc_ids: np.ndarray, num_rows: int) -> list[list]:
        rows, unplaced = pack_best_fit(self.doc_len[doc_ids], num_rows, self.capacity)
        # Each row takes at least one document while any remain, so with num_rows >= len(doc_ids) the
        # buffer always drains: the official persistent buffer is empty between calls, and packing
        # each group on its own is exact (this is what makes the packing random access).
        assert not unplaced, "best-fit group left documents behind"
        return [[(int(doc_ids[d]), take) for d, take in row] for row in rows]

    def group_rows(self, group: int, num_rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows [num_rows, capacity] and real-token counts of packing group `group` of the epoch whose
        document order is seeded by `seed` (seed None: the stored order, as for validation)."""
        n = self.num_docs
        positions = np.arange(group * num_rows, min((group + 1) * num_rows, n))
        doc_ids = positions if seed is None else shuffled(positions, n, seed)
        packed = self.pack_group(doc_ids, num_rows)
        rows = np.empty((num_rows, self.capacity), np.int32)
        lengths = np.empty(num_rows, np.int64)
        for b, segments in enumerate(packed):
            rows[b], lengths[b] = self.read_row(segments)
        return rows, lengths

    def read_row(self, segments: list) -> tuple[np.ndarray, int]:
        """(int32 [capacity] tokens padded with pad_id, number of real tokens)."""
        out = np.full(self.capacity, self.pad_id, dtype=np.int32)
        n = 0
        for doc, take in segments:
            start = int(self.doc_start[doc])
            out[n : n + take] = self.readers[int(self.doc_shard[doc])].read(start, start + take)
            n += take
        return out, n


def rows_to_batch(
    rows: np.ndarray, lengths: np.ndarray | None = None, ignore_id: int | None = None
) -> dict[str, np.ndarray]:
    """int32 rows [..., T+1] (and real-token counts [...]) -> {"inputs", "labels"} [..., T]; labels
    equal to `ignore_id` (the official ignore index) are ignored too."""
    inputs, labels = rows[..., :-1].astype(np.int32), rows[..., 1:].astype(np.int32)
    if lengths is not None:  # label t is row[t+1]: padding from t = length-1 on
        t = np.arange(labels.shape[-1])
        labels = np.where(t + 1 < np.asarray(lengths)[..., None], labels, IGNORE_INDEX).astype(np.int32)
    if ignore_id is not None:
        labels = np.where(labels == ignore_id, IGNORE_INDEX, labels).astype(np.int32)
    return {"inputs": inputs, "labels": labels}


def official_pad_id(tokenizer_meta: dict) -> int:
    """The official packing pad / ignore id: the tokenizer's declared PAD, else 0 (spec §7.6)."""
    declared = tokenizer_meta.get("declared_pad_id", tokenizer_meta.get("pad_id"))
    return int(declared or 0)


# ---------------------------------------------------------------------------------------------------
# Training batches
# ---------------------------------------------------------------------------------------------------


class TrainBatches:
    """Step -> this process's batch {"inputs", "labels"}: int32 [accum, local_micro, T] (picklable)."""

    def __init__(
        self,
        dataset_dir: str,
        *,
        split: str,
        block_size: int,
        world_batch: int,
        accum: int,
        seed: int,
        packing: str,
        process_index: int,
        process_count: int,
        pack_rows: int | None = None,
    ):
        if packing not in PACKINGS:
            raise ConfigError(f"packing={packing!r}: use one of {PACKINGS}")
        if accum < 1 or world_batch < 1 or world_batch % (accum * process_count):
            raise ConfigError(
                f"world_batch={world_batch} is not divisible by accum*process_count={accum}*{process_count}; "
                "change train.world_batch_size or train.micro_batch_size"
            )
        meta, readers = _open(dataset_dir, split)
        where = shards.join(dataset_dir, split)
        self.split, self.block_size, self.world_batch, self.accum = split, block_size, world_batch, accum
        self.seed, self.packing = int(seed), packing
        self.process_index, self.process_count = process_index, process_count
        self.global_micro = world_batch // accum  # rows per micro-batch over all processes
        self.local_micro = self.global_micro // process_count
        self.pack_rows = int(pack_rows or self.local_micro)  # best-fit group: one device micro-batch
        if self.local_micro % self.pack_rows:
            raise ConfigError(
                f"pack_rows={self.pack_rows} does not divide the {self.local_micro} rows per process and "
                "micro-batch; change train.micro_batch_size"
            )
        tok = meta.get("tokenizer", {})
        if packing == "bos":
            if tok.get("bos_id") is None:
                raise ConfigError(f"{where}: the tokenizer has no BOS id; use packing='best-fit'")
            self.rows = BosRows(readers, block_size, tok["bos_id"], where)
            units, self.steps_per_epoch = self.rows.num_rows, self.rows.num_rows // world_batch
            what = f"{units} rows of block_size+1={block_size + 1} tokens"
        else:
            self.docs = BestFitDocs(readers, block_size, official_pad_id(tok), where)
            units = self.docs.num_docs
            groups_per_step = world_batch // self.pack_rows
            self.steps_per_epoch = math.ceil(units / self.pack_rows) // groups_per_step
            what = f"{units} documents (best-fit packs {self.pack_rows} per device micro-batch)"
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"{where}: {what}, not enough for one global batch of {world_batch} rows; "
                "prepare more data or lower world_batch_size / block_size"
            )
        self.units_per_epoch = units  # rows (bos) or documents (best-fit) shuffled per epoch
        self.tokens_per_epoch = self.steps_per_epoch * world_batch * block_size

    def signature(self) -> dict[str, Any]:
        """What a saved state is only valid for (not process or worker counts: batches are global)."""
        keys = ("split", "block_size", "world_batch", "accum", "seed", "packing", "units_per_epoch",
                "pack_rows")
        return {k: getattr(self, k) for k in keys}

    def local_positions(self, step_in_epoch: int) -> np.ndarray:
        """[accum, local_micro] positions of this process's rows in the epoch's global row order."""
        g = step_in_epoch * self.world_batch + np.arange(self.world_batch)
        return g.reshape(self.accum, self.process_count, self.local_micro)[:, self.process_index, :]

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        epoch, k = divmod(int(step), self.steps_per_epoch)
        seed = epoch_seed(self.seed, epoch)
        if self.packing == "bos":
            pos = self.local_positions(k)
            ids = shuffled(pos.ravel(), self.rows.num_rows, seed)
            rows = np.stack([self.rows.row(int(r)) for r in ids]).reshape(*pos.shape, -1)
            return rows_to_batch(rows)
        G = self.pack_rows
        rows = np.empty((self.accum, self.local_micro // G, G, self.block_size + 1), np.int32)
        lengths = np.empty((self.accum, self.local_micro // G, G), np.int64)
        ranks, local_ranks = self.global_micro // G, self.local_micro // G
        for a in range(self.accum):
            for j in range(local_ranks):
                group = (k * self.accum + a) * ranks + self.process_index * local_ranks + j
                rows[a, j], lengths[a, j] = self.docs.group_rows(group, G, seed)
        shape = (self.accum, self.local_micro)
        return rows_to_batch(rows.reshape(*shape, -1), lengths.reshape(shape), self.docs.pad_id)


class BatchIterator:
    """Endless iterator of this process's training batches, with a JSON-serialisable state.

    `next()` -> {"inputs", "labels"}: np.int32 [accum, world_batch // accum // process_count, T].
    Attributes: `steps_per_epoch`, `tokens_per_epoch` (label positions per epoch over all processes,
    padding included), `padding_fraction` (running, this process), `step` (next global step).
    """

    def __init__(self, batches: TrainBatches, *, num_workers: int = 0, prefetch: int = 2):
        self.batches, self.num_workers, self.prefetch = batches, int(num_workers), int(prefetch)
        self.steps_per_epoch, self.tokens_per_epoch = batches.steps_per_epoch, batches.tokens_per_epoch
        self.step, self._padding, self._positions = 0, 0, 0
        self._it = None

    @property
    def padding_fraction(self) -> float:
        return self._padding / self._positions if self._positions else 0.0

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def _start(self) -> None:
        ds = grain.MapDataset.range(self.step, _FOREVER).map(self.batches)
        if self.num_workers > 0:  # each worker reads its own steps; one reader thread per worker
            if not flags.FLAGS.is_parsed():
                # Grain reads its absl flags when it starts workers; outside an absl app (tests, the
                # bench, notebooks) nobody parsed them, so use their defaults as an app without flags.
                flags.FLAGS.mark_as_parsed()
            read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=max(1, self.prefetch))
            options = grain.MultiprocessingOptions(
                num_workers=self.num_workers, per_worker_buffer_size=max(1, self.prefetch)
            )
            self._it = iter(ds.to_iter_dataset(read).mp_prefetch(options))
        else:  # threads; prefetch=0 reads synchronously in the caller
            read = grain.ReadOptions(num_threads=self.prefetch, prefetch_buffer_size=self.prefetch)
            self._it = iter(ds.to_iter_dataset(read))

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            self._start()
        batch = next(self._it)
        self.step += 1
        self._padding += int(np.count_nonzero(batch["labels"] == IGNORE_INDEX))
        self._positions += int(batch["labels"].size)
        return batch

    next = __next__

    def get_state(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "padding_positions": self._padding,
            "label_positions": self._positions,
            "pipeline": self.batches.signature(),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ConfigError(
                f"data iterator state has format {state.get('format')!r}, expected {STATE_FORMAT!r}"
            )
        if state["pipeline"] != self.batches.signature():
            raise ConfigError(
                f"data iterator state was saved for {state['pipeline']}, but this pipeline is "
                f"{self.batches.signature()}; resume with the same data settings or start a new run"
            )
        self.close()  # the read-ahead belongs to the old position
        self.step = int(state["step"])
        self._padding, self._positions = int(state["padding_positions"]), int(state["label_positions"])

    def close(self) -> None:
        """Stop read-ahead threads / worker processes (restarted lazily by the next `next()`)."""
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def train_iterator(
    dataset_dir: str,
    *,
    split: str = "train",
    block_size: int,
    world_batch: int,
    accum: int,
    seed: int,
    packing: str = "bos",
    process_index: int | None = None,
    process_count: int | None = None,
    num_workers: int = 0,
    prefetch: int = 2,
    pack_rows: int | None = None,
) -> BatchIterator:
    """This process's endless training batches (see the module docstring for rows, layout, epochs).
    `process_index` / `process_count` default to JAX's; `num_workers > 0` reads in worker processes."""
    p, n = _resolve_processes(process_index, process_count)
    batches = TrainBatches(
        dataset_dir,
        split=split,
        block_size=block_size,
        world_batch=world_batch,
        accum=accum,
        seed=seed,
        packing=packing,
        process_index=p,
        process_count=n,
        pack_rows=pack_rows,
    )
    return BatchIterator(batches, num_workers=num_workers, prefetch=prefetch)


# ---------------------------------------------------------------------------------------------------
# Evaluation batches and global arrays
# ---------------------------------------------------------------------------------------------------


def eval_batches(
    dataset_dir: str,
    *,
    split: str = "val",
    block_size: int,
    batch_size: int,
    max_batches: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    packing: str = "bos",
    pack_rows: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """The split's rows in stored order, from the start: {"inputs","labels"} int32 [batch_size // P, T].

    `packing` is the training collator's: 'bos' rows, or best-fit groups of `pack_rows` documents (the
    official validation reuses the training collator). `batch_size` is global; global batch b holds
    rows b*batch_size ..., and process p takes its p-th contiguous block. The last batch is completed
    with rows whose labels are all IGNORE_INDEX, so every batch has the same shape. Stops after
    `max_batches` when given.
    """
    p, n = _resolve_processes(process_index, process_count)
    if batch_size < 1 or batch_size % n:
        raise ConfigError(f"eval batch_size={batch_size} is not divisible by process_count={n}; change it")
    if packing not in PACKINGS:
        raise ConfigError(f"packing={packing!r}: use one of {PACKINGS}")
    meta, readers = _open(dataset_dir, split)
    tok = meta.get("tokenizer", {})
    where = shards.join(dataset_dir, split)
    local = batch_size // n
    if packing == "best-fit":
        G = int(pack_rows or local)
        if local % G:
            raise ConfigError(f"pack_rows={G} does not divide the {local} eval rows per process; change it")
        docs = BestFitDocs(readers, block_size, official_pad_id(tok), where)
        num_batches = math.ceil(math.ceil(docs.num_docs / G) / (batch_size // G))
        if max_batches is not None:
            num_batches = min(num_batches, int(max_batches))

        def packed() -> Iterator[dict[str, np.ndarray]]:
            for b in range(num_batches):
                first = (b * batch_size + p * local) // G
                parts = [docs.group_rows(first + j, G, None) for j in range(local // G)]
                rows = np.concatenate([r for r, _ in parts])
                lengths = np.concatenate([n_real for _, n_real in parts])
                yield rows_to_batch(rows, lengths, docs.pad_id)

        return packed()
    if tok.get("bos_id") is None:
        raise ValueError(f"{where}: the tokenizer has no BOS id, which evaluation rows start documents with")
    rows = BosRows(readers, block_size, tok["bos_id"], where)
    num_batches = math.ceil(rows.num_rows / batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, int(max_batches))
    pad_row = np.full(block_size + 1, tok.get("pad_id") or 0, dtype=np.int32)

    def generate() -> Iterator[dict[str, np.ndarray]]:
        for b in range(num_batches):
            ids = b * batch_size + p * local + np.arange(local)
            block = np.stack([rows.row(int(r)) if r < rows.num_rows else pad_row for r in ids])
            yield rows_to_batch(block, np.where(ids < rows.num_rows, block_size + 1, 0))

    return generate()


def global_batch(
    local: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding, *, batch_axis: int = 1
) -> dict[str, jax.Array]:
    """Assemble each process's block into global arrays with `sharding`.

    The global shape is the local shape with `batch_axis` multiplied by `jax.process_count()`:
    `batch_axis=1` for training batches [accum, local_micro, T] -> [accum, global_micro, T];
    `batch_axis=0` for `eval_batches` [local, T] -> [batch_size, T]. Process blocks are laid out in
    process order along that axis, matching the per-process row selection above.
    """
    out = {}
    for key, value in local.items():
        shape = list(value.shape)
        shape[batch_axis] *= jax.process_count()
        out[key] = jax.make_array_from_process_local_data(sharding, value, tuple(shape))
    return out
