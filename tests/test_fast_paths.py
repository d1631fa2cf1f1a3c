"""The performance paths change no number: the chunked head + loss and depth-aware grouping give the
same loss and gradients as the plain computation (issue: TPU-first performance)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_parcae, tiny_parcae_model

from parcae_jax import losses, sharding, train_step
from parcae_jax.cli_config import load_config
from parcae_jax.evaluation import scoring
from parcae_jax.model import row_states
from parcae_jax.recurrence import max_grad_steps


def test_chunk_count_takes_the_fewest_equal_chunks_that_fit():
    assert losses.chunk_count(2048, 512) == 4
    assert losses.chunk_count(128, 512) == 1
    assert losses.chunk_count(1000, 256) == 4  # 250 tokens each
    assert losses.chunk_count(97, 10) == 97  # a prime length: one token per chunk
    assert losses.chunk_count(2048, 0) == 1


def _objective(model, ids, labels, weights, chunk_len, n, k):
    cfg = model.config
    h0 = row_states(jax.random.key(3), cfg, jnp.arange(ids.shape[0]), ids.shape[1])
    x, _ = model.forward_train(ids, n, k, max_grad_steps=max_grad_steps(cfg), initial_state=h0, features=True)
    nll, lse = losses.over_chunks(lambda xc, lc: losses.token_losses(model.head(xc), lc), chunk_len, x,
                                  labels, remat=chunk_len > 0)
    return jnp.sum(nll * weights) + 1e-4 * jnp.sum(jnp.square(lse) * weights)


def _value_and_grad(model, *args):
    graphdef, params = nnx.split(model, nnx.Param)
    return jax.jit(jax.value_and_grad(lambda p: _objective(nnx.merge(graphdef, p), *args)))(params)


def _assert_close_trees(a, b, rtol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        scale = max(float(jnp.max(jnp.abs(y))), 1e-12)
        assert float(jnp.max(jnp.abs(x - y))) <= rtol * scale


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 64, (8, 32)), jnp.int32)
    labels = jnp.asarray(rng.integers(0, 64, (8, 32)), jnp.int32).at[0, :5].set(losses.IGNORE_INDEX)
    weights = (labels >= 0).astype(jnp.float32) / jnp.sum(labels >= 0)
    return ids, labels, weights


def test_chunked_head_and_loss_give_the_same_loss_and_gradients(batch):
    model = tiny_parcae_model()
    n, k = jnp.array([0, 1, 2, 3, 0, 1, 2, 5]), jnp.full((8,), 2)
    whole, g_whole = _value_and_grad(model, *batch, 0, n, k)
    chunked, g_chunked = _value_and_grad(model, *batch, 8, n, k)  # 4 chunks of 8 tokens
    assert float(chunked) == pytest.approx(float(whole), rel=1e-6)
    _assert_close_trees(g_chunked, g_whole, 1e-6)


def test_the_chunked_loss_keeps_one_chunk_of_logits_alive():
    """Compiled temporaries of value_and_grad: what the head and loss add on top of the rest of the
    model (the fp32 [B, T, V] logits and their gradient) shrinks at least 4x with 8 chunks."""
    from parcae_jax.model import build_model

    model = build_model(tiny_parcae(vocab_size=4096, padding_multiple=64, block_size=256))
    graphdef, params = nnx.split(model, nnx.Param)
    ids = jnp.zeros((4, 256), jnp.int32)
    weights = jnp.ones((4, 256)) / 1024
    n, k = jnp.zeros((4,), jnp.int32), jnp.full((4,), 2)

    def temp_bytes(chunk_len):
        def objective(p):
            m = nnx.merge(graphdef, p)
            if chunk_len is None:  # no head at all: the rest of the model
                return jnp.sum(m.forward_train(ids, n, k, max_grad_steps=2, features=True)[0])
            return _objective(m, ids, ids, weights, chunk_len, n, k)

        compiled = jax.jit(jax.value_and_grad(objective)).lower(params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    rest = temp_bytes(None)
    assert (temp_bytes(32) - rest) * 4 < temp_bytes(0) - rest


def test_grouped_recurrence_gives_the_same_loss_and_gradients(batch):
    """Rows looped in 4 groups (each to its own largest n) equal one loop to the batch's largest n."""
    model = tiny_parcae_model()
    n, k = jnp.array([0, 0, 1, 1, 2, 3, 5, 7]), jnp.array([2, 2, 2, 1, 2, 2, 2, 2])
    graphdef, params = nnx.split(model, nnx.Param)
    ids, labels, weights = batch

    def objective(p, groups, shards):
        m = nnx.merge(graphdef, p)
        h0 = row_states(jax.random.key(3), m.config, jnp.arange(8), 32)
        logits, tel = m.forward_train(ids, n, k, max_grad_steps=2, initial_state=h0, depth_groups=groups,
                                      row_shards=shards)
        nll, _ = losses.token_losses(logits, labels)
        return jnp.sum(nll * weights), tel

    value_and_grad = jax.jit(jax.value_and_grad(objective, has_aux=True), static_argnums=(1, 2))
    (one, tel_one), g_one = value_and_grad(params, 1, 1)
    for groups, shards in [(4, 1), (2, 2)]:
        (grouped, tel), g = value_and_grad(params, groups, shards)
        assert float(grouped) == pytest.approx(float(one), rel=1e-6)
        _assert_close_trees(g, g_one, 1e-6)
        assert float(tel["sampled_recurrences"]) == float(tel_one["sampled_recurrences"]) == 4.25
    # One loop runs every row to n = 7; groups of 2 rows to 0, 1, 3, 7; then 2 gradient steps.
    assert float(tel_one["executed_recurrences"]) == 9.0
    (_, tel4), _ = value_and_grad(params, 4, 1)
    assert float(tel4["executed_recurrences"]) == (0 + 1 + 3 + 7) / 4 + 2


def test_depth_order_deals_sorted_rows_to_every_device_group():
    n = jnp.array([[5, 0, 9, 2, 7, 1, 3, 8], [4, 6, 11, 10, 0, 2, 1, 3]])  # [A=2, micro=8]
    order = train_step.depth_order(n, jnp.zeros_like(n), 2, 8, 2, 2)  # 2 devices x 2 groups x 2 rows
    flat = np.asarray(n).reshape(-1)
    sorted_n = np.sort(flat)
    laid = flat[np.asarray(order)]
    assert sorted(np.asarray(order).reshape(-1).tolist()) == list(range(16))  # a permutation
    for a in range(2):
        block = sorted_n[a * 8:(a + 1) * 8].reshape(2, 2, 2)  # group, device, row
        np.testing.assert_array_equal(laid[a].reshape(2, 2, 2), block.transpose(1, 0, 2))
    assert train_step.depth_group_count(8, 32) == 8 and train_step.depth_group_count(8, 6) == 6
    assert train_step.depth_group_count(4, 6) == 3 and train_step.depth_group_count(0, 32) == 0


def _one_step(depth_groups, mesh_shape, micro):
    cfg = tiny_parcae(mean_recurrence=8, mean_backprop_depth=4, sampling_scheme="poisson-truncated-full")
    run = ml_collections.ConfigDict({"model": cfg.to_dict()})
    run.train = load_config("configs/tiny.py").train.copy_and_resolve_references()
    run.train.unlock()
    run.train.update(world_batch_size=16, micro_batch_size=micro, loss_normalization="micro_batch",
                     optimizer="adamw", depth_groups=depth_groups, loss_chunk_len=8)
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[: int(np.prod(mesh_shape))])
    setup, state = train_step.create_train_state(run, mesh, max_steps=10)
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, 64, (setup.accum, setup.global_micro_batch, 33)).astype(np.int32)
    labels = np.where(rng.random(tokens[..., 1:].shape) < 0.9, tokens[..., 1:], losses.IGNORE_INDEX)
    batch = jax.device_put({"inputs": tokens[..., :-1], "labels": labels.astype(np.int32)},
                           setup.batch_sharding)
    _, metrics = train_step.make_train_step(setup, run.train)(state, batch, jax.random.key(5))
    return {k: float(v) for k, v in metrics.items()}


def test_depth_sorted_steps_equal_the_official_layout():
    """On 2 devices, sorting a step's sequences by depth (across 2 accumulation micro-batches, so rows
    change device and micro-batch) and grouping them changes neither the official micro-batch-
    normalised loss nor the gradient, and runs fewer recurrences than it samples."""
    plain, grouped = _one_step(0, (2, 1, 1), 4), _one_step(4, (2, 1, 1), 4)
    assert grouped["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    assert grouped["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-6)
    assert grouped["sampled_recurrences"] == plain["sampled_recurrences"]
    assert grouped["executed_recurrences"] < plain["executed_recurrences"]
    assert grouped["sampled_recurrences"] <= grouped["executed_recurrences"]


def test_scoring_applies_the_head_in_chunks_with_the_same_scores(monkeypatch):
    model = tiny_parcae_model()
    rng = np.random.default_rng(2)
    rows = [(rng.integers(0, 64, n), rng.integers(0, 64, n)) for n in (32, 20, 7)]

    def scores(chunk_len):
        monkeypatch.setattr(scoring, "HEAD_CHUNK_LEN", chunk_len)
        return scoring.TokenScorer.for_model(model, max_len=32, batch_size=2).score(rows, depth=3)

    for (ce, pred), (ce_c, pred_c) in zip(scores(0), scores(8), strict=True):
        np.testing.assert_allclose(ce_c, ce, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(pred_c, pred)
