"""Initialisation statistics of a fresh 140M Parcae (spec §4.2) and training depth sampling (§5)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_parcae

from parcae_jax import presets
from parcae_jax.config import ModelConfig
from parcae_jax.model import build_model
from parcae_jax.recurrence import max_grad_steps, sample_depths, targets


@pytest.fixture(scope="module")
def small_140m():
    cfg = ModelConfig.from_dict(presets.released("parcae-small-140m"))
    build = jax.jit(lambda: nnx.split(build_model(cfg)))
    graph, state = build()
    return cfg, nnx.merge(graph, state)


def _gram_is_scaled_identity(m: np.ndarray, scale: float, tol: float = 1e-3):
    # fp32 is ample for a 1e-3 tolerance; XLA's matmul, because NumPy's takes ~20 s for these grams here.
    m = jnp.asarray(m)
    g = np.asarray(jnp.dot(m, m.T, precision=jax.lax.Precision.HIGHEST))
    np.testing.assert_allclose(np.diag(g), scale, rtol=tol)
    off = g - np.diag(np.diag(g))
    assert np.abs(off).max() < tol * scale


def test_every_parameter_kind_has_the_official_init(small_140m):
    cfg, m = small_140m
    d, V = 768, 32768
    std = math.sqrt(2 / (5 * d))
    # wte (V, d), trunc-orthogonal: EᵀE = V·std²·I, entries with RMS std.
    wte = np.asarray(m.wte.embedding[...])
    _gram_is_scaled_identity(wte.T, V * std**2)
    assert abs(wte.std() - std) < 1e-4
    for stage in ("prelude", "core_block", "coda"):
        for blk in getattr(m, stage):
            for name in ("c_q", "c_k", "c_v"):  # square: W Wᵀ = std²·d·I = 0.4·I
                _gram_is_scaled_identity(np.asarray(getattr(blk.attn, name).kernel[...]).T, 0.4)
            # fc (torch (4d, d), tall): WᵀW = std²·4d·I = 1.6·I; our kernel is Wᵀ.
            _gram_is_scaled_identity(np.asarray(blk.mlp.fc.kernel[...]), 1.6)
            assert not np.any(np.asarray(blk.attn.c_proj.kernel[...]))
            assert not np.any(np.asarray(blk.mlp.proj.kernel[...]))
            for norm in (blk.norm_1, blk.norm_2):
                assert np.all(np.asarray(norm.scale[...]) == 1.0)
            if blk.attn.ve_gate is not None:  # nn.Linear default U(±1/√32)
                g = np.asarray(blk.attn.ve_gate.kernel[...])
                assert np.abs(g).max() <= 1 / math.sqrt(32) and g.shape == (32, 6)
    _gram_is_scaled_identity(np.asarray(m.C.kernel[...]).T, 0.4)
    assert np.all(np.asarray(m.adapter.A_log[...]) == 0.0)
    np.testing.assert_allclose(np.asarray(m.adapter.dt_bias[...]), 0.211935, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(m.adapter.B[...]), np.eye(d))
    decay, dt = m.adapter.coefficients()
    np.testing.assert_allclose(np.asarray(decay), 1 / math.sqrt(5), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dt), 0.5 * math.log(5), rtol=1e-6)
    assert np.all(np.asarray(m.ln_f.scale[...]) == 1) and np.all(np.asarray(m.ln_prelude.scale[...]) == 1)
    for table in m.value_embeds.values():  # nn.Embedding default N(0, 1)
        ve = np.asarray(table.embedding[...])
        assert abs(ve.std() - 1.0) < 0.01 and abs(ve.mean()) < 0.01
    assert m.lm_head is None  # tied


def test_every_parameter_carries_logical_axes(small_140m):
    _, m = small_140m
    for path, var in nnx.to_flat_state(nnx.state(m, nnx.Param)):
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == var[...].ndim, path


def test_initial_state_like_init():
    from parcae_jax.model import init_state

    cfg = tiny_parcae()
    h = np.asarray(init_state(jax.random.key(0), cfg, (64, 32, 32)))
    std = math.sqrt(2 / (5 * 32))
    assert np.abs(h).max() <= 3 * std + 1e-6
    assert abs(h.std() / std - 0.986) < 0.02  # std of N(0,1) truncated at ±3 is 0.9866
    for kind in ("normal", "embed", "zero", "unit"):
        x = np.asarray(init_state(jax.random.key(0), cfg.replace(state_init=kind), (4, 8, 32)))
        assert x.shape == (4, 8, 32)
    unit = np.asarray(init_state(jax.random.key(0), cfg.replace(state_init="unit"), (4, 8, 32)))
    np.testing.assert_allclose(unit.std(-1, ddof=1), 1.0, rtol=1e-5)


def _draw(cfg, step=0, n=4000):
    return sample_depths(jax.random.key(3), cfg, step, (n, 16))


def test_released_sampling_poisson_truncated_full_per_sequence():
    cfg = tiny_parcae(mean_recurrence=8, mean_backprop_depth=4)
    n, k = _draw(cfg)
    total = np.asarray(n + k)
    assert n.shape == (4000,)
    assert total.min() >= 1 and abs(total.mean() - 8) < 0.2  # Poisson(8), at least 1
    np.testing.assert_array_equal(np.asarray(k), np.minimum(total, 4))
    assert max_grad_steps(cfg) == 4


@pytest.mark.parametrize(
    "scheme,method,check",
    [
        ("fixed", "per-sequence", lambda n, k: (n == 4).all() and (k == 4).all()),
        ("poisson-full", "per-sequence", lambda n, k: (n == 0).all() and abs(k.mean() - 8) < 0.3),
        ("poisson-fill", "per-sequence", lambda n, k: abs(n.mean() - 4) < 0.2 and (k == 4).all()),
        ("poisson-truncated-full", "per-token", lambda n, k: n.shape == (4000, 16)),
        ("poisson-unbounded", "per-batch", lambda n, k: n.shape == () and 1 <= k <= 8),
        ("poisson-bounded", "per-batch", lambda n, k: n <= 7 and 1 <= k <= 8),
    ],
)
def test_sampling_schemes(scheme, method, check):
    cfg = tiny_parcae(
        mean_recurrence=8, mean_backprop_depth=4, sampling_scheme=scheme, recurrent_iteration_method=method
    )
    n, k = _draw(cfg)
    assert check(np.asarray(n), np.asarray(k))
    assert int(jnp.max(k)) <= max_grad_steps(cfg)


def test_per_batch_truncated_full_keeps_the_official_quirk():
    cfg = tiny_parcae(mean_recurrence=8, mean_backprop_depth=4, recurrent_iteration_method="per-batch")
    totals = [int(sum(sample_depths(jax.random.key(s), cfg, 0, (2, 4)))) for s in range(400)]
    assert abs(np.mean(totals) - 12) < 0.6  # n + min(n, s): mean ≈ r̄ + s (spec §5.2)


def test_curricula():
    cfg = tiny_parcae(mean_recurrence=8, mean_backprop_depth=4, sampling_scheme="poisson-fill-curriculum-100")
    assert [float(targets(cfg, s)[0]) for s in (0, 50, 100, 500)] == [0.0, 2.0, 4.0, 4.0]
    sq = cfg.replace(sampling_scheme="poisson-fill-curriculum-sqrt-100", curriculum_target="both")
    t, s = targets(sq, 75)  # p = 1 - sqrt(0.25) = 0.5
    assert (float(t), float(s)) == (2.0, 2.0)
    back = cfg.replace(curriculum_target="backward")
    assert [float(targets(back, s)[1]) for s in (0, 10)] == [1.0, 1.0]
