"""Held-out loss, perplexity and bits per byte (PARCAE_SPEC §9.3).

Three sources of rows:
* a training run's validation set (`ValidationSet`, recorded in every checkpoint): the rows the
  trainer validates on, packed by the training collator. The trainer's `val_loss_<d>` IS this task
  (`trainer.Evaluator` calls `rows_loss`), so `eval.py` on a workdir reproduces it;
* a prepared token-shard folder (`shard_rows`): the split's `bos` rows of `block_size + 1` tokens
  (documents back to back, BOS at each start);
* raw text (`document_rows`, "parquet:GLOB" / "jsonl:GLOB" / "text:GLOB"): the official BPB rule,
  each document alone, tokenised without BOS, cut to its first `block_size + 1` tokens.

BPB rule: a target's bytes are the UTF-8 length of its token decoded alone, 0 for special tokens.
`nats` sums the cross-entropy of targets with bytes > 0, `tokens` counts them, `bytes` sums their
bytes; loss = nats / tokens, ppl = exp(loss), bpb = nats / (ln 2 · bytes). `val_loss` is the plain mean
over every target (BOS included), the number the trainer logs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import jax
import numpy as np

from parcae_jax.evaluation.scoring import TokenScorer

COUNTS = ("targets", "tokens", "bytes")
# Initial states of evaluation: state seed i of `seed` is fold_in(key(seed), i), and row r draws
# h0 from fold_in(that key, r) (`model.row_states`). Validation during training uses seed 0, index 0:
# the same noise for every run and step, and eval.py's default.
VALIDATION_SEED = 0


def state_keys(seed: int, count: int = 1) -> list[jax.Array]:
    """The `count` initial-state keys of `seed` (see `VALIDATION_SEED`)."""
    base = jax.random.key(int(seed))
    return [jax.random.fold_in(base, i) for i in range(max(1, int(count)))]


@dataclasses.dataclass(frozen=True)
class ValidationSet:
    """A training run's held-out rows: `max_batches` global batches of `batch_rows` rows of the split,
    packed as the training collator packs (`packing`, `pack_rows` rows per device). Recorded in each
    checkpoint's metadata (`to_dict`) so evaluation can rebuild exactly the trainer's rows."""

    dataset_dir: str
    block_size: int
    packing: str
    batch_rows: int
    pack_rows: int
    max_batches: int
    split: str = "val"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ValidationSet:
        return cls(**d)

    def rows(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every row in stream order (row index = h0 uid); every host reads all of them."""
        from parcae_jax.data import pipeline

        batches = pipeline.eval_batches(self.dataset_dir, split=self.split, block_size=self.block_size,
                                        batch_size=self.batch_rows, max_batches=self.max_batches,
                                        packing=self.packing, pack_rows=self.pack_rows,
                                        process_index=0, process_count=1)
        return [(inputs, labels) for b in batches for inputs, labels in zip(b["inputs"], b["labels"],
                                                                           strict=True)]


def shard_rows(dataset_dir: str, *, split: str = "val", block_size: int, max_rows: int = -1
               ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The split's rows as (inputs [T], targets [T]); every host reads all of them (they are small)."""
    from parcae_jax.data import pipeline

    batches = pipeline.eval_batches(dataset_dir, split=split, block_size=block_size, batch_size=1,
                                    max_batches=None if max_rows < 0 else max_rows,
                                    process_index=0, process_count=1)
    return [(b["inputs"][0], b["labels"][0]) for b in batches]


def document_rows(source: str, tokenizer, *, block_size: int, max_documents: int = 1000
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """One row per document of `source`: its first block_size + 1 tokens, no BOS (official rule)."""
    from parcae_jax.data.sources import iter_documents

    rows = []
    for text in itertools.islice(iter_documents(source), max_documents):
        ids = np.asarray(tokenizer.encode(text)[:block_size + 1], np.int32)
        if len(ids) >= 2:
            rows.append((ids[:-1], ids[1:]))
    if not rows:
        raise ValueError(f"{source}: no document with at least 2 tokens to score")
    return rows


def loss_totals(ce: np.ndarray, targets: np.ndarray, byte_lengths: np.ndarray | None) -> dict[str, float]:
    """Sums for one row (or any batch of positions): ce and targets of the same shape, targets < 0
    ignored. Returns nats/tokens/bytes by the BPB rule and nll_all/tokens_all over every target."""
    valid = targets >= 0
    ce = np.where(valid, ce, 0.0).astype(np.float64)
    out = {"nll_all": float(ce.sum()), "tokens_all": int(valid.sum())}
    if byte_lengths is not None:
        nbytes = np.where(valid, byte_lengths[np.clip(targets, 0, len(byte_lengths) - 1)], 0)
        counted = nbytes > 0
        out.update(nats=float(ce[counted].sum()), tokens=int(counted.sum()), bytes=int(nbytes.sum()))
    return out


def add_totals(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + v for k, v in b.items()}


def finalize(totals: dict) -> dict[str, float]:
    """loss, ppl, bpb (BPB rule) and val_loss (every target) from summed totals."""
    out = {"val_loss": totals["nll_all"] / max(totals["tokens_all"], 1), "targets": totals["tokens_all"]}
    if "nats" in totals:
        loss = totals["nats"] / max(totals["tokens"], 1)
        bpb = totals["nats"] / (math.log(2) * max(totals["bytes"], 1))
        out.update(loss=loss, ppl=math.exp(loss), bpb=bpb, tokens=totals["tokens"], bytes=totals["bytes"])
    return out


def rows_loss(scorer: TokenScorer, rows, byte_lengths, *, depth: int, key: jax.Array) -> dict[str, float]:
    """Metrics of all rows at one depth with one initial-state key (row i uses noise uid i)."""
    totals: dict = {}
    for (ce, _), (_, targets) in zip(scorer.score(rows, depth=depth, key=key), rows, strict=True):
        totals = add_totals(totals, loss_totals(ce, np.asarray(targets), byte_lengths))
    return finalize(totals)


def evaluate_loss(scorer: TokenScorer, rows, byte_lengths, *, depths: Sequence[int],
                  keys: Sequence[jax.Array]) -> dict[str, dict]:
    """{depth: metrics averaged over the initial-state keys, plus `<metric>_std` (population std)}."""
    out = {}
    for depth in depths:
        runs = [rows_loss(scorer, rows, byte_lengths, depth=depth, key=key) for key in keys]
        metrics = {}
        for name in runs[0]:
            if name in COUNTS:  # the same rows under every key
                metrics[name] = runs[0][name]
                continue
            values = np.array([r[name] for r in runs], dtype=np.float64)
            metrics[name], metrics[f"{name}_std"] = float(values.mean()), float(values.std())
        out[str(depth)] = metrics
    return out
