"""Preallocated KV cache and the cached forward pass of Parcae and GPT (PARCAE_SPEC §6).

Layout (every buffer [B, max_len, H_kv, D_h] in the compute dtype, indexed by *real token position*):

* `prelude`: one buffer per prelude layer, `coda`: one per coda layer, `h`: one per GPT layer;
* `core`: one stacked array [S, B, max_len, H, D_h] of S slots shared by the core layers over the
  recurrence. Core layer j at recurrence r (0-based) has the official virtual index `P + r·R + j`;
  its slot is `core_slot(lookup, r·R + j, num_steps, R)`. With `lookup="full"` every (r, j) has its
  own slot (S = max_depth·R); the official `compress-*` strategies map several recurrences to one slot
  to bound memory (§6.1), later writers overwriting earlier ones exactly as the official dict cache.
  Within one chunk every step writes before it reads, so sharing only changes what *later* chunks
  (decoded tokens) read of earlier tokens.

`forward_chunk` runs T new tokens per row at given positions: each layer writes the chunk's K/V at those
positions, then attends over the whole buffer with the mask `key position <= query position`, so rows
may sit at different positions (batched prompts of different lengths) and RoPE sees real positions.

Adaptive depth (not in the official code): with `exit_criterion` set, a token stops iterating once its
state converges (`residual`: ‖h_r − h_{r−1}‖/‖h_r‖ < ε; `kl`: KL(p_r ‖ p_{r−1}) < ε between the
next-token distributions of successive steps, step 0 being the initial state). An exited token keeps
its state. What later tokens (in this chunk or in later calls) read as its K/V at deeper steps is
`exited_kv`: "last" (default) — the K/V of its last computed step; the loop stops as soon as every
token has exited (or after `num_steps`) and the skipped steps' slots get the same K/V, so exiting
saves compute — or "frozen" — K/V recomputed from its frozen state at every step, as per-token depth
training does (PARCAE_SPEC §5.3): all `num_steps` steps always run, so it saves nothing. Rows share
one loop, so a batch stops only when all its tokens have exited.

The `kl` criterion runs C, the coda, ln_f and the head after every step (one extra coda+head pass
per recurrence, and a [B, T, V] log-prob carry): its coda attention reads past tokens' final coda
K/V plus the chunk's own step-r coda K/V, so a chunk and token-by-token decoding of the same text
may exit differently. The `residual` criterion costs two norms per token and step and gives the
same exits however the text is chunked (tested).
"""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from parcae_jax.loop import recur, rel_residual

EXIT_CRITERIA = ("residual", "kl")
EXITED_KV = ("last", "frozen")  # what an exited token serves as K/V at its skipped steps
ANCHOR_RECURRENCES = 8  # compress-anchor keeps the first 8 recurrences (official hard-coded value)
_LOOKUP = re.compile(r"^(?:full|compress-(?:(first|last|stride|s|r)(\d+)|(boundaries|anchor)))$")


# ---------------------------------------------------------------------------------------------------
# Lookup strategies: which core slot a (recurrence, layer) reads and writes
# ---------------------------------------------------------------------------------------------------


def parse_lookup(lookup: str) -> tuple[str, int]:
    """`"full"` or an official `compress-*` name → (kind, K). K is 0 for full/boundaries/anchor."""
    m = _LOOKUP.match(lookup)
    if m is None:
        raise ValueError(
            f"unknown cache lookup strategy {lookup!r}: use full, compress-first<K>, compress-last<K>, "
            "compress-stride<K>, compress-boundaries, compress-s<K>, compress-anchor or compress-r<K>"
        )
    if lookup == "full":
        return "full", 0
    kind, k = (m.group(1), int(m.group(2))) if m.group(1) else (m.group(3), 0)
    if kind in ("first", "last") and k < 0 or kind in ("stride", "s", "r") and k < 1:
        raise ValueError(f"{lookup}: K must be >= 1")
    return kind, k


def budget_lookup(cache_budget: int) -> str:
    """`cache_budget=k` recurrence slots per core layer: recurrence r uses slot r mod k (compress-s<k>)."""
    if cache_budget < 1:
        raise ValueError(f"cache_budget must be >= 1, got {cache_budget}")
    return f"compress-s{cache_budget}"


def core_slot(lookup: str, rel, num_steps, n_core: int):
    """Slot of core step `rel = r·R + j` (r recurrence, j layer) when `num_steps` recurrences run.

    Python ints or (traced) int arrays. The rules are the official `ParcaeDynamicCache` ones, on
    indices relative to the core start: first<K> keeps recurrences < K, later ones share slot K;
    last<K> keeps the last K, earlier ones share slot 0; stride<K> maps r to r // K; boundaries keeps
    the last recurrence apart from all others; s<K> cycles through K recurrence slots (r mod K);
    r<K> merges K consecutive *steps* (layers included, rel // K); anchor keeps the first 8
    recurrences and maps all later ones onto the 9th. The official anchor rule is written for
    P=2, R=4 (`34 + (idx − 34) % 4`); this is its generalisation to any P, R (identical there).
    """
    kind, k = parse_lookup(lookup)
    rec, layer = rel // n_core, rel % n_core
    if kind == "full":
        return rel
    if kind == "first":
        return jnp.where(rec >= k, k * n_core + layer, rel)
    if kind == "last":
        threshold = num_steps - k
        return jnp.where(rec < threshold, layer, (rec - threshold + 1) * n_core + layer)
    if kind == "stride":
        return (rec // k) * n_core + layer
    if kind == "boundaries":
        return jnp.where(rec == num_steps - 1, n_core + layer, layer)
    if kind == "s":
        return rel % (k * n_core)
    if kind == "anchor":
        return jnp.where(rec < ANCHOR_RECURRENCES, rel, ANCHOR_RECURRENCES * n_core + layer)
    return rel // k  # r


def official_step_index(lookup: str, step_idx: int, n_prelude: int, n_core: int, num_steps: int) -> int:
    """The official cache's (remapped) virtual layer index: prelude i → i, core (r, j) → P + slot,
    coda i → P + N·R + i (unchanged)."""
    core_end = n_prelude + num_steps * n_core
    if not n_prelude <= step_idx < core_end:
        return step_idx
    return n_prelude + int(core_slot(lookup, step_idx - n_prelude, num_steps, n_core))


def num_core_slots(lookup: str, max_depth: int, n_core: int) -> int:
    """Core slots needed for any depth 1..max_depth under `lookup` (full: max_depth·R)."""
    worst = 0
    for n in range(1, max_depth + 1):
        rel = np.arange(n * n_core)
        worst = max(worst, int(np.max(np.asarray(core_slot(lookup, rel, n, n_core)))) + 1)
    return worst


# ---------------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CachePlan:
    """Static description of a cache and of how the core loop runs (hashable: a jit static argument).

    `max_depth`: the most recurrences any call may run (full lookup: S = max_depth·R core slots);
    the depth itself is a runtime value. `exit_criterion`: None (fixed depth) or one of EXIT_CRITERIA.
    """

    max_len: int
    max_depth: int = 1
    lookup: str = "full"
    exit_criterion: str | None = None
    exited_kv: str = "last"

    def __post_init__(self):
        parse_lookup(self.lookup)
        if self.exit_criterion not in (None, *EXIT_CRITERIA):
            raise ValueError(f"exit_criterion must be None or in {EXIT_CRITERIA}: {self.exit_criterion!r}")
        if self.exited_kv not in EXITED_KV:
            raise ValueError(f"exited_kv must be one of {EXITED_KV}, got {self.exited_kv!r}")
        if self.max_len < 1 or self.max_depth < 1:
            raise ValueError(f"max_len and max_depth must be >= 1, got {self.max_len}, {self.max_depth}")


def _buffer(batch, plan, heads, head_dim, dtype, lead=()):
    return jnp.zeros((*lead, batch, plan.max_len, heads, head_dim), dtype)


def init_cache(cfg, batch: int, plan: CachePlan) -> dict:
    """Zeroed cache pytree for `batch` rows: {"prelude"|"coda"|"h": [(K, V), ...], "core": (K, V)}."""
    if plan.max_len > cfg.rope_table_length:
        raise ValueError(
            f"cache length {plan.max_len} exceeds the model's block_size {cfg.rope_table_length} "
            "(RoPE table); shorten the prompt or max_new_tokens"
        )
    dtype, D = jnp.dtype(cfg.compute_dtype), cfg.head_size

    def kv(heads, lead=()):
        return tuple(_buffer(batch, plan, heads, D, dtype, lead) for _ in range(2))

    if cfg.arch == "gpt":
        return {"h": [kv(cfg.n_kv_heads) for _ in range(cfg.n_layer)]}
    slots = num_core_slots(plan.lookup, plan.max_depth, cfg.n_core)
    return {
        "prelude": [kv(cfg.n_kv_heads) for _ in range(cfg.n_prelude)],
        "core": kv(cfg.rec_heads, (slots,)),
        "coda": [kv(cfg.n_kv_heads) for _ in range(cfg.n_coda)],
    }


def cache_bytes(cache) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


# ---------------------------------------------------------------------------------------------------
# Cache slots handed to the model's own blocks
# ---------------------------------------------------------------------------------------------------


class _Chunk(NamedTuple):
    """Where a chunk of tokens sits: row indices [B, 1], positions [B, T] and the attention mask
    [B, T, L] (key position <= query position)."""

    rows: Array
    positions: Array
    mask: Array

    def write(self, buffer, new, slot=None):
        """`new` [B, T, H, D] stored at the chunk's positions of `buffer` [(S,) B, L, H, D]."""
        index = (self.rows, self.positions) if slot is None else (slot, self.rows, self.positions)
        return buffer.at[index].set(new.astype(buffer.dtype))


class _StageCache:
    """The (K, V) buffers of one stage (one pair per layer). `slot(i)` is layer i's `layers.KVSlot`: it
    stores the chunk's K/V and hands the whole buffer back; `buffers` then holds the updated pairs."""

    def __init__(self, chunk: _Chunk, buffers):
        self.chunk, self.buffers = chunk, list(buffers)

    def slot(self, i: int):
        def kv(k, v):
            K, V = self.buffers[i]
            self.buffers[i] = (self.chunk.write(K, k), self.chunk.write(V, v))
            return (*self.buffers[i], self.chunk.mask)

        return kv


# ---------------------------------------------------------------------------------------------------
# Cached forward
# ---------------------------------------------------------------------------------------------------


def forward_chunk(
    model,
    cache: dict,
    ids: Int[Array, "B T"],
    positions: Int[Array, "B T"],
    h0: Float[Array, "B T Dr"] | None,
    num_steps,
    exit_eps,
    plan: CachePlan,
):
    """Run a chunk of tokens through the cached model (call inside jit).

    `positions` are the tokens' real positions (< plan.max_len); `h0` their initial recurrent states;
    `num_steps` (<= plan.max_depth) and `exit_eps` may be traced. Returns (logits [B, T, V_padded]
    fp32, updated cache, recurrences used per token int32 [B, T]; GPT: zeros).
    """
    cfg = model.config
    B, T = ids.shape
    positions = jnp.asarray(positions, jnp.int32)
    mask = jnp.arange(plan.max_len)[None, None, :] <= positions[:, :, None]
    chunk = _Chunk(jnp.arange(B)[:, None], positions, mask)
    if cfg.arch == "gpt":
        layers = _StageCache(chunk, cache["h"])
        logits = model(ids, positions=positions, layer_kv=layers.slot)
        return logits, {"h": layers.buffers}, jnp.zeros((B, T), jnp.int32)

    rope = model.rope(ids, positions)
    prelude = _StageCache(chunk, cache["prelude"])
    e = model.prelude_forward(ids, rope, prelude.slot)
    h, core, depth = _core_loop(model, chunk, ids, e, rope, h0, cache, num_steps, exit_eps, plan)
    coda = _StageCache(chunk, cache["coda"])
    logits = model.coda_forward(h, ids, rope, coda.slot)
    return logits, {"prelude": prelude.buffers, "core": core, "coda": coda.buffers}, depth


def _core_loop(model, chunk: _Chunk, ids, e, rope, h0, cache, num_steps, exit_eps, plan: CachePlan):
    """The model's recurrence step over the core slots (`loop.recur`, with exits); returns (final h,
    core (K, V), depth [B, T])."""
    cfg = model.config
    R, criterion = cfg.n_core, plan.exit_criterion
    reuse_last = criterion is not None and plan.exited_kv == "last"
    num_steps = jnp.asarray(num_steps, jnp.int32)
    exit_eps = jnp.asarray(exit_eps, jnp.float32)
    step, args = model.recurrence(ids, e, rope, training=False)
    B, T = ids.shape

    def write(core, slot, k, v):
        return chunk.write(core[0], k, slot), chunk.write(core[1], v, slot)

    def log_probs(h):
        coda = _StageCache(chunk, cache["coda"])  # reads the coda cache; its writes are dropped
        logits = model.coda_forward(h, ids, rope, coda.slot)
        return jax.nn.log_softmax(logits[..., : cfg.vocab_size], axis=-1)

    def cached_step(r, h, carry, run):
        """One recurrence writing its core K/V (with `last`, exited tokens write their last K/V
        instead of this step's)."""
        core, last, logp = carry
        written = []

        def layer_kv(j):
            slot = core_slot(plan.lookup, r * R + j, num_steps, R)

            def kv(k, v):
                nonlocal core
                if last is not None:
                    keep = run[:, :, None, None]
                    k, v = jnp.where(keep, k, last[0][j]), jnp.where(keep, v, last[1][j])
                written.append((k, v))
                core = write(core, slot, k, v)
                return core[0][slot], core[1][slot], chunk.mask

            return kv

        h_new = step(args, h, layer_kv)
        if reuse_last:
            last = (jnp.stack([k for k, _ in written]), jnp.stack([v for _, v in written]))
        converged = None
        if criterion == "residual":
            converged = rel_residual(h_new, h) < exit_eps
        elif criterion == "kl":
            logp_new = log_probs(jnp.where(run[..., None], h_new, h))
            converged = jnp.sum(jnp.exp(logp_new) * (logp_new - logp), axis=-1) < exit_eps
            logp = logp_new
        return h_new, (core, last, logp), converged

    dt, H, D = jnp.dtype(cfg.compute_dtype), cfg.rec_heads, cfg.head_size
    last = (jnp.zeros((R, B, T, H, D), dt),) * 2 if reuse_last else None
    logp = log_probs(h0) if criterion == "kl" else None
    out = recur(cached_step, h0, count=num_steps, bound=num_steps, carry=(cache["core"], last, logp),
                stop_when_done=reuse_last)
    core, last, _ = out.carry
    if reuse_last:  # every token exited early: give the skipped steps' slots their last K/V

        def fill(r, core):
            for j in range(R):
                core = write(core, core_slot(plan.lookup, r * R + j, num_steps, R), last[0][j], last[1][j])
            return core

        core = jax.lax.fori_loop(out.steps, num_steps, fill, core)
    return out.h, core, out.depth
