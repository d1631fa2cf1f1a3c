"""Causal self-attention behind one function, `attend`, with the backend named by `model.attention_impl`.

* `xla`: `jax.nn.dot_product_attention(implementation="xla")`, the parity path (the reference the
  others are tested against; it materialises the [B, H, T, T] logits).
* `cudnn`: the same call with `implementation="cudnn"` (cuDNN flash attention, GPU only, bf16/fp16).
  JAX registers its own partitioning rule for it, so it needs no `shard_map`.
* `splash`: the Pallas TPU splash-attention kernel shipped with JAX. A Mosaic kernel cannot be
  partitioned by XLA, so on a mesh it runs under `jax.shard_map` over the batch axes (data, fsdp) and
  the head axis (tensor); the mesh is the one in context (`jax.set_mesh`), see `attend`.
* `splash-interpret`: the same kernel through the Pallas interpreter, on any platform (slow): to check
  the kernel against `xla` on a CPU.
* `auto` (default): splash on TPU, cuDNN on GPU, XLA elsewhere, and XLA wherever the chosen kernel
  cannot run (a sequence length splash cannot tile, fp32 on GPU, a multi-device TPU run traced without
  a mesh in context).

Every backend computes softmax(q kᵀ / sqrt(D) + causal mask) v with fp32 logits and softmax; they
differ only in float rounding (summation order, tiling, where the 1/sqrt(D) scale is applied).
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
from jaxtyping import Array, Bool, Float

from parcae_jax import sharding
from parcae_jax.config import ATTENTION_IMPLS, CUDNN_DTYPES, CUDNN_MAX_HEAD_DIM, SPLASH_BLOCK_MULTIPLE
from parcae_jax.errors import ConfigError

log = logging.getLogger(__name__)

# Splash tiles: the largest of these dividing T (the kernel needs multiples of 128, the TPU lane width).
# Bigger tiles mean fewer grid steps for more VMEM; 512 is an untuned ceiling, not a measured optimum.
SPLASH_BLOCKS = (512, 256, SPLASH_BLOCK_MULTIPLE)

def current_mesh():
    """The mesh set by `jax.set_mesh` (an AbstractMesh while tracing), or None when there is none."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def platform_of(mesh=None) -> str:
    """'tpu', 'gpu', 'cpu', ...: the platform of the mesh's devices when known (it differs from the
    default backend when compiling ahead of time for a TPU topology from a CPU host), else JAX's
    default backend."""
    device = getattr(mesh, "abstract_device", None) if mesh is not None else None
    if device is not None and device.platform:
        return device.platform
    return jax.default_backend()


def splash_block(seq_len: int) -> int:
    """The splash tile size for sequence length `seq_len` (the largest of SPLASH_BLOCKS dividing it)."""
    for block in SPLASH_BLOCKS:
        if seq_len % block == 0:
            return block
    raise ConfigError(
        f"model.attention_impl='splash' cannot tile a sequence of {seq_len} tokens (it needs a multiple "
        f"of {SPLASH_BLOCK_MULTIPLE}); use sequence lengths that are multiples of {SPLASH_BLOCK_MULTIPLE} "
        "or set model.attention_impl=auto (falls back to xla for such lengths)"
    )


def resolve(impl: str | None, *, platform: str, seq_len: int, head_dim: int, dtype,
            devices_without_mesh: int = 1) -> str:
    """The backend (an ATTENTION_IMPLS value but `auto`) that runs `impl` for these shapes on `platform`.

    An explicit backend that cannot run here raises a one-line ConfigError naming the fix; `auto` picks
    the fastest one that can. `devices_without_mesh` > 1 means a multi-device program traced without a
    mesh in context, where splash cannot be placed (XLA refuses to partition a Mosaic kernel)."""
    impl = "auto" if impl is None else impl
    if impl not in ATTENTION_IMPLS:
        raise ConfigError(f"model.attention_impl={impl!r} is not one of {ATTENTION_IMPLS}")
    dtype = jnp.dtype(dtype).name
    if impl == "auto":
        if platform == "tpu" and seq_len % SPLASH_BLOCK_MULTIPLE == 0:
            if devices_without_mesh <= 1:
                return "splash"
            _warn_no_mesh(devices_without_mesh)
        if (platform == "gpu" and dtype in CUDNN_DTYPES and head_dim % 8 == 0
                and head_dim <= CUDNN_MAX_HEAD_DIM and _cudnn_capable()):
            return "cudnn"
        return "xla"
    if impl == "cudnn":
        if platform != "gpu":
            raise ConfigError(f"model.attention_impl='cudnn' needs an NVIDIA GPU, but the attention runs on "
                              f"{platform}; set model.attention_impl=auto (or xla)")
        if dtype not in CUDNN_DTYPES:
            raise ConfigError(f"model.attention_impl='cudnn' needs bfloat16 or float16 activations, got "
                              f"{dtype}; set model.compute_dtype=bfloat16 or model.attention_impl=auto "
                              "(or xla)")
    if impl in ("splash", "splash-interpret"):
        if impl == "splash" and platform != "tpu":
            raise ConfigError(f"model.attention_impl='splash' needs a TPU, but the attention runs on "
                              f"{platform}; set model.attention_impl=auto (or xla)")
        splash_block(seq_len)  # raises when T cannot be tiled
    return impl


@functools.cache
def _cudnn_capable() -> bool:
    """cuDNN flash attention needs compute capability >= 8.0 (Ampere); True when it cannot be read
    (e.g. compiling for GPU ahead of time), as jax then reports the problem itself."""
    try:
        capability = jax.devices("gpu")[0].compute_capability
    except Exception:  # no local GPU, or a device without the attribute
        return True
    return tuple(int(x) for x in str(capability).split(".")[:2]) >= (8, 0)


@functools.cache
def _warn_no_mesh(devices: int) -> None:
    log.warning("attention_impl=auto: %d devices but no mesh in context, so the splash kernel cannot be "
                "sharded; using xla attention. Trace the step under `with jax.set_mesh(mesh):` to use "
                "splash.", devices)


def attend(
    q: Float[Array, "B T H D"],
    k: Float[Array, "B S K D"],
    v: Float[Array, "B S K D"],
    impl: str | None = "auto",
    mask: Bool[Array, "B 1 T S"] | None = None,
) -> Float[Array, "B T H D"]:
    """softmax(q kᵀ / sqrt(D)) v over causal positions (S = T), or over `mask` when given; K divides H
    (grouped-query attention: query head h reads key/value head h // (H / K)). q, k, v arrive after
    RoPE and QK-norm. Output in q's dtype."""
    if mask is not None:
        # Attending to a KV-cache slot (prefill or decode): the mask is data (which cache positions
        # are filled and visible to each query) and S is the cache length, not T. Splash builds its
        # mask tables from a static pattern at trace time and cuDNN's causal mode assumes S = T, so
        # this stays on XLA's masked path; with a few new tokens per call its cost is the cache read.
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    mesh = current_mesh()
    B, T, H, D = q.shape
    backend = resolve(impl, platform=platform_of(mesh), seq_len=T, head_dim=D, dtype=q.dtype,
                      devices_without_mesh=jax.device_count() if mesh is None else 1)
    if backend in ("splash", "splash-interpret"):
        return _splash(q, k, v, mesh, interpret=backend == "splash-interpret")
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=backend)


def _splash_local(q: Float[Array, "b T h D"], k: Float[Array, "b T k D"], v, *, interpret: bool = False
                  ) -> Float[Array, "b T h D"]:
    """Splash attention on one device's shard (or the whole array without a mesh); `interpret` runs the
    kernel through the Pallas interpreter."""
    # Imported here: the Pallas TPU modules are not needed (nor imported) by the other backends.
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    _, T, H, D = q.shape
    block = splash_block(T)
    sizes = kernel_lib.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )
    causal = mask_lib.MultiHeadMask([mask_lib.CausalMask((T, T)) for _ in range(H)])
    # The MHA variant takes k/v with fewer heads than q and maps query head h to kv head h // (H / K),
    # the grouping jax.nn.dot_product_attention uses, so GQA needs no repeated k/v.
    kernel = kernel_lib.make_splash_mha(causal, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                        interpret=interpret)
    # The kernel applies no softmax scale: scale q in fp32 and round once to its dtype.
    q = (q.astype(jnp.float32) * (1.0 / math.sqrt(D))).astype(q.dtype)
    heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [b, T, h, D] <-> [b, h, T, D]
    out = jax.vmap(kernel)(heads_major(q), heads_major(k), heads_major(v))
    return heads_major(out).astype(q.dtype)


def _splash(q, k, v, mesh, interpret: bool) -> Array:
    """Splash directly without a mesh; on a mesh, under shard_map over (data, fsdp) x tensor."""
    local = functools.partial(_splash_local, interpret=interpret)
    if mesh is None:
        return local(q, k, v)
    free = {a for a, t in zip(mesh.axis_names, mesh.axis_types, strict=True)
            if t != jax.sharding.AxisType.Manual}  # axes an enclosing shard_map has not taken
    rules = tuple((name, _only(axes, free)) for name, axes in sharding.RULES)

    def spec(heads: str, shape) -> PartitionSpec:
        logical = sharding.logical_to_spec(("batch", "length", heads, None), rules)
        return sharding.fit_spec(logical, shape, mesh)

    q_spec, kv_spec = spec("heads", q.shape), spec("kv_heads", k.shape)
    if q_spec[2] != kv_spec[2]:
        # A device's query heads must find their kv heads on the same device: shard heads only when
        # both H and K split over the tensor axis.
        q_spec = PartitionSpec(q_spec[0], None, None, None)
        kv_spec = PartitionSpec(kv_spec[0], None, None, None)
    # check_vma=False: the Pallas call carries no varying-manual-axes annotations to check.
    fn = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                       axis_names=free, check_vma=False)
    return fn(q, k, v)


def _only(axes, allowed: set[str]):
    """A rules-table entry restricted to the mesh axes in `allowed` (None when nothing is left)."""
    if axes is None:
        return None
    names = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a in allowed)
    return names or None
