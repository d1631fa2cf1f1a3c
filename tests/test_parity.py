"""Parity with the official PyTorch Parcae: logits, training loss and per-parameter gradient norms
computed by the official code on the same weights (tests/fixtures/reference, see its README)."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import CASES, case_config, case_dir, case_meta, load_npy

from parcae_jax import losses, weights
from parcae_jax.model import build_model
from parcae_jax.pretrained import read_official_weights

LOGIT_ATOL = 1e-4


@functools.cache
def loaded(case: str):
    model = build_model(case_config(case))
    extra = weights.load_official(model, read_official_weights(case_dir(case)))
    return model, extra


@pytest.mark.parametrize("case", CASES)
def test_logits_match_official(case):
    model, _ = loaded(case)
    ids = jnp.asarray(load_npy(case, "input_ids.npy"))
    if model.config.arch == "gpt":
        diff = np.abs(np.asarray(model(ids)) - load_npy(case, "logits.npy")).max()
        assert diff <= LOGIT_ATOL, diff
        return
    h0 = jnp.asarray(load_npy(case, "init_state.npy"))
    forward = nnx.jit(lambda m, ids, r, h0: m(ids, num_steps=r, initial_state=h0))
    for r in case_meta(case)["recurrence"]["counts"]:
        expected = load_npy(case, f"logits_R{r:02d}.npy")
        got = np.asarray(forward(model, ids, r, h0))
        assert got.shape == expected.shape
        diff = np.abs(got - expected).max()
        assert diff <= LOGIT_ATOL, f"R={r}: max|diff|={diff}"


def test_training_loss_and_gradients_match_official():
    """One training forward/backward: 4 recurrences without gradient, then 4 with (truncated BPTT)."""
    case = "parcae_diag"
    model, _ = loaded(case)
    meta = case_meta(case)["train"]
    n, k = meta["num_steps_pair"]
    ids = jnp.asarray(load_npy(case, "train_input_ids.npy"))
    labels = jnp.asarray(load_npy(case, "train_labels.npy"))
    h0 = jnp.asarray(load_npy(case, "train_init_state.npy"))
    B = ids.shape[0]

    def loss_fn(m):
        logits, _ = m.forward_train(
            ids, jnp.full((B,), n), jnp.full((B,), k), max_grad_steps=k, initial_state=h0
        )
        return losses.cross_entropy(logits, labels)[0]

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    assert abs(float(loss) - meta["loss"]) <= 1e-5 * abs(meta["loss"])
    norms = {}
    for path, g in nnx.to_flat_state(grads):
        key, _ = weights.official_key(tuple(path), model.config)
        norms[key] = float(np.linalg.norm(np.asarray(g[...], np.float64)))
    expected = meta["grad_norm_per_parameter"]
    assert set(norms) == set(expected)
    for key, ref in expected.items():
        assert abs(norms[key] - ref) <= 1e-4 * abs(ref), (key, norms[key], ref)
    total = np.sqrt(sum(v**2 for v in norms.values()))
    assert abs(total - meta["grad_norm_total"]) <= 1e-4 * meta["grad_norm_total"]
    # Element-wise check of the small parameters the fixture stores in full.
    flat = {
        weights.official_key(tuple(p), model.config)[0]: np.asarray(g[...])
        for p, g in nnx.to_flat_state(grads)
    }
    for key, ref in meta["grads_of_small_parameters"].items():
        np.testing.assert_allclose(flat[key].reshape(-1), np.asarray(ref).reshape(-1), atol=1e-6, rtol=1e-4)


def test_bf16_compute_stays_close():
    """bf16 matmuls with fp32 params/norms/softmax: logits within bf16 tolerance of the fp32 oracle."""
    case = "parcae_diag"
    model = build_model(case_config(case, compute_dtype="bfloat16"))
    weights.load_official(model, read_official_weights(case_dir(case)))
    ids = jnp.asarray(load_npy(case, "input_ids.npy"))
    h0 = jnp.asarray(load_npy(case, "init_state.npy"))
    got = np.asarray(model(ids, num_steps=8, initial_state=h0))
    expected = load_npy(case, "logits_R08.npy")
    assert got.dtype == np.float32
    assert np.abs(got - expected).max() < 0.1 * np.abs(expected).max()
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.999
