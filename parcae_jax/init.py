"""Parameter initialisers of the official `scaled-zero` (+ orthogonal) scheme (PARCAE_SPEC §4).

Initialisers take `(key, shape, dtype)` with shapes in our layout (linear kernels `(in, out)`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from parcae_jax.config import ModelConfig

SUPPORTED_STRATEGIES = ("scaled-zero", "scaled")

zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones


def check_strategy(cfg: ModelConfig) -> None:
    if cfg.init_strategy not in SUPPORTED_STRATEGIES:
        raise ValueError(
            f"init_strategy {cfg.init_strategy!r} is not implemented; supported: {SUPPORTED_STRATEGIES} "
            "(the released configs use 'scaled-zero'). Weights loaded from a checkpoint need no init."
        )


def constant(value: float):
    return jax.nn.initializers.constant(value)


def uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def normal(std: float):
    return jax.nn.initializers.normal(std)


def trunc_normal(std: float):
    """N(0, std²) truncated at ±3·std (PyTorch `trunc_normal_(0, std, -3std, 3std)`)."""
    if std == 0:
        return zeros
    return jax.nn.initializers.truncated_normal(stddev=std, lower=-3.0, upper=3.0)


def trunc_orthogonal(std: float):
    """Semi-orthogonal matrix whose entries have RMS `std`: gain = std·√max(rows, cols).

    The official code orthogonalises a truncated-normal draw; the distribution of the resulting
    orthogonal factor is (up to the truncation) the same Haar measure jax's `orthogonal` samples.
    """
    if std == 0:
        return zeros

    def init(key, shape, dtype=jnp.float32):
        gain = std * math.sqrt(max(shape))
        return jax.nn.initializers.orthogonal(scale=gain)(key, shape, dtype)

    return init


def matrix(cfg: ModelConfig, std: float):
    """q/k/v/fc/C/wte/head: truncated orthogonal, or truncated normal without `init_orthogonal`."""
    return trunc_orthogonal(std) if cfg.init_orthogonal else trunc_normal(std)


def out_proj(cfg: ModelConfig, std: float):
    """Attention and MLP output projections: zero under scaled-zero; `scaled` shrinks by √(2·depth)."""
    if cfg.init_strategy == "scaled-zero":
        return zeros
    depth = (
        cfg.derived_n_layer
        if cfg.arch == "gpt"
        else cfg.n_prelude + cfg.n_coda + cfg.n_core * cfg.mean_recurrence
    )
    return matrix(cfg, std / math.sqrt(2 * depth))


# Injection: A_log = 0 (A = 1); dt_bias = softplus⁻¹(-ln ρ) with ρ = √(1/5), so exp(-Δ·A) = ρ at init.
SSM_DECAY = math.sqrt(1 / 5)
DT_BIAS_INIT = math.log(math.exp(-math.log(SSM_DECAY)) - 1)


def identity_or_orthogonal(key, shape, dtype=jnp.float32):
    """`B` (stored (d_r, d)): identity if square, else orthogonal with gain 1."""
    if shape[0] == shape[1]:
        return jnp.eye(shape[0], dtype=dtype)
    return jax.nn.initializers.orthogonal(scale=1.0)(key, shape, dtype)
