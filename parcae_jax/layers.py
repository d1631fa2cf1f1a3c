"""Transformer building blocks shared by Parcae and GPT (PARCAE_SPEC §2.3-2.8).

Every parameter is an `nnx.Param` carrying `logical_axes` metadata (see `sharding.py`). Linear
kernels are stored `(in, out)`; the official PyTorch `(out, in)` layout is handled by `convert.py`.
Parameters live in `param_dtype` (fp32); matmuls run in `compute_dtype`; norms, RoPE and softmax in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from parcae_jax import attention
from parcae_jax import init as inits
from parcae_jax.config import VE_GATE_CHANNELS, ModelConfig

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]
# A cache slot for one attention layer:
# (k, v) [B, T, Hkv, D] -> (keys, values [B, L, Hkv, D], mask [B, T, L]).
KVSlot = Callable[[Array, Array], tuple[Array, Array, Array]]

# PyTorch's F.rms_norm default eps is the fp32 machine epsilon even for bf16 inputs (spec §2.4 step 6).
QK_NORM_EPS = float(jnp.finfo(jnp.float32).eps)


def param(rngs: nnx.Rngs, init_fn: Initializer, shape, dtype, axes: tuple[str | None, ...]) -> nnx.Param:
    return nnx.Param(init_fn(rngs.params(), tuple(shape), dtype), logical_axes=axes)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel (in, out)."""

    def __init__(self, d_in, d_out, *, axes, init_fn, use_bias, cfg: ModelConfig, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.kernel = param(rngs, init_fn, (d_in, d_out), pdt, axes)
        self.bias = param(rngs, inits.zeros, (d_out,), pdt, (axes[1],)) if use_bias else None
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)

    def __call__(self, x: Array) -> Array:
        y = jnp.dot(x.astype(self.compute_dtype), self.kernel[...].astype(self.compute_dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.compute_dtype)
        return y


class Embed(nnx.Module):
    """Lookup table (V, width); `attend` computes x @ tableᵀ for a tied head."""

    def __init__(self, num, width, *, axes, init_fn, cfg: ModelConfig, rngs: nnx.Rngs):
        self.embedding = param(rngs, init_fn, (num, width), jnp.dtype(cfg.param_dtype), axes)

    def __call__(self, ids: Int[Array, ...]) -> Array:
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, x: Array, dtype) -> Array:
        return jnp.dot(x.astype(dtype), self.embedding[...].astype(dtype).T)


def rms_normalize(x: Array, eps: float) -> Array:
    """x / sqrt(mean(x^2) + eps) over the last axis, in fp32."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


class Norm(nnx.Module):
    """RMSNorm (`scale`) or LayerNorm (`scale`, `bias`); normalisation in fp32, output fp32."""

    def __init__(self, width, cfg: ModelConfig):
        pdt = jnp.dtype(cfg.param_dtype)
        # Officially `simple_ops` forces RMSNorm whatever norm_class_name says.
        self.kind = "RMSNorm" if cfg.simple_ops else cfg.norm_class_name
        self.eps = cfg.norm_eps
        self.scale = nnx.Param(jnp.ones((width,), pdt), logical_axes=("norm",))
        self.bias = (
            nnx.Param(jnp.zeros((width,), pdt), logical_axes=("norm",)) if self.kind == "LayerNorm" else None
        )

    def __call__(self, x: Array) -> Float[Array, ...]:
        if self.kind == "RMSNorm":
            return rms_normalize(x, self.eps) * self.scale[...].astype(jnp.float32)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


def rope_table(cfg: ModelConfig) -> tuple[Float[Array, "L D2"], Float[Array, "L D2"]]:
    """cos/sin of θ[p, j] = (p / condense) * base^(-2j/D_h), fp32 (same formula as the official table)."""
    d = cfg.head_size
    inv_freq = 1.0 / (cfg.rope_base ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    pos = jnp.arange(cfg.rope_table_length, dtype=jnp.float32) / cfg.rope_condense_ratio
    angles = jnp.outer(pos, inv_freq)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Float[Array, "B T N D"], cos: Float[Array, "B T D2"], sin) -> Array:
    """Interleaved ("complex-like") RoPE: channels (2j, 2j+1) rotate by θ_j. Computed in fp32."""
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    a, b = x32[..., 0], x32[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = jnp.stack([a * c - b * s, b * c + a * s], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


class Attention(nnx.Module):
    """Causal self-attention with RoPE, QK-norm, GQA and value-embedding mixing (spec §2.4)."""

    def __init__(self, cfg: ModelConfig, *, width, heads, kv_heads, init_std, has_gate, rngs: nnx.Rngs):
        self.heads, self.kv_heads = heads, kv_heads
        self.head_dim = width // heads
        self.cfg_qk_norm = cfg.qk_norm
        self.clip_qkv = cfg.clip_qkv
        self.use_rope = cfg.use_rope
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)
        self.attention_impl = cfg.attention_impl
        qkv_init = inits.matrix(cfg, init_std)
        kw = dict(use_bias=cfg.bias, cfg=cfg, rngs=rngs)
        self.c_q = Linear(width, heads * self.head_dim, axes=("embed", "heads"), init_fn=qkv_init, **kw)
        self.c_k = Linear(width, kv_heads * self.head_dim, axes=("embed", "kv_heads"), init_fn=qkv_init, **kw)
        self.c_v = Linear(width, kv_heads * self.head_dim, axes=("embed", "kv_heads"), init_fn=qkv_init, **kw)
        self.c_proj = Linear(
            heads * self.head_dim, width, axes=("heads", "embed"), init_fn=inits.out_proj(cfg, init_std), **kw
        )
        # Official default nn.Linear init U(-1/sqrt(32), 1/sqrt(32)), never re-initialised.
        self.ve_gate = (
            Linear(
                VE_GATE_CHANNELS,
                kv_heads,
                axes=(None, "kv_heads"),
                init_fn=inits.uniform(1 / math.sqrt(VE_GATE_CHANNELS)),
                use_bias=False,
                cfg=cfg,
                rngs=rngs,
            )
            if has_gate
            else None
        )
        self.qk_bias = (
            param(rngs, inits.zeros, (2, 1, heads, self.head_dim), jnp.dtype(cfg.param_dtype), (None,) * 4)
            if cfg.qk_bias
            else None
        )

    def qkv(self, x: Array, ve: Array | None, cos, sin):
        """Projections, VE mixing, clip, bias, RoPE and QK-norm: returns q [B,T,H,D], k/v [B,T,Hkv,D]."""
        B, T, _ = x.shape
        q = self.c_q(x).reshape(B, T, self.heads, self.head_dim)
        k = self.c_k(x).reshape(B, T, self.kv_heads, self.head_dim)
        v = self.c_v(x).reshape(B, T, self.kv_heads, self.head_dim)
        if self.ve_gate is not None and ve is not None:
            gate = 2.0 * jax.nn.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]).astype(jnp.float32))
            ve = ve.reshape(B, T, self.kv_heads, self.head_dim).astype(jnp.float32)
            v = (v.astype(jnp.float32) + gate[..., None] * ve).astype(v.dtype)
        if self.clip_qkv is not None:
            q, k, v = (jnp.clip(t, -self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        if self.qk_bias is not None:
            q = q + self.qk_bias[0].astype(q.dtype)
            k = k + self.qk_bias[1].astype(k.dtype)
        if self.use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cfg_qk_norm:
            q = rms_normalize(q, QK_NORM_EPS).astype(q.dtype)
            k = rms_normalize(k, QK_NORM_EPS).astype(k.dtype)
        return q, k, v

    def __call__(self, x: Array, ve: Array | None, cos, sin, kv: KVSlot | None = None) -> Array:
        """Causal attention over the chunk itself, or (with `kv`) over a cache slot: `kv(k, v)` stores
        the chunk's keys/values and returns (keys, values [B, L, Hkv, D], mask [B, T, L]) to attend to.
        The decode engine (kv_cache.py) only owns the buffers behind `kv`."""
        B, T, _ = x.shape
        x = x.astype(self.compute_dtype)
        q, k, v = self.qkv(x, ve, cos, sin)
        if kv is None:
            y = attention.attend(q, k, v, self.attention_impl)
        else:
            keys, values, mask = kv(k, v)
            y = attention.attend(q, keys, values, self.attention_impl, mask=mask[:, None])
        return self.c_proj(y.reshape(B, T, self.heads * self.head_dim))


def activation(name: str) -> Callable[[Array], Array]:
    """`nonlin_name`: the official ReLU2 (with its 1/2) or a torch.nn activation class name."""
    table = {
        "ReLU2": lambda x: 0.5 * jnp.square(jax.nn.relu(x)),
        "GELU": lambda x: jax.nn.gelu(x, approximate=False),  # torch default: exact erf form
        "ReLU": jax.nn.relu,
        "SiLU": jax.nn.silu,
        "Tanh": jnp.tanh,
        "Sigmoid": jax.nn.sigmoid,
        "Mish": jax.nn.mish,
        "ELU": jax.nn.elu,
        "SELU": jax.nn.selu,
        "Softplus": jax.nn.softplus,
        "Identity": lambda x: x,
    }
    if name not in table:
        raise ValueError(f"unknown nonlin_name {name!r}; supported: {sorted(table)}")
    return table[name]


class MLP(nnx.Module):
    """BaseMLP proj(φ(fc(x))) or GatedMLP proj(φ(a) * b) with (a, b) = split(fc(x))."""

    def __init__(self, cfg: ModelConfig, *, width, hidden, init_std, rngs: nnx.Rngs):
        self.gated = cfg.mlp_class_name == "GatedMLP"
        self.act = activation(cfg.nonlin_name)
        kw = dict(use_bias=cfg.bias, cfg=cfg, rngs=rngs)
        fc_out = 2 * hidden if self.gated else hidden
        self.fc = Linear(width, fc_out, axes=("embed", "mlp"), init_fn=inits.matrix(cfg, init_std), **kw)
        self.proj = Linear(hidden, width, axes=("mlp", "embed"), init_fn=inits.out_proj(cfg, init_std), **kw)

    def __call__(self, x: Array) -> Array:
        h = self.fc(x)
        if self.gated:
            a, b = jnp.split(h, 2, axis=-1)
            h = self.act(a) * b
        else:
            h = self.act(h)
        return self.proj(h)


class Block(nnx.Module):
    """Pre-norm block: x + Attn(norm_1(x)), then x + MLP(norm_2(x)). Residual stream in fp32."""

    def __init__(self, cfg: ModelConfig, *, width, heads, kv_heads, hidden, has_gate, rngs: nnx.Rngs):
        init_std = math.sqrt(2.0 / (5.0 * width))
        self.norm_1 = Norm(width, cfg)
        self.attn = Attention(
            cfg, width=width, heads=heads, kv_heads=kv_heads, init_std=init_std, has_gate=has_gate, rngs=rngs
        )
        self.norm_2 = Norm(width, cfg)
        self.mlp = MLP(cfg, width=width, hidden=hidden, init_std=init_std, rngs=rngs)

    def __call__(self, x: Float[Array, "B T W"], ve: Array | None, cos, sin, kv: KVSlot | None = None
                 ) -> Float[Array, "B T W"]:
        x = x + self.attn(self.norm_1(x), ve, cos, sin, kv).astype(jnp.float32)
        return x + self.mlp(self.norm_2(x)).astype(jnp.float32)
