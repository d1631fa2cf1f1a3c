"""Logical-axis sharding: one rules table maps logical names to the mesh axes (data, fsdp, tensor).

Parameters carry `logical_axes` metadata (set in `layers.py`); activations use the names below.
Following MaxText, weights shard their `embed` axis over `fsdp` and their head/MLP/vocab axis over
`tensor`; the batch shards over `data` and `fsdp` together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from parcae_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("state", "fsdp"),
    ("state_concat", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    ("length", None),
)


def logical_to_spec(axes: Sequence[str | None] | None, rules=RULES) -> PartitionSpec:
    """PartitionSpec for a tuple of logical axis names; a mesh axis is used at most once."""
    if axes is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in axes:
        mesh_axes = table.get(name) if name is not None else None
        if mesh_axes is None:
            out.append(None)
            continue
        names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        names = tuple(n for n in names if n not in used)
        used.update(names)
        out.append(names[0] if len(names) == 1 else (names or None))
    return PartitionSpec(*out)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """Mesh (data, fsdp, tensor); one size may be -1 (= all remaining devices)."""
    devices = jax.devices() if devices is None else devices
    sizes = [data, fsdp, tensor]
    n = len(devices)
    if sizes.count(-1) > 1:
        raise ConfigError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if n % known:
            raise ConfigError(f"{n} devices are not divisible by the fixed mesh axes {sizes}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ConfigError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices but "
            f"{n} are available; set config.mesh sizes whose product is {n} (or use -1)"
        )
    arr = np.asarray(devices).reshape(sizes)
    return Mesh(arr, MESH_AXES)


def batch_spec(ndim: int = 2) -> PartitionSpec:
    """Token batches [B, T, ...]: batch over (data, fsdp), the rest replicated."""
    return logical_to_spec(("batch",) + ("length",) * (ndim - 1))


def fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes that do not divide the dimension they shard (e.g. 6 heads on 4 devices)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        if axes is None:
            out.append(None)
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        kept, size = [], 1
        for a in names:
            if dim % (size * mesh.shape[a]) == 0:
                kept.append(a)
                size *= mesh.shape[a]
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def state_shardings(state: nnx.State, mesh: Mesh, rules=RULES):
    """NamedSharding tree for an `nnx.State`, with specs fitted to each array's shape."""

    def sharding(var):
        axes = var.get_metadata().get("logical_axes") if isinstance(var, nnx.Variable) else None
        shape = var.get_value().shape if isinstance(var, nnx.Variable) else np.shape(var)
        return NamedSharding(mesh, fit_spec(logical_to_spec(axes, rules), shape, mesh))

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules=RULES) -> None:
    """Place every parameter of `model` on `mesh` according to the rules (in place)."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))

