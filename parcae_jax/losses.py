"""Token losses, computed in fp32 (PARCAE_SPEC §7.6)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

IGNORE_INDEX = -100


def token_losses(
    logits: Float[Array, "B T V"], labels: Int[Array, "B T"]
) -> tuple[Float[Array, "B T"], Float[Array, "B T"]]:
    """(nll, logsumexp) per position in fp32; nll is 0 where the label is negative (`IGNORE_INDEX`, or
    the -1 the scorer pads with)."""
    logits = logits.astype(jnp.float32)
    valid = labels >= 0
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, lse - target, 0.0), lse


def cross_entropy(
    logits: Float[Array, "B T V"], labels: Int[Array, "B T"], *, mask: Array | None = None
) -> tuple[jax.Array, dict]:
    """Mean token cross-entropy over positions with a non-negative label (and `mask`, if given).

    Returns (loss, aux) with aux the summed loss `nll_sum` and the token count `tokens`.
    """
    valid = labels >= 0
    if mask is not None:
        valid = valid & mask.astype(bool)
    nll, _ = token_losses(logits, labels)
    nll = jnp.where(valid, nll, 0.0)
    count = jnp.sum(valid)
    loss = jnp.sum(nll) / jnp.maximum(count, 1).astype(jnp.float32)
    return loss, {"nll_sum": jnp.sum(nll), "tokens": count}


def chunk_count(length: int, chunk_len: int) -> int:
    """How many equal sequence chunks of at most `chunk_len` tokens split `length` (1: no chunking,
    also for `chunk_len` 0). The smallest count whose chunks fit, so chunks stay as long as allowed."""
    if chunk_len <= 0 or length <= chunk_len:
        return 1
    return next(c for c in range(-(-length // chunk_len), length + 1) if length % c == 0)


def over_chunks(fn: Callable, chunk_len: int, x: Float[Array, "B T D"], labels: Int[Array, "B T"],
                *, remat: bool = False):
    """`fn(x_chunk, labels_chunk)` -> a tuple of [B, Tc] arrays, over sequence chunks of at most
    `chunk_len` tokens, concatenated back to [B, T] each.

    Why by hand: no library (optax included) fuses the LM head with its loss. `fn` applies the head,
    so the fp32 logits of only one chunk [B, Tc, V] exist at a time; with `remat` each chunk runs under
    `jax.checkpoint`, so the backward recomputes a chunk's logits instead of keeping them all. A sequence
    that fits one chunk runs as it is: its logits are within the bound, so recomputing them buys nothing."""
    B, T = labels.shape
    chunks = chunk_count(T, chunk_len)
    if chunks == 1:
        return fn(x, labels)
    if remat:
        fn = jax.checkpoint(fn)
    xs = x.reshape(B, chunks, T // chunks, x.shape[-1]).swapaxes(0, 1)
    ls = labels.reshape(B, chunks, T // chunks).swapaxes(0, 1)
    outs = jax.lax.map(lambda a: fn(*a), (xs, ls))
    return tuple(o.swapaxes(0, 1).reshape(B, T) for o in outs)
