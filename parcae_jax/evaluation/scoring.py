"""Batched, jitted per-token scoring on a device mesh: the one primitive every evaluation task uses.

`TokenScorer.score(rows, depth=, key=)` takes rows (inputs, targets) of any length up to `max_len` and
returns, per row, the cross-entropy of each target and the argmax prediction at each position.

* Rows are grouped into fixed bucket lengths (powers of two, and `max_len`) and fixed-size batches, so
  a whole evaluation compiles one program per bucket; `depth` is a traced argument, so every
  recurrence count shares that program. The last batch of a bucket is completed with dummy rows whose
  results are dropped: each row is scored exactly once.
* The batch axis is sharded over the mesh's ("data", "fsdp") axes (`jax.make_array_from_callback`
  serves each device its rows of the host batch, on any number of hosts); results come back
  replicated, so every host sees every row's scores.
* Determinism: a Parcae row's initial recurrent state is drawn from `fold_in(key, uid)` by the one
  h0 rule (`model.row_states`), so a token's noise depends only on (key, row id, position), never
  on batch size, bucket, mesh or host count. The official evaluation instead draws fresh noise on
  every call (PARCAE_SPEC §2.5), which makes repeated evaluations differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from parcae_jax import losses, sharding
from parcae_jax.model import row_states

# A row to score: (inputs int[L], targets int[L]); target t is what position t should predict.
Row = tuple[Sequence[int] | np.ndarray, Sequence[int] | np.ndarray]
# apply(params, ids [B, T], depth (traced int32), key, uids [B]) -> logits [B, T, V] or `Features`
ApplyFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
BATCH_AXES = ("data", "fsdp")
MIN_BUCKET = 32


def bucket_lengths(max_len: int, min_bucket: int = MIN_BUCKET) -> list[int]:
    """Powers of two from `min_bucket` below `max_len`, then `max_len` itself."""
    out, length = [], min_bucket
    while length < max_len:
        out.append(length)
        length *= 2
    return out + [max_len]


class Features(NamedTuple):
    """What a model's `apply` returns instead of logits: the head's input and the head, so the scorer
    applies the head a sequence chunk at a time (`losses.over_chunks`)."""

    x: jax.Array  # [B, T, D]
    head: Callable[[jax.Array], jax.Array]


def graph_apply(graphdef, cfg) -> ApplyFn:
    """`apply` for a model split into `graphdef` + state; returns `Features`. Parcae rows draw h0 by
    the one rule (`model.row_states`: row uid u from `fold_in(key, u)`), so a token's noise depends
    only on (key, uid, position)."""

    def apply(state, ids, depth, key, uids):
        m = nnx.merge(graphdef, state)
        if cfg.arch != "parcae":
            return Features(m(ids, features=True), m.head)
        h0 = row_states(key, cfg, uids, ids.shape[1])
        return Features(m(ids, num_steps=depth, initial_state=h0, features=True), m.head)

    return apply


def model_apply(model: nnx.Module) -> tuple[ApplyFn, Any]:
    """(apply, state) for a Parcae/GPT model."""
    graphdef, state = nnx.split(model)
    return graph_apply(graphdef, model.config), state


def logits_fn_apply(logits_fn: Callable[[jax.Array], jax.Array]) -> tuple[ApplyFn, Any]:
    """(apply, state) for any `logits_fn(ids [B, T]) -> logits [B, T, V]` (tests, other models)."""
    return (lambda state, ids, depth, key, uids: logits_fn(ids)), ()


def _token_stats(logits, targets):
    """CE of each target (targets < 0 score 0) and the argmax prediction, per position: [B, T] each."""
    ce, _ = losses.token_losses(logits, targets)
    return ce, jnp.argmax(logits, axis=-1).astype(jnp.int32)


# Scoring applies the head over sequence chunks of at most this many tokens (as training does).
HEAD_CHUNK_LEN = 512


class TokenScorer:
    """Scores rows with a model (or any logits function) in fixed-shape batches on `mesh`."""

    def __init__(self, apply: ApplyFn, state: Any, *, max_len: int, batch_size: int = 16, pad_id: int = 0,
                 mesh: Mesh | None = None, buckets: Sequence[int] | None = None):
        self.mesh = mesh if mesh is not None else sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        data_size = math.prod(self.mesh.shape[a] for a in BATCH_AXES if a in self.mesh.shape)
        # The batch must split evenly over the data-parallel devices: round up.
        self.batch_size = int(math.ceil(batch_size / data_size) * data_size)
        self.max_len = int(max_len)
        self.buckets = sorted(buckets) if buckets else bucket_lengths(self.max_len)
        if self.buckets[-1] < self.max_len:
            raise ValueError(f"largest bucket {self.buckets[-1]} is below max_len {self.max_len}")
        self.pad_id = int(pad_id)
        self.state = state
        self.row_sharding = NamedSharding(self.mesh, PartitionSpec(BATCH_AXES, None))
        self.uid_sharding = NamedSharding(self.mesh, PartitionSpec(BATCH_AXES))
        replicated = NamedSharding(self.mesh, PartitionSpec())

        def stats(state, ids, targets, depth, key, uids):
            out = apply(state, ids, depth, key, uids)
            if isinstance(out, Features):
                return losses.over_chunks(lambda x, t: _token_stats(out.head(x), t), HEAD_CHUNK_LEN, out.x,
                                          targets)
            return _token_stats(out, targets)

        self.stats_fn = jax.jit(stats, out_shardings=(replicated, replicated))
        self.rows_scored = 0  # real rows (not padding) sent to the device, for the exactly-once checks

    @classmethod
    def for_model(cls, model: nnx.Module, **kwargs) -> TokenScorer:
        """A scorer for a Parcae/GPT model; its parameters are placed on the mesh by the sharding rules."""
        apply, state = model_apply(model)
        scorer = cls(apply, state, **kwargs)
        scorer.state = jax.device_put(state, sharding.state_shardings(state, scorer.mesh))
        return scorer

    @classmethod
    def for_logits_fn(cls, logits_fn: Callable[[jax.Array], jax.Array], **kwargs) -> TokenScorer:
        apply, state = logits_fn_apply(logits_fn)
        return cls(apply, state, **kwargs)

    def compiled_programs(self) -> int:
        """Number of programs compiled so far (one per bucket shape; depth and key never add one)."""
        return self.stats_fn._cache_size()

    def _global(self, array: np.ndarray, sharding: NamedSharding) -> jax.Array:
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    def _run(self, ids: np.ndarray, targets: np.ndarray, uids: np.ndarray, depth: int, key: jax.Array):
        rows = self._global(ids, self.row_sharding), self._global(targets, self.row_sharding)
        args = (*rows, jnp.int32(depth), key, self._global(uids, self.uid_sharding))
        with jax.set_mesh(self.mesh):  # traced under its mesh: the attention backend places its kernel by it
            ce, pred = self.stats_fn(self.state, *args)
        return np.asarray(jax.device_get(ce)), np.asarray(jax.device_get(pred))

    def score(self, rows: Sequence[Row], *, depth: int = 0, key: jax.Array | None = None,
              uids: Sequence[int] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per row (in input order): (ce float32 [L], pred int32 [L]) with
        ce[t] = -log p(targets[t] | inputs[:t+1]) (0 where targets[t] < 0) and pred[t] the argmax of
        the same distribution.

        `uids` (default: row index) name each row's initial-state noise; give rows that must be
        comparable across calls (e.g. the same sequence at two depths) the same uid.
        """
        key = jax.random.key(0) if key is None else key
        uids = np.arange(len(rows)) if uids is None else np.asarray(uids)
        lengths = [len(r[0]) for r in rows]
        for i, (inputs, targets) in enumerate(rows):
            if len(inputs) != len(targets) or not 0 < len(inputs) <= self.max_len:
                raise ValueError(f"row {i}: inputs ({len(inputs)}) and targets ({len(targets)}) must have "
                                 f"the same length, between 1 and max_len={self.max_len}")
        results: list[Any] = [None] * len(rows)
        by_bucket: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            by_bucket.setdefault(next(b for b in self.buckets if b >= n), []).append(i)
        for bucket, members in sorted(by_bucket.items()):
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                ids = np.full((self.batch_size, bucket), self.pad_id, np.int32)
                tgt = np.full((self.batch_size, bucket), -1, np.int32)
                batch_uids = np.zeros(self.batch_size, np.int32)
                for j, i in enumerate(chunk):
                    ids[j, :lengths[i]] = rows[i][0]
                    tgt[j, :lengths[i]] = rows[i][1]
                    batch_uids[j] = uids[i]
                ce, pred = self._run(ids, tgt, batch_uids, depth, key)
                for j, i in enumerate(chunk):  # dummy rows j >= len(chunk) are dropped here
                    results[i] = (ce[j, :lengths[i]], pred[j, :lengths[i]])
                self.rows_scored += len(chunk)
        return results


def next_token_rows(sequences: Sequence[Sequence[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rows that score each sequence's own next tokens: inputs = seq[:-1], targets = seq[1:]."""
    out = []
    for seq in sequences:
        seq = np.asarray(seq, np.int32)
        if len(seq) < 2:
            raise ValueError(f"a scored sequence needs at least 2 tokens, got {len(seq)}")
        out.append((seq[:-1], seq[1:]))
    return out
