"""How the prelude output `e` enters the loop state `h` each recurrence (PARCAE_SPEC §2.2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from parcae_jax import init as inits
from parcae_jax.config import ModelConfig
from parcae_jax.layers import Linear, param


class DiagonalInjection(nnx.Module):
    """Parcae: h ← exp(-Δ·A) ⊙ h + Δ ⊙ (e Bᵀ), A = exp(A_log), Δ = softplus(dt_bias).

    The state matrix diag(exp(-Δ·A)) has every entry in (0, 1) whatever the parameters, so the
    linear part of the loop is contractive by construction.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        dr, d = cfg.d_rec, cfg.n_embd
        self.A_log = param(rngs, inits.zeros, (dr,), pdt, ("state",))
        self.dt_bias = param(rngs, inits.constant(inits.DT_BIAS_INIT), (dr,), pdt, ("state",))
        self.B = param(rngs, inits.identity_or_orthogonal, (dr, d), pdt, ("state", "embed"))
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)

    def coefficients(self):
        """(decay exp(-Δ·A), Δ), both fp32 [d_r]."""
        dt = jax.nn.softplus(self.dt_bias[...].astype(jnp.float32))
        decay = jnp.exp(-dt * jnp.exp(self.A_log[...].astype(jnp.float32)))
        return decay, dt

    def input_term(self, e):
        """Δ ⊙ (e Bᵀ): depends only on e, so the loop computes it once, outside the recurrence."""
        _, dt = self.coefficients()
        eb = jnp.dot(e.astype(self.compute_dtype), self.B[...].astype(self.compute_dtype).T)
        return dt * eb.astype(jnp.float32)

    def __call__(self, h, e_term):
        decay, _ = self.coefficients()
        return decay * h.astype(jnp.float32) + e_term

    def telemetry(self):
        decay, _ = self.coefficients()
        return {"rho_A": jnp.max(decay), "mean_decay": jnp.mean(decay)}


class LinearInjection(nnx.Module):
    """Prior recurrent-depth models: h ← [h ; e] W_aᵀ (state first, embedding second)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        dr, d = cfg.d_rec, cfg.n_embd
        # Official: truncated normal (±3σ), σ = √(2/(5d)), never orthogonal.
        self.adapter = Linear(
            dr + d,
            dr,
            axes=("state_concat", "state"),
            init_fn=inits.trunc_normal(cfg.embedding_std),
            use_bias=cfg.bias,
            cfg=cfg,
            rngs=rngs,
        )
        self.d_rec = dr

    def input_term(self, e):
        # [h; e] W = h W_h + e W_e: the e half is loop-invariant, computed once.
        W = self.adapter.kernel[...]
        eb = jnp.dot(e.astype(self.adapter.compute_dtype), W[self.d_rec :].astype(self.adapter.compute_dtype))
        if self.adapter.bias is not None:
            eb = eb + self.adapter.bias[...].astype(eb.dtype)
        return eb.astype(jnp.float32)

    def __call__(self, h, e_term):
        W = self.adapter.kernel[...]
        cdt = self.adapter.compute_dtype
        return jnp.dot(h.astype(cdt), W[: self.d_rec].astype(cdt)).astype(jnp.float32) + e_term

    def telemetry(self):
        """rho_A: the spectral radius of the state block W_h (h ← h W_h + ...), nothing bounds it."""
        return {"rho_A": spectral_radius(self.adapter.kernel[: self.d_rec].astype(jnp.float32))}


class AddInjection(nnx.Module):
    """h ← h + e (requires d_rec == n_embd); no parameters."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        del cfg, rngs

    def input_term(self, e):
        return e.astype(jnp.float32)

    def __call__(self, h, e_term):
        return h.astype(jnp.float32) + e_term

    def telemetry(self):
        # The state matrix is the identity: every eigenvalue is 1, the loop is marginally stable at best.
        return {"rho_A": jnp.ones((), jnp.float32)}


def spectral_radius(matrix: jax.Array, squarings: int = 24) -> jax.Array:
    """max |eigenvalue| of a square fp32 matrix by Gelfand's formula, ρ = lim ‖Mᵏ‖^(1/k), with k = 2^24
    reached by repeated squaring (each square renormalised, so nothing overflows). Hand-written because
    `jnp.linalg.eigvals` of a non-symmetric matrix only runs on CPU, and this telemetry runs inside the
    train step on any backend. ‖Mᵏ‖_F / ρᵏ grows at most polynomially in k, so the 2^24-th root leaves a
    relative error below 1e-5 for the matrices a loop state can have."""

    def square(carry, _):
        m, log_rho, weight = carry
        norm = jnp.linalg.norm(m)
        m = m / norm
        return (m @ m, log_rho + weight * jnp.log(norm), weight / 2), None

    (m, log_rho, weight), _ = jax.lax.scan(
        square, (matrix, jnp.zeros((), matrix.dtype), jnp.ones((), matrix.dtype)), None, length=squarings
    )
    return jnp.exp(log_rho + weight * jnp.log(jnp.linalg.norm(m)))


def make_injection(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    cls = {"diagonal": DiagonalInjection, "linear": LinearInjection, "add": AddInjection}[cfg.injection_type]
    return cls(cfg, rngs)
