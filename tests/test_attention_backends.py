"""Attention backends (parcae_jax/attention.py) against the XLA parity path.

Splash runs on CPU through the Pallas interpreter (`attention_impl='splash-interpret'`); cuDNN cannot run
here, so it is covered by the resolver and the config checks. With libtpu installed, the splash path is also
compiled ahead of time for a real TPU topology (v5e 2x2) from this CPU host.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import perturbed, tiny_parcae
from jax.sharding import NamedSharding, PartitionSpec

from parcae_jax import attention, sharding
from parcae_jax.cli_config import load_config
from parcae_jax.config import ModelConfig
from parcae_jax.errors import ConfigError, one_line
from parcae_jax.model import build_model

REPO = pathlib.Path(__file__).resolve().parent.parent
B, H, K, D = 4, 4, 2, 16  # GQA: 4 query heads over 2 kv heads


def qkv(T: int, dtype=jnp.float32):
    """q [B, T, H, D], k/v [B, T, K, D], as after RoPE and QK-norm (unit-RMS rows)."""
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (B, T, h, D), dtype) for key, h in zip(keys, (H, K, K), strict=True))
    return q, k, v


def value_and_grads(impl: str):
    """(loss, (dq, dk, dv)) of a weighted sum of the attention output, so every output element and
    head-dim channel gets its own cotangent."""

    def loss(q, k, v):
        # numpy weights: no eager op may run on the mesh in context (a TPU topology in the AOT test)
        weights = np.cos(np.arange(q.shape[-1], dtype=np.float32))
        return jnp.sum(attention.attend(q, k, v, impl).astype(jnp.float32) * weights)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def max_diffs(a, b) -> list[float]:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return [float(jnp.max(jnp.abs(x - y))) for x, y in pairs]


# ---- resolver and config checks (no kernel runs) ---------------------------------------------------
def test_auto_picks_the_platform_kernel():
    kw = dict(seq_len=256, head_dim=64, dtype=jnp.bfloat16)
    assert attention.resolve("auto", platform="tpu", **kw) == "splash"
    assert attention.resolve("auto", platform="gpu", **kw) == "cudnn"
    assert attention.resolve("auto", platform="cpu", **kw) == "xla"
    assert attention.resolve(None, platform="tpu", **kw) == "splash"  # configs written before `auto`
    # ... and XLA wherever that kernel cannot run.
    assert attention.resolve("auto", platform="tpu", seq_len=100, head_dim=64, dtype=jnp.bfloat16) == "xla"
    assert attention.resolve("auto", platform="gpu", seq_len=256, head_dim=64, dtype=jnp.float32) == "xla"
    assert attention.resolve("auto", platform="gpu", seq_len=256, head_dim=12, dtype=jnp.bfloat16) == "xla"
    assert attention.resolve("auto", platform="tpu", devices_without_mesh=4, **kw) == "xla"
    assert attention.resolve("xla", platform="tpu", **kw) == "xla"
    assert attention.resolve("splash", platform="tpu", **kw) == "splash"
    assert attention.resolve("cudnn", platform="gpu", **kw) == "cudnn"
    assert attention.resolve("splash-interpret", platform="cpu", **kw) == "splash-interpret"  # any platform


def test_platform_comes_from_the_mesh_in_context():
    assert attention.platform_of(None) == jax.default_backend()
    with jax.set_mesh(sharding.make_mesh(2, 2, 2)):
        mesh = attention.current_mesh()
        assert mesh is not None and attention.platform_of(mesh) == "cpu"
    assert attention.current_mesh() is None


@pytest.mark.parametrize(("impl", "platform", "seq_len", "dtype", "fix"), [
    ("cudnn", "cpu", 256, jnp.bfloat16, "needs an NVIDIA GPU"),
    ("cudnn", "tpu", 256, jnp.bfloat16, "needs an NVIDIA GPU"),
    ("cudnn", "gpu", 256, jnp.float32, "compute_dtype=bfloat16"),
    ("splash", "cpu", 256, jnp.bfloat16, "needs a TPU"),
    ("splash", "gpu", 256, jnp.bfloat16, "needs a TPU"),
    ("splash", "tpu", 200, jnp.bfloat16, "multiples of 128"),
    ("splash-interpret", "cpu", 200, jnp.float32, "multiples of 128"),
    ("flash", "tpu", 256, jnp.bfloat16, "is not one of"),
])
def test_an_impossible_backend_is_a_one_line_config_error(impl, platform, seq_len, dtype, fix):
    with pytest.raises(ConfigError) as err:
        attention.resolve(impl, platform=platform, seq_len=seq_len, head_dim=64, dtype=dtype)
    line = one_line(err.value)
    assert fix in line and "\n" not in line
    assert "attention_impl=auto" in line or "is not one of" in line


@pytest.mark.parametrize(("overrides", "fix"), [
    (dict(attention_impl="splash", block_size=32), "block_size a multiple of 128"),
    (dict(attention_impl="splash-interpret", block_size=32), "block_size a multiple of 128"),
    (dict(attention_impl="cudnn"), "compute_dtype bfloat16 or float16"),
    (dict(attention_impl="cudnn", compute_dtype="bfloat16", n_embd=36, recurrent_embedding_dimension=36),
     "multiple of 8"),
    (dict(attention_impl="flash"), "is not one of"),
])
def test_config_validation_refuses_what_the_backend_cannot_do(overrides, fix):
    with pytest.raises(ConfigError, match=fix):
        tiny_parcae(**overrides)


def test_config_accepts_every_backend_and_reads_none_as_auto():
    assert tiny_parcae().attention_impl == "auto"
    assert tiny_parcae(attention_impl=None).attention_impl == "auto"
    assert tiny_parcae(attention_impl="splash", block_size=128).attention_impl == "splash"
    assert tiny_parcae(attention_impl="splash-interpret", block_size=128).attention_impl == "splash-interpret"
    assert tiny_parcae(attention_impl="cudnn", compute_dtype="bfloat16").attention_impl == "cudnn"


def test_splash_blocks_divide_the_sequence():
    lengths = (128, 256, 384, 1024, 2048, 4096)
    assert [attention.splash_block(t) for t in lengths] == [128, 256, 128, 512, 512, 512]
    with pytest.raises(ConfigError, match="multiple of 128"):
        attention.splash_block(96)


# ---- splash (interpreted) against XLA --------------------------------------------------------------
def test_splash_matches_xla_forward_and_gradients():
    q, k, v = qkv(384)  # three 128-blocks: the kernel skips, masks and fully computes blocks
    (ref_loss, ref_grads) = value_and_grads("xla")(q, k, v)
    out = jax.jit(lambda q, k, v: attention.attend(q, k, v, "splash-interpret"))(q, k, v)
    loss, grads = value_and_grads("splash-interpret")(q, k, v)
    ref_out = attention.attend(q, k, v, "xla")
    assert float(jnp.max(jnp.abs(out - ref_out))) < 2e-6
    assert abs(float(loss - ref_loss)) < 1e-4 * abs(float(ref_loss)) + 1e-4
    assert max(max_diffs(grads, ref_grads)) < 2e-5


def test_splash_under_shard_map_on_eight_devices():
    """Batch over (data, fsdp), heads over tensor: each device runs the kernel on its shard."""
    q, k, v = qkv(128)
    ref_loss, ref_grads = value_and_grads("xla")(q, k, v)
    mesh = sharding.make_mesh(2, 2, 2)
    placed = [jax.device_put(x, NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor"))) for x in
              (q, k, v)]
    with jax.set_mesh(mesh):
        fn = value_and_grads("splash-interpret")
        assert "shard_map" in str(jax.make_jaxpr(fn)(*placed))
        loss, grads = fn(*placed)
    assert abs(float(loss - ref_loss)) < 1e-4 * abs(float(ref_loss)) + 1e-4
    assert max(max_diffs(grads, ref_grads)) < 2e-5


def test_kv_cache_mask_path_stays_on_xla():
    q, k, v = qkv(8)
    mask = jnp.tril(jnp.ones((8, 8), bool))[None, None]
    for impl in ("auto", "splash", "cudnn"):  # whatever the backend: decoding takes the mask path
        out = attention.attend(q, k, v, impl, mask=mask)
        np.testing.assert_array_equal(out, jax.nn.dot_product_attention(q, k, v, mask=mask))


def test_tiny_model_logits_splash_equal_xla():
    """configs/tiny.py's model (T = block_size = 128), perturbed so every block changes its input."""
    d = load_config(str(REPO / "configs" / "tiny.py")).model.to_dict()
    ids = jax.random.randint(jax.random.key(3), (2, d["block_size"]), 0, d["vocab_size"])

    def build(impl):
        return build_model(ModelConfig.from_dict({**d, "attention_impl": impl}), seed=1)

    # One set of weights (built under jit: eager init costs ~15 s here), one graph per backend.
    state = jax.jit(lambda: nnx.state(perturbed(build("xla"))))()
    logits = {}
    for impl in ("xla", "splash-interpret"):
        model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda impl=impl: build(impl))), state)
        logits[impl] = jax.jit(lambda m, ids: m(ids, num_steps=2))(model, ids)
    diff = float(jnp.max(jnp.abs(logits["splash-interpret"] - logits["xla"])))
    assert diff < 1e-5, diff


# ---- ahead-of-time compile for a real TPU topology -------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_splash_compiles_for_a_tpu_topology():
    """Forward + backward of the attention on a v5e 2x2 mesh (data 2 x tensor 2), bf16, compiled by
    libtpu from this CPU host: the kernel lowers through Mosaic inside the shard_map."""
    from jax.experimental import topologies

    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server here
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu's lockfile
    devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    mesh = sharding.make_mesh(2, 1, 2, devices=devices)
    spec = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor"))
    shapes = [jax.ShapeDtypeStruct((4, 256, h, 64), jnp.bfloat16, sharding=spec) for h in (H, K, K)]
    for impl in ("auto", "splash"):
        with jax.set_mesh(mesh):
            lowered = value_and_grads(impl).lower(*shapes)
        assert "tpu_custom_call" in lowered.compile().as_text(), impl
