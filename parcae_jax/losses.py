"""Token losses, computed in fp32 (PARCAE_SPEC §7.6)."""

from __future__ import annotations

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
