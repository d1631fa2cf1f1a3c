"""Properties of the model: loop semantics, compilation, gradient flow, causality, masks, sharding."""

from __future__ import annotations

import contextlib
import functools
import io
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_parcae, tiny_parcae_model
from jax.ad_checkpoint import print_saved_residuals

from parcae_jax import losses, presets, sharding
from parcae_jax.config import ModelConfig
from parcae_jax.model import abstract_model, build_model

B, T = 2, 16


# The shared tiny Parcae (seed 1), its zero-initialised output projections perturbed so every block does
# something.
tiny = tiny_parcae_model


def ids_and_h0(model, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    ids = jax.random.randint(k1, (B, T), 0, model.config.vocab_size)
    h0 = jax.random.normal(k2, (B, T, model.config.d_rec)) * 0.1
    return ids, h0


@functools.partial(nnx.jit, static_argnames="steps")
def unrolled_logits(model, ids, h0, steps):
    """Reference: the recurrence as a plain Python loop over the modules (no scan, no split)."""
    rope = model.rope(ids)
    e = model.prelude_forward(ids, rope)
    e_term = model.adapter.input_term(e)
    ves = [model.value_embedding(ids, t) for t in model.config.ve_tables()["core_block"]]
    h = h0
    for _ in range(steps):
        x = model.adapter(h, e_term)
        for blk, ve in zip(model.core_block, ves, strict=True):
            x = blk(x, ve, *rope)
        h = x
    return model.coda_forward(h, ids, rope)


@pytest.mark.parametrize("injection", ["diagonal", "linear", "add"])
def test_scan_equals_unrolled_loop(injection):
    model = tiny(injection_type=injection)
    ids, h0 = ids_and_h0(model)
    forward = nnx.jit(lambda m, ids, r, h0: m(ids, num_steps=r, initial_state=h0))
    for steps in (0, 1, 3):
        np.testing.assert_allclose(
            forward(model, ids, steps, h0), unrolled_logits(model, ids, h0, steps), atol=2e-5
        )


def test_eval_loop_compiles_once_for_all_recurrence_counts():
    model = tiny()
    ids, h0 = ids_and_h0(model)
    traces = []

    @nnx.jit
    def forward(m, ids, steps, h0):
        traces.append(1)
        return m(ids, num_steps=steps, initial_state=h0)

    outs = [forward(model, ids, jnp.int32(r), h0) for r in (1, 2, 5, 9)]
    assert len(traces) == 1
    assert not np.allclose(outs[0], outs[-1])


def test_train_loop_compiles_once_for_all_sampled_depths():
    model = tiny()
    ids, h0 = ids_and_h0(model)
    labels = jnp.roll(ids, -1, axis=1)
    traces = []
    cfg = model.config
    from parcae_jax.recurrence import max_grad_steps, sample_depths

    @nnx.jit
    def train_loss(m, key, step):
        traces.append(1)
        n, k = sample_depths(key, cfg, step, ids.shape)

        def loss_fn(m):
            logits, tel = m.forward_train(ids, n, k, max_grad_steps=max_grad_steps(cfg), initial_state=h0)
            return losses.cross_entropy(logits, labels)[0], tel

        (loss, tel), _ = nnx.value_and_grad(loss_fn, has_aux=True)(m)
        return loss, tel["num_steps_no_grad"] + tel["num_steps_with_grad"]

    depths = {float(train_loss(model, jax.random.key(s), s)[1]) for s in range(6)}
    assert len(traces) == 1
    assert len(depths) > 1  # different depths were actually sampled


@functools.partial(nnx.jit, static_argnames="max_k")
def _grads(model, ids, labels, h0, n, k, max_k):
    def loss_fn(m):
        logits, _ = m.forward_train(ids, n, k, max_grad_steps=max_k, initial_state=h0)
        return losses.cross_entropy(logits, labels)[0]

    return nnx.grad(loss_fn)(model)


def test_gradients_stop_exactly_at_the_no_grad_boundary():
    """Grads with (n no-grad, k grad) steps == grads of k steps started from the detached h_n."""
    model = tiny()
    ids, h0 = ids_and_h0(model)
    labels = jnp.roll(ids, -1, axis=1)
    n, k = 3, 2
    full = _grads(model, ids, labels, h0, jnp.full((B,), n), jnp.full((B,), k), k)
    rope = model.rope(ids)
    step, args = model.recurrence(ids, model.prelude_forward(ids, rope), rope, training=False)
    h_n = h0
    for _ in range(n):
        h_n = step(args, h_n)
    ref = _grads(model, ids, labels, jax.lax.stop_gradient(h_n), jnp.zeros((B,), int), jnp.full((B,), k), k)
    for (p, a), (_, b) in zip(nnx.to_flat_state(full), nnx.to_flat_state(ref), strict=True):
        np.testing.assert_allclose(a[...], b[...], atol=1e-6, rtol=1e-4, err_msg=str(p))
    # ...and differs from backpropagating through all n + k steps (so the test can fail).
    deep = _grads(model, ids, labels, h0, jnp.zeros((B,), int), jnp.full((B,), n + k), n + k)
    core = lambda g: np.asarray(g["core_block"][0]["mlp"]["fc"]["kernel"][...])  # noqa: E731
    assert not np.allclose(core(full), core(deep), atol=1e-6)
    # h0 never receives gradient.
    g_h0 = jax.grad(lambda h: model.forward_train(ids, 0, 2, max_grad_steps=2, initial_state=h)[0].sum())(h0)
    assert float(jnp.abs(g_h0).max()) == 0.0


def test_model_is_causal():
    model = tiny()
    ids, h0 = ids_and_h0(model)
    i = 7
    # Gradient of position i's logits w.r.t. the per-position state input after i is zero.
    g = jax.grad(lambda h: model(ids, num_steps=3, initial_state=h)[:, i].sum())(h0)
    assert float(jnp.abs(g[:, i + 1 :]).max()) == 0.0
    assert float(jnp.abs(g[:, : i + 1]).max()) > 0.0
    # Changing tokens after i leaves logits up to i unchanged.
    ids2 = ids.at[:, i + 1 :].set((ids[:, i + 1 :] + 1) % model.config.vocab_size)
    a = model(ids, num_steps=3, initial_state=h0)
    b = model(ids2, num_steps=3, initial_state=h0)
    np.testing.assert_allclose(a[:, : i + 1], b[:, : i + 1], atol=1e-6)
    assert not np.allclose(a[:, i + 1 :], b[:, i + 1 :])


@pytest.mark.parametrize("method", ["per-sequence", "per-token"])
def test_masked_depths_equal_individual_fixed_depths(method):
    """Each element with its own depth gets exactly the result of running that depth alone."""
    model = tiny()
    ids, h0 = ids_and_h0(model)
    if method == "per-sequence":
        n, k = jnp.array([0, 3]), jnp.array([2, 1])
        logits, _ = model.forward_train(ids, n, k, max_grad_steps=2, initial_state=h0)
        for b in range(B):
            ref = model(ids[b : b + 1], num_steps=int(n[b] + k[b]), initial_state=h0[b : b + 1])
            np.testing.assert_allclose(logits[b : b + 1], ref, atol=2e-5)
    else:
        # Uniform per-token depth equals per-sequence; varying per-token depth changes the result.
        n_tok, k_tok = jnp.full((B, T), 2), jnp.full((B, T), 1)
        a, _ = model.forward_train(ids, n_tok, k_tok, max_grad_steps=1, initial_state=h0)
        np.testing.assert_allclose(a, model(ids, num_steps=3, initial_state=h0), atol=2e-5)
        n_var = n_tok.at[:, T // 2 :].set(0)
        c, _ = model.forward_train(ids, n_var, k_tok, max_grad_steps=1, initial_state=h0)
        np.testing.assert_allclose(c[:, : T // 2], a[:, : T // 2], atol=2e-5)  # causal: early tokens same
        assert not np.allclose(c[:, T // 2 :], a[:, T // 2 :])


def test_remat_gives_identical_gradients():
    ids, h0 = ids_and_h0(tiny())
    labels = jnp.roll(ids, -1, axis=1)
    base = tiny()
    grads = {}
    for impl in ("per-iteration", "per-block,in-coda"):
        model = build_model(base.config.replace(remat=True, activation_checkpoint_impl=impl))
        nnx.update(model, nnx.state(base))
        grads[impl] = _grads(model, ids, labels, h0, jnp.full((B,), 1), jnp.full((B,), 2), 2)
    plain = _grads(base, ids, labels, h0, jnp.full((B,), 1), jnp.full((B,), 2), 2)
    for g in grads.values():
        for (p, a), (_, b) in zip(nnx.to_flat_state(g), nnx.to_flat_state(plain), strict=True):
            np.testing.assert_allclose(a[...], b[...], atol=1e-6, err_msg=str(p))


def _primitive_names(jaxpr) -> list[str]:
    """Every equation's primitive in `jaxpr`, sub-jaxprs (scan/cond/while/checkpoint bodies) included."""
    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        stack = list(eqn.params.values())
        while stack:
            v = stack.pop()
            if isinstance(v, list | tuple):
                stack.extend(v)
            elif hasattr(v, "eqns"):
                names += _primitive_names(v)
            elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
                names += _primitive_names(v.jaxpr)
    return names


@pytest.mark.parametrize("impl", ["per-iteration", "per-block,in-coda", "per-block"])
def test_remat_puts_checkpoints_in_the_gradient_program(impl):
    """remat=True must reach the traced program: the training-loss gradient holds checkpoint (remat)
    equations, and without remat it holds none (identical gradients alone cannot tell)."""
    ids, h0 = ids_and_h0(tiny())
    labels = jnp.roll(ids, -1, axis=1)
    n, k = jnp.full((B,), 1), jnp.full((B,), 2)

    def checkpoints(cfg) -> int:
        graphdef, state = nnx.split(build_model(cfg))

        def loss(state):
            model = nnx.merge(graphdef, state)
            logits, _ = model.forward_train(ids, n, k, max_grad_steps=2, initial_state=h0)
            return losses.cross_entropy(logits, labels)[0]

        names = _primitive_names(jax.make_jaxpr(jax.grad(loss))(state).jaxpr)
        assert "scan" in names or "while" in names  # the search does reach into the recurrence
        return sum(name in ("checkpoint", "remat", "remat2") for name in names)

    base = tiny().config
    assert checkpoints(base.replace(remat=False, activation_checkpoint_impl=impl)) == 0
    assert checkpoints(base.replace(remat=True, activation_checkpoint_impl=impl)) > 0


@pytest.mark.parametrize("remat", [False, True])
def test_gradient_steps_keep_no_per_step_copy_of_loop_invariants(remat):
    """Reverse mode through the gradient steps' scan saves per-step activations only: no weight, nor the
    injection's input term, is stacked once per step (a lax.cond in the scan body once did that)."""
    model = build_model(tiny_parcae(remat=remat, activation_checkpoint_impl="per-iteration"), seed=0)
    graphdef, params = nnx.split(model, nnx.Param)
    ids, h0 = ids_and_h0(model)
    steps = 3

    def loss(p):
        m = nnx.merge(graphdef, p)
        x, _ = m.forward_train(ids, jnp.array([1, 2]), jnp.array([3, 1]), max_grad_steps=steps,
                               initial_state=h0, features=True)
        return jnp.sum(x)

    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        print_saved_residuals(loss, params)  # one "f32[3,2,16,32] output of ..." line per residual
    dims = re.findall(r"^\w+\[([\d,]+)\]", report.getvalue(), re.M)
    shapes = [tuple(int(d) for d in m.split(",")) for m in dims]
    stacked = [s[1:] for s in shapes if len(s) >= 3 and s[0] == steps]
    weights = {tuple(v.shape) for v in jax.tree.leaves(params)}
    assert stacked and not [s for s in stacked if s in weights or s[-2:] in weights], stacked
    if remat:  # the per-iteration checkpoint keeps the state entering each step, and the row mask
        assert sorted(stacked) == [(B, T, model.config.d_rec)] * 2, stacked


def test_telemetry_at_init():
    model = build_model(tiny_parcae())
    ids, h0 = ids_and_h0(model)
    _, tel = model(ids, num_steps=4, initial_state=h0, return_telemetry=True)
    assert abs(float(tel["rho_A"]) - 1 / math.sqrt(5)) < 1e-6
    assert abs(float(tel["mean_decay"]) - 1 / math.sqrt(5)) < 1e-6
    assert float(tel["state_norm"]) > 0 and 0 < float(tel["rel_residual"]) < 1


def test_sequence_too_long_is_a_clear_error():
    model = tiny()
    with pytest.raises(ValueError, match="exceeds the model's block_size 32"):
        model(jnp.zeros((1, 33), jnp.int32))


def test_sharded_and_unsharded_forward_agree():
    model = tiny()
    ids, h0 = ids_and_h0(model)
    ids, h0 = jnp.concatenate([ids, ids[::-1]]), jnp.concatenate([h0, h0[::-1]])  # batch 4 = data*fsdp
    expected = model(ids, num_steps=3, initial_state=h0)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = build_model(model.config)
    nnx.update(sharded, nnx.state(model))
    sharding.shard_model(sharded, mesh)
    kernel = sharded.prelude[0].mlp.fc.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    batch = jax.sharding.NamedSharding(mesh, sharding.batch_spec(2))
    ids_s = jax.device_put(ids, batch)
    h0_s = jax.device_put(h0, jax.sharding.NamedSharding(mesh, sharding.batch_spec(3)))
    got = nnx.jit(lambda m, i, h: m(i, num_steps=3, initial_state=h))(sharded, ids_s, h0_s)
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_fsdp_shards_every_large_parameter_of_the_released_models():
    """Under a full-FSDP mesh no parameter of a million or more entries stays whole on a device (the
    value-embedding tables once did: their two axes both mapped to `tensor`)."""
    mesh = sharding.make_mesh(data=1, fsdp=8, tensor=1)
    for name in ("parcae-small-140m", "gpt-small-140m", "parcae-xlarge-1_3b"):
        params = nnx.state(abstract_model(ModelConfig.from_dict(presets.released(name))), nnx.Param)
        shardings = dict(nnx.to_flat_state(sharding.state_shardings(params, mesh)))
        for path, var in nnx.to_flat_state(params):
            shape = var.get_value().shape
            if math.prod(shape) < 2**20:
                continue
            shard = shardings[path].shard_shape(shape)
            assert math.prod(shard) * 8 == math.prod(shape), (name, path, shape, shard)


def test_released_parameter_counts_match_official():
    expected = {  # PARCAE_SPEC §3.5 (unique parameters, tied head counted once)
        "parcae-small-140m": 144_323_136,
        "parcae-medium-370m": 388_003_328,
        "parcae-large-770m": 776_655_680,
        "parcae-xlarge-1_3b": 1_338_591_744,
        "gpt-small-140m": 143_141_184,
        "gpt-medium-370m": 385_903_104,
        "gpt-large-770m": 773_375_040,
        "gpt-xlarge-1_3b": 1_333_868_544,
    }
    for name, count in expected.items():
        model = abstract_model(ModelConfig.from_dict(presets.released(name)))
        n = sum(math.prod(v.get_value().shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
        assert n == count, name


def test_value_embedding_rules_follow_the_official_layout():
    cfg = ModelConfig.from_dict(presets.released("parcae-small-140m"))
    model = abstract_model(cfg)
    assert sorted(model.value_embeds.keys()) == ["1", "3", "5"]
    gated = [
        (s, i)
        for s in ("prelude", "core_block", "coda")
        for i, b in enumerate(getattr(model, s))
        if b.attn.ve_gate is not None
    ]
    assert gated == [("prelude", 1), ("core_block", 1), ("coda", 1)]
    # The two rules disagree for odd R with even r̄: implemented literally (spec §2.6).
    odd = ModelConfig.from_dict(dict(presets.released("parcae-small-140m"), n_layers_in_recurrent_block=3))
    assert odd.ve_table_indices() == [0, 2, 4, 6]
    assert [odd.has_ve_gate(i) for i in odd.layer_ids()["core_block"]] == [False, True, False]
