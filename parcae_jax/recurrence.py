"""Training-time depth sampling (PARCAE_SPEC §5.1-5.5).

`sample_depths` returns `(n, k)`: per-element numbers of gradient-free and gradient-carrying
recurrences, with shape `()` (per-batch), `(B,)` (per-sequence) or `(B, T)` (per-token). Everything is
traced (step included) so one compiled train step serves every sampled depth. PyTorch's Poisson
stream cannot be reproduced bit for bit; the distributions are the official ones.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp

from parcae_jax.config import ITERATION_METHODS, ModelConfig


def targets(cfg: ModelConfig, step) -> tuple[jax.Array, jax.Array]:
    """(t, s): mean gradient-free and gradient steps at `step`, after any curriculum (spec §5.4)."""
    t_full = max(cfg.mean_recurrence - cfg.mean_backprop_depth, 0)
    s_full = cfg.mean_backprop_depth
    t, s = jnp.asarray(t_full, jnp.float32), jnp.asarray(s_full, jnp.float32)
    m = re.search(r"curriculum-(sqrt-)?(\d+)", cfg.sampling_scheme)
    if m is None:
        return t, s
    length = float(m.group(2))
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / length, 0.0, 1.0)
    p = 1.0 - jnp.sqrt(1.0 - frac) if m.group(1) else frac
    target = cfg.curriculum_target
    if target in ("forward", "both"):
        t = jnp.ceil(p * t_full)
    if target in ("backward", "both"):
        s = jnp.maximum(jnp.ceil(p * s_full), 1.0)
    return t, s


def max_grad_steps(cfg: ModelConfig) -> int:
    """Static bound on k, the length of the gradient scan (masked beyond each element's own k)."""
    s = cfg.mean_backprop_depth
    scheme = cfg.sampling_scheme
    per_batch = cfg.recurrent_iteration_method == "per-batch"
    if "poisson-unbounded" in scheme or "poisson-bounded" in scheme:
        return 2 * s if per_batch else s
    if "poisson-fill" in scheme or "poisson-truncated-full" in scheme or "fixed" in scheme:
        return s
    if "poisson-full" in scheme:
        # k ~ max(Poisson(r̄), 1) has no upper bound: cap it where the tail mass is < 1e-6.
        lam = cfg.mean_recurrence
        return int(math.ceil(lam + 5 * math.sqrt(lam) + 2))
    return 2 * s if per_batch else s  # fallback is `poisson-unbounded`


def sample_depths(key: jax.Array, cfg: ModelConfig, step, batch_shape: tuple[int, ...], *, k_key=None):
    """Draw (n, k) int32 for one micro-batch; shape per `recurrent_iteration_method`.

    `step` is the curriculum counter (the official micro-batch counter, from 1): a scalar, or one value
    per sequence ([B], broadcast over tokens). Per-batch draws take n from `key` and k from `k_key`
    (the official code seeds them separately, which is what `lockstep_n` / `lockstep_k` share);
    without `k_key` both come from `key`.
    """
    method = cfg.recurrent_iteration_method
    if method not in ITERATION_METHODS:
        raise ValueError(f"recurrent_iteration_method {method!r}; expected one of {ITERATION_METHODS}")
    shape = {"per-batch": (), "per-sequence": batch_shape[:1], "per-token": batch_shape[:2]}[method]
    t, s = targets(cfg, step)
    t, s = (x.reshape(x.shape + (1,) * (len(shape) - x.ndim)) for x in (t, s))  # [B] -> [B, 1] per token
    scheme = cfg.sampling_scheme
    k_n, k_k = jax.random.split(key) if k_key is None else (key, k_key)

    def poisson(key, lam):
        return jax.random.poisson(key, lam, shape).astype(jnp.int32)

    def uniform_1_2s(key):
        return jax.random.randint(key, shape, 1, (2 * s).astype(jnp.int32) + 1)

    s_i = jnp.broadcast_to(s.astype(jnp.int32), shape)
    t_i = jnp.broadcast_to(t.astype(jnp.int32), shape)
    zeros = jnp.zeros(shape, jnp.int32)
    if method == "per-batch":
        if "poisson-unbounded" in scheme:
            n, k = poisson(k_n, t), uniform_1_2s(k_k)
        elif "poisson-fill" in scheme:
            n, k = poisson(k_n, t), s_i
        elif "poisson-truncated-full" in scheme:
            # Per-batch quirk kept (spec §5.2): runs n + min(n, s) steps in total.
            n = jnp.maximum(poisson(k_n, t + s), 1)
            k = jnp.minimum(n, s_i)
        elif "poisson-full" in scheme:
            n, k = zeros, jnp.maximum(poisson(k_k, t + s), 1)
        elif "poisson-bounded" in scheme:
            n = jnp.minimum(poisson(k_n, t), (2 * t - 1).astype(jnp.int32))
            k = uniform_1_2s(k_k)
        elif "fixed" in scheme:
            n, k = t_i, s_i
        else:
            n, k = poisson(k_n, t), uniform_1_2s(k_k)
    else:
        if "poisson-truncated-full" in scheme:
            total = jnp.maximum(poisson(k_n, t + s), 1)
            k = jnp.minimum(total, s_i)
            n = total - k
        elif "poisson-full" in scheme:
            n, k = zeros, jnp.maximum(poisson(k_n, t + s), 1)
        elif "fixed" in scheme:
            n, k = t_i, s_i
        else:
            n, k = poisson(k_n, t), s_i
    k = jnp.minimum(k, max_grad_steps(cfg))
    return jnp.maximum(n, 0), k
