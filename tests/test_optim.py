"""MuonAdamW (`parcae_jax.optim`) and its schedules against the spec (§7.3-§7.5).

The NumPy references below are re-derived from the spec's formulas, in the PyTorch `(out, in)` layout
(our kernels are `(in, out)`, so a wrong layout shows up as a mismatch).
"""

from __future__ import annotations

import collections
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

from parcae_jax import base_config, presets, schedules
from parcae_jax.config import ModelConfig
from parcae_jax.model import abstract_model, build_model
from parcae_jax.optim import (
    ADAMW,
    MUON,
    POLAR_EXPRESS_COEFFS,
    build_optimizer,
    optimizer_metrics,
    param_groups,
    param_label,
)

TINY_LINEAR = dict(
    presets.released("parcae-small-140m"),
    n_embd=64,
    num_attention_heads=2,
    num_key_value_heads=2,
    intermediate_size=128,
    recurrent_embedding_dimension=64,
    recurrent_intermediation_embedding_dimension=128,
    vocab_size=256,
    injection_type="linear",
)


def train_cfg(**overrides):
    cfg = base_config.base(presets.released("parcae-small-140m")).train
    cfg.skip_first_step = False  # these tests follow every update; test_skip_first_step covers the skip
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def labels_by_path(params) -> dict[str, tuple[str, tuple[int, ...]]]:
    """'/'-joined path -> (label, our shape)."""
    flat_labels = jax.tree_util.tree_flatten_with_path(param_groups(params))[0]
    shapes = [leaf.shape for leaf in jax.tree.leaves(params)]
    out = {}
    for (path, label), shape in zip(flat_labels, shapes, strict=True):
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", ""))) for k in path if not hasattr(k, "name"))
        out[name] = (label, shape)
    return out


# ----------------------------------------------------------------------------------------------------
# Grouping (spec §7.3)
# ----------------------------------------------------------------------------------------------------


def test_parcae_small_muon_shapes_match_spec():
    state = nnx.state(abstract_model(ModelConfig.from_dict(presets.released("parcae-small-140m"))), nnx.Param)
    groups = labels_by_path(state)
    # Spec shapes are PyTorch (out, in); ours are (in, out).
    muon_shapes = collections.Counter(shape[::-1] for label, shape in groups.values() if label == MUON)
    assert muon_shapes == {(768, 768): 24, (3072, 768): 6, (768, 3072): 6, (6, 32): 3}
    for name in ("adapter/B", "adapter/A_log", "adapter/dt_bias", "C/kernel", "wte/embedding",
                 "value_embeds/1/embedding", "ln_f/scale", "ln_prelude/scale", "core_block/0/norm_1/scale"):
        assert groups[name][0] == ADAMW, name
    assert groups["coda/1/attn/ve_gate/kernel"] == (MUON, (32, 6))


def test_gpt_and_linear_injection_grouping():
    gpt = labels_by_path(nnx.state(abstract_model(ModelConfig.from_dict(presets.released("gpt-small-140m"))),
                                   nnx.Param))
    muon = {name for name, (label, _) in gpt.items() if label == MUON}
    assert len(muon) == 6 * 6 + 3  # q, k, v, c_proj, fc, proj per layer + ve_gate on layers 1, 3, 5
    assert all(name.startswith("h/") and name.endswith("/kernel") for name in muon)
    adamw_names = ("wte/embedding", "value_embeds/3/embedding", "ln_f/scale", "h/2/norm_2/scale")
    assert {gpt[n][0] for n in adamw_names} == {ADAMW}

    lin = labels_by_path(nnx.state(abstract_model(ModelConfig.from_dict(TINY_LINEAR)), nnx.Param))
    assert lin["adapter/adapter/kernel"] == (ADAMW, (128, 64))
    assert lin["C/kernel"][0] == ADAMW
    assert lin["core_block/1/mlp/fc/kernel"] == (MUON, (64, 128))
    assert lin["prelude/0/attn/c_q/kernel"][0] == MUON


@pytest.mark.parametrize(
    "path, ndim, label",
    [
        ("lm_head/kernel", 2, ADAMW),
        ("h/0/attn/qk_bias", 2, ADAMW),
        ("h/0/mlp/fc/bias", 1, ADAMW),
        ("model/adapter/B", 2, ADAMW),  # wrapper prefixes do not matter
        ("h/0/attn/c_proj/kernel", 2, MUON),
        ("h/0/attn/c_proj/kernel", 1, ADAMW),  # ndim < 2
        ("core_block/0/attn/ve_gate/kernel", 2, MUON),
    ],
)
def test_param_label_rules(path, ndim, label):
    assert param_label(path, ndim) == label


# ----------------------------------------------------------------------------------------------------
# NumPy references (spec §7.3), PyTorch layout
# ----------------------------------------------------------------------------------------------------


def bf16(x):
    """Round to bfloat16 (and back to fp32 for the next NumPy op)."""
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def ref_muon(G, M, S, P, *, lr, mu, wd, beta2=0.95, ns_steps=5, rounding=None):
    """One spec Muon step on an (r, c) matrix: returns (new P, new M, new S). bf16 where the spec says."""
    bf16 = rounding or globals()["bf16"]
    M = mu * M + (1 - mu) * G
    U = (1 - mu) * G + mu * M
    X = bf16(U)
    X = bf16(X / bf16(bf16(np.linalg.norm(X) * 1.02) + 1e-6))
    r, c = X.shape
    for a, b, cc in POLAR_EXPRESS_COEFFS[:ns_steps]:
        if r > c:
            A = bf16(X.T @ X)
            X = bf16(bf16(a * X) + bf16(X @ bf16(bf16(b * A) + bf16(cc * bf16(A @ A)))))
        else:
            A = bf16(X @ X.T)
            X = bf16(bf16(a * X) + bf16(bf16(bf16(b * A) + bf16(cc * bf16(A @ A))) @ X))
    q = np.mean(X**2, axis=1 if r >= c else 0, keepdims=True)
    S = beta2 * S + (1 - beta2) * q
    sigma = 1 / np.sqrt(np.maximum(S, 1e-10))
    X = bf16(X * bf16(sigma * np.linalg.norm(X) / np.linalg.norm(X * sigma)))
    eta = bf16(lr * math.sqrt(max(1.0, r / c)))
    mask = X * P >= 0
    return P - bf16(eta * X) - bf16(eta * bf16(wd)) * P * mask, M, S


def ref_adamw(g, m, v, p, *, t, lr, b1, b2, eps, wd):
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g**2
    return p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps), m, v


# ----------------------------------------------------------------------------------------------------
# One / two optimiser steps against the references
# ----------------------------------------------------------------------------------------------------

# Our (in, out) shapes: (8, 16) is PyTorch 16 x 8 (r > c: lr x sqrt(2), per-row S), (16, 8) is 8 x 16
# (r < c: lr x 1, per-column S), (12, 12) square, (32, 6) the ve_gate shape.
MUON_SHAPES = {"fc": (8, 16), "proj": (16, 8), "c_q": (12, 12), "ve_gate": (32, 6)}
MAX_STEPS = 50


def small_params(rng):
    params = {"blk": {name: {"kernel": rng.normal(0, 0.5, s)} for name, s in MUON_SHAPES.items()}}
    params["blk"]["norm_1"] = {"scale": 1 + 0.1 * rng.normal(size=(8,))}
    params["wte"] = {"embedding": rng.normal(0, 0.5, (10, 8))}
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


@pytest.mark.parametrize("ortho_dtype", ["float32", "bfloat16"])
def test_two_steps_match_numpy_reference(ortho_dtype):
    """fp32: the step equals the spec re-derivation to rounding. bf16 (the recipe): the Polar-Express
    polynomial (coefficients up to 22) amplifies bf16 rounding, so two bf16 implementations that differ
    only in accumulation order differ by ~10-20% of η per entry; there the update must stay within 15%
    (relative Frobenius) of the exact fp32 update."""
    rounding = bf16 if ortho_dtype == "bfloat16" else (lambda x: np.asarray(x, np.float32))
    rng = np.random.default_rng(0)
    params = small_params(rng)
    assert {k: v["kernel"] for k, v in param_groups(params)["blk"].items() if k != "norm_1"} == \
        dict.fromkeys(MUON_SHAPES, MUON)
    cfg = train_cfg(lr=0.01, muon_lr=0.03, weight_decay=0.1, grad_clip=0.0, muon_ortho_dtype=ortho_dtype)
    tx = build_optimizer(params, cfg, MAX_STEPS)
    state = tx.init(params)
    np_params = jax.tree.map(np.asarray, params)
    moments = jax.tree.map(np.zeros_like, np_params)
    second = {
        n: np.zeros((s[1], 1) if s[1] >= s[0] else (1, s[0]), np.float32) for n, s in MUON_SHAPES.items()
    }
    adam_v = jax.tree.map(np.zeros_like, np_params)

    worst = 0.0
    for step in range(2):  # the second step exercises momentum and bias correction
        grads = jax.tree.map(lambda p: rng.normal(0, 1, p.shape).astype(np.float32), np_params)
        updates, state = jax.jit(tx.update)(jax.tree.map(jnp.asarray, grads), state, params)
        params = optax.apply_updates(params, updates)

        mu = 0.85 + min(step / 300, 1) * (0.95 - 0.85)
        wd = 0.2 * max(0.0, 1 - step / MAX_STEPS)
        for name in MUON_SHAPES:  # reference in the PyTorch layout: transpose in, transpose out
            p_old = np_params["blk"][name]["kernel"].T
            p_ref, m_ref, s_ref = ref_muon(
                grads["blk"][name]["kernel"].T, moments["blk"][name]["kernel"].T, second[name],
                p_old, lr=0.03, mu=mu, wd=wd, rounding=rounding,
            )
            got = np.asarray(params["blk"][name]["kernel"])
            if ortho_dtype == "float32":
                eta = 0.03 * math.sqrt(max(1.0, MUON_SHAPES[name][1] / MUON_SHAPES[name][0]))
                deviation = np.max(np.abs(got - p_ref.T)) / eta
                assert deviation < 1e-4, (name, step, deviation)
            else:
                exact, _, _ = ref_muon(
                    grads["blk"][name]["kernel"].T, moments["blk"][name]["kernel"].T, second[name],
                    p_old, lr=0.03, mu=mu, wd=wd, rounding=lambda x: np.asarray(x, np.float32),
                )
                # compare against the exact update from the same starting point
                got_update = got - np.asarray(np_params["blk"][name]["kernel"])
                deviation = np.linalg.norm(got_update - (exact - p_old).T) / np.linalg.norm(exact - p_old)
                assert deviation < 0.15, (name, step, deviation)
                p_ref = p_old + got_update.T  # follow our trajectory (bf16 noise must not compound)
            worst = max(worst, deviation)
            np_params["blk"][name]["kernel"] = p_ref.T
            moments["blk"][name]["kernel"], second[name] = m_ref.T, s_ref

        for path in (("blk", "norm_1", "scale"), ("wte", "embedding")):
            node_p, node_m, node_v, node_g = np_params, moments, adam_v, grads
            for key in path[:-1]:
                node_p, node_m, node_v, node_g = node_p[key], node_m[key], node_v[key], node_g[key]
            leaf = path[-1]
            node_p[leaf], node_m[leaf], node_v[leaf] = ref_adamw(
                node_g[leaf], node_m[leaf], node_v[leaf], node_p[leaf],
                t=step + 1, lr=0.01, b1=0.8, b2=0.95, eps=1e-10, wd=0.1,
            )
            got = params
            for key in path:
                got = got[key]
            got = np.asarray(got)
            np.testing.assert_allclose(got, node_p[leaf], rtol=2e-6, atol=1e-7)

    muon_state = optax.tree.get(state, "second_moment")
    assert muon_state["blk"]["fc"]["kernel"].shape == (16, 1)  # r = 16 >= c = 8: per-row statistics
    assert muon_state["blk"]["proj"]["kernel"].shape == (1, 16)  # r = 8 < c = 16: per-column
    print(f"max Muon deviation vs NumPy reference ({ortho_dtype}): {worst:.2e}")


def test_cautious_weight_decay_mask_is_mixed_and_matters():
    """With zero learning rate nothing moves; with wd only the 'towards zero' entries decay."""
    rng = np.random.default_rng(1)
    params = small_params(rng)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    tx_wd = build_optimizer(params, train_cfg(muon_wd=0.5, grad_clip=0.0), MAX_STEPS)
    tx_nowd = build_optimizer(params, train_cfg(muon_wd=0.0, grad_clip=0.0), MAX_STEPS)
    u_wd, _ = tx_wd.update(grads, tx_wd.init(params), params)
    u_nowd, _ = tx_nowd.update(grads, tx_nowd.init(params), params)
    p = np.asarray(params["blk"]["c_q"]["kernel"])
    decay = np.asarray(u_wd["blk"]["c_q"]["kernel"] - u_nowd["blk"]["c_q"]["kernel"])
    decayed = np.abs(decay) > 0
    assert 0.2 < decayed.mean() < 0.8  # the mask is data-dependent, not all-or-nothing
    eta_wd = float(bf16(bf16(8e-3) * bf16(0.5)))
    np.testing.assert_allclose(decay[decayed], -eta_wd * p[decayed], rtol=1e-5)
    # decayed entries are exactly those where the (no-wd) update X = -u/η has the parameter's sign
    x = -np.asarray(u_nowd["blk"]["c_q"]["kernel"])
    np.testing.assert_array_equal(decayed, (x * p >= 0) & (p != 0))


# ----------------------------------------------------------------------------------------------------
# Schedules (spec §7.3, §7.4)
# ----------------------------------------------------------------------------------------------------


def spec_lr(tau, *, kind, lr, min_lr, W, Cd, S):
    if W > 0 and tau < W:
        return lr * tau / W
    if Cd > 0 and tau > S - Cd:
        return max(lr * (S - tau) / Cd, min_lr)
    if tau > S:
        return min_lr
    if kind in ("trapezoid", "constant"):
        return lr
    s = (tau - W) / (S - W)
    if kind == "linear":
        return lr - s * (lr - min_lr)
    return min_lr + 0.5 * (1 + math.cos(math.pi * s)) * (lr - min_lr)


@pytest.mark.parametrize(
    "kind, warmup, cooldown, min_lr",
    [
        ("trapezoid", 0.0, 0.5, 0.0),  # the released recipe
        ("trapezoid", 0.2, 0.3, 1e-3),
        ("constant", 3, 0, 0.0),
        ("linear", 2, 0, 1e-3),
        ("cosine", 4, 0, 1e-4),
        ("cosine", 0.1, 6, 0.0),
        ("linear", 0.5, 0.8, 0.0),  # cool-down would start inside the warm-up
    ],
)
def test_lr_schedule_matches_spec(kind, warmup, cooldown, min_lr):
    S, lr = 20, 8e-3
    sched = schedules.lr_schedule(kind, lr, min_lr, warmup, cooldown, S)
    W, Cd = schedules.resolve_steps(warmup, S), schedules.resolve_steps(cooldown, S)
    for tau in range(S + 4):
        expected = spec_lr(tau, kind=kind, lr=lr, min_lr=min_lr, W=W, Cd=Cd, S=S)
        assert float(sched(tau)) == pytest.approx(expected, rel=1e-6, abs=1e-10), tau


def test_trapezoid_key_values():
    sched = schedules.lr_schedule("trapezoid", 8e-3, 0.0, 0.0, 0.5, 21_362)
    assert schedules.resolve_steps(0.5, 21_362) == 10_681
    cases = [(0, 8e-3), (10_681, 8e-3), (10_682, 8e-3 * 10_680 / 10_681), (16_021, 8e-3 * 5_341 / 10_681),
             (21_361, 8e-3 / 10_681), (21_362, 0.0)]
    for tau, expected in cases:
        assert float(sched(tau)) == pytest.approx(expected, rel=1e-5, abs=1e-12), tau


def test_muon_momentum_and_weight_decay_schedules():
    momentum = schedules.muon_momentum_schedule(0.85, 0.95, 300)
    for tau, expected in [(0, 0.85), (150, 0.90), (300, 0.95), (10_000, 0.95)]:
        assert float(momentum(tau)) == pytest.approx(expected, abs=1e-6)
    wd = schedules.muon_weight_decay_schedule(0.2, 1000)
    for tau, expected in [(0, 0.2), (250, 0.15), (1000, 0.0), (1500, 0.0)]:
        assert float(wd(tau)) == pytest.approx(expected, abs=1e-7)


def test_state_reports_the_hyperparameters_of_each_step():
    params = small_params(np.random.default_rng(2))
    cfg = train_cfg(lr=0.01, muon_lr=0.02, warmup_steps=4, cooldown_steps=0.0, muon_momentum_warmup_steps=8)
    tx = build_optimizer(params, cfg, 40)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    for tau in range(6):
        _, state = tx.update(grads, state, params)
        metrics = optimizer_metrics(state)
        assert int(metrics["optimizer_step"]) == tau + 1
        assert float(metrics["lr"]) == pytest.approx(0.01 * min(tau / 4, 1), abs=1e-9)
        assert float(metrics["muon_lr"]) == pytest.approx(0.02 * min(tau / 4, 1), abs=1e-9)
        assert float(metrics["muon_momentum"]) == pytest.approx(0.85 + min(tau / 8, 1) * 0.1, abs=1e-6)
        assert float(metrics["muon_wd"]) == pytest.approx(0.2 * (1 - tau / 40), abs=1e-7)


# ----------------------------------------------------------------------------------------------------
# Clipping and step skipping (spec §7.5)
# ----------------------------------------------------------------------------------------------------


def adam_first_moment(state, path=("wte", "embedding")):
    mu = optax.tree.get(state, "mu")
    return np.asarray(mu[path[0]][path[1]])


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_grad_clip_clips_the_global_norm(grad_clip):
    params = small_params(np.random.default_rng(3))
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 3.0), params)
    norm = float(optax.global_norm(grads))
    assert norm > 1.0
    tx = build_optimizer(params, train_cfg(optimizer="adamw", grad_clip=grad_clip), MAX_STEPS)
    _, state = tx.update(grads, tx.init(params), params)
    factor = 1.0 / norm if grad_clip else 1.0
    np.testing.assert_allclose(adam_first_moment(state), (1 - 0.8) * 3.0 * factor, rtol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_gradients_are_skipped_and_counted(bad):
    params = small_params(np.random.default_rng(4))
    tx = build_optimizer(params, train_cfg(), MAX_STEPS)
    state = tx.init(params)
    good = jax.tree.map(jnp.ones_like, params)
    poisoned = jax.tree.map(lambda g: g, good)
    poisoned["blk"]["c_q"]["kernel"] = good["blk"]["c_q"]["kernel"].at[0, 0].set(bad)
    update = jax.jit(tx.update)

    _, state = update(good, state, params)
    before = state
    for skipped in (1, 2):
        updates, state = update(poisoned, state, params)
        assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
        assert int(optimizer_metrics(state)["skipped_nonfinite_steps"]) == skipped
    # τ_opt counts skipped steps (schedules move on); the optimiser's moments do not
    assert int(optimizer_metrics(state)["optimizer_step"]) == 3
    for name in ("momentum", "second_moment", "mu", "nu"):
        jax.tree.map(np.testing.assert_array_equal, optax.tree.get(state, name), optax.tree.get(before, name))
    updates, state = update(good, state, params)
    assert all(np.all(np.isfinite(np.asarray(u))) for u in jax.tree.leaves(updates))
    assert int(optimizer_metrics(state)["skipped_nonfinite_steps"]) == 2


def test_skip_first_step():
    params = small_params(np.random.default_rng(5))
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5), params)
    cfg = dict(optimizer="adamw", lr_schedule="constant", cooldown_steps=0.0)
    tx_skip = build_optimizer(params, train_cfg(skip_first_step=True, **cfg), MAX_STEPS)
    tx_plain = build_optimizer(params, train_cfg(**cfg), MAX_STEPS)

    state = tx_skip.init(params)
    first, state = tx_skip.update(grads, state, params)
    assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(first))
    assert not np.any(adam_first_moment(state))  # the inner state did not move
    second, state = tx_skip.update(grads, state, params)
    expected, _ = tx_plain.update(grads, tx_plain.init(params), params)  # the plain optimiser's first step
    jax.tree.map(np.testing.assert_array_equal, second, expected)
    assert int(optimizer_metrics(state)["optimizer_step"]) == 2


# ----------------------------------------------------------------------------------------------------
# The real parameter tree, under jit
# ----------------------------------------------------------------------------------------------------


def test_jitted_update_on_nnx_param_state():
    model = build_model(dict(TINY_LINEAR, n_layers_in_prelude=1, n_layers_in_recurrent_block=1,
                             n_layers_in_coda=1))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    tx = build_optimizer(params, train_cfg(), 100)
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.01, p.dtype), params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    new_params, state = step(params, tx.init(params), grads)
    assert isinstance(new_params, nnx.State)
    assert jax.tree.structure(new_params) == jax.tree.structure(params)
    assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree.leaves(new_params))
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), new_params, params)
    assert all(jax.tree.leaves(moved))  # every parameter, in both groups, was updated

    # The pure-dict form of the same tree gives the same optimiser and the same step.
    pure, pure_grads = params.to_pure_dict(), grads.to_pure_dict()
    pure_new, _ = jax.jit(step)(pure, tx.init(pure), pure_grads)
    jax.tree.map(np.testing.assert_array_equal, pure_new, new_params.to_pure_dict())
