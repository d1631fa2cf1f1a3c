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
        return {}


class AddInjection(nnx.Module):
    """h ← h + e (requires d_rec == n_embd); no parameters."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        del cfg, rngs

    def input_term(self, e):
        return e.astype(jnp.float32)

    def __call__(self, h, e_term):
        return h.astype(jnp.float32) + e_term

    def telemetry(self):
        return {}


def make_injection(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    cls = {"diagonal": DiagonalInjection, "linear": LinearInjection, "add": AddInjection}[cfg.injection_type]
    return cls(cfg, rngs)
