"""Token losses, computed in fp32 (PARCAE_SPEC §7.6)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

IGNORE_INDEX = -100


def token_losses(
    logits: Float[Array, "B T V"], labels: Int[Array, "B T"], *, ignore_index: int = IGNORE_INDEX
) -> tuple[Float[Array, "B T"], Float[Array, "B T"]]:
    """(nll, logsumexp) per position in fp32; nll is 0 where `label == ignore_index`."""
    logits = logits.astype(jnp.float32)
    valid = labels != ignore_index
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, lse - target, 0.0), lse


def cross_entropy(
    logits: Float[Array, "B T V"],
    labels: Int[Array, "B T"],
    *,
    mask: Array | None = None,
    ignore_index: int = IGNORE_INDEX,
    z_loss: float = 0.0,
) -> tuple[jax.Array, dict]:
    """Mean token cross-entropy over positions with `label != ignore_index` (and `mask`, if given).

    Returns (loss, aux) where aux has the summed loss, the token count and the optional z-loss term
    `z · mean(logsumexp²)` (already included in `loss`).
    """
    valid = labels != ignore_index
    if mask is not None:
        valid = valid & mask.astype(bool)
    nll, lse = token_losses(logits, labels, ignore_index=ignore_index)
    nll = jnp.where(valid, nll, 0.0)
    count = jnp.sum(valid)
    denom = jnp.maximum(count, 1).astype(jnp.float32)
    loss = jnp.sum(nll) / denom
    aux = {"nll_sum": jnp.sum(nll), "tokens": count}
    if z_loss:
        z = z_loss * jnp.sum(jnp.where(valid, jnp.square(lse), 0.0)) / denom
        aux["z_loss"] = z
        loss = loss + z
    return loss, aux
