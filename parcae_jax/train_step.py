"""The sharded training state and the jitted train / eval steps.

The train state is a plain dict pytree `{"params": nnx.State, "opt_state": optax state, "step": int32}`
so Orbax, `jax.jit` shardings and donation all see ordinary arrays. Parameters are created directly
in their shardings (`jax.jit(init, out_shardings=...)`), so a model never has to fit on one device.

One optimiser step = `accum` micro-batches scanned with `lax.scan`; gradients are summed in fp32. The
loss is a weighted sum of token losses (`token_weights`): the official per-device micro-batch mean
(`train.loss_normalization="micro_batch"`), or one mean over the step's real tokens ("global"), which
is the same whatever the accumulation split. Without padding the two are equal.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from parcae_jax import losses, sharding
from parcae_jax.config import ModelConfig
from parcae_jax.model import build_model, row_states
from parcae_jax.optim import build_optimizer, optimizer_metrics
from parcae_jax.recurrence import max_grad_steps, sample_depths

# Batches are [accum, global_micro_batch, T]: the micro-batch axis shards over (data, fsdp).
BATCH_SPEC = PartitionSpec(None, ("data", "fsdp"), None)


@dataclasses.dataclass
class TrainSetup:
    model_cfg: ModelConfig
    graphdef: Any
    tx: optax.GradientTransformation
    mesh: Mesh
    state_shardings: Any
    batch_sharding: NamedSharding
    accum: int
    global_micro_batch: int


def batch_geometry(train_cfg, mesh: Mesh) -> tuple[int, int]:
    """(accumulation steps, global micro-batch) from world batch and per-device micro-batch."""
    data_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    global_micro = train_cfg.micro_batch_size * data_devices
    world = train_cfg.world_batch_size
    if world % global_micro:
        # Fall back to the largest micro-batch that divides the world batch (e.g. tiny CPU runs).
        per_device = world // data_devices
        if per_device < 1 or world % data_devices:
            raise ValueError(
                f"world_batch_size={world} is not divisible by the {data_devices} data-parallel devices; "
                "change train.world_batch_size or the mesh"
            )
        micro = max(d for d in range(1, train_cfg.micro_batch_size + 1) if per_device % d == 0)
        global_micro = micro * data_devices
    return world // global_micro, global_micro


def moment_shardings(opt_state, params, param_shardings, replicated: NamedSharding):
    """Shardings of an optimizer state: a leaf that mirrors a parameter (its key path ends with the
    parameter's path, same shape: Adam's moments, Muon's momentum) takes that parameter's sharding;
    everything else (counts, schedules) is replicated. Matched by path, because `jax.jit(tx.init)`
    alone never uses the parameters' values and so would place every moment on one device."""
    per_leaf = jax.tree.map(lambda s, _: s, param_shardings, params)  # the prefix tree, one per leaf
    by_path = {
        tuple(path): (leaf.shape, s)
        for (path, leaf), s in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(per_leaf),
                                   strict=True)
    }

    def pick(path, x):
        for start in range(len(path)):
            shape, s = by_path.get(tuple(path[start:]), (None, None))
            if s is not None and shape == x.shape:
                return s
        return replicated

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def create_train_state(run_cfg, mesh: Mesh, max_steps: int, *, abstract: bool = False
                       ) -> tuple[TrainSetup, dict]:
    """Build model, optimizer and the sharded train state (parameters initialised in place).

    `abstract=True` runs nothing: the state comes back as `jax.ShapeDtypeStruct`s carrying their
    shardings, for compiling ahead of time on devices this process cannot run on (`parcae_jax.aot`)."""
    model_cfg = ModelConfig.from_dict(run_cfg.model.to_dict())
    seed = int(run_cfg.train.seed)

    def init_params():
        return nnx.state(build_model(model_cfg, seed=seed), nnx.Param)

    abstract_model = nnx.eval_shape(lambda: build_model(model_cfg, seed=seed))
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    param_shardings = sharding.state_shardings(abstract_params, mesh)
    tx = build_optimizer(abstract_params, run_cfg.train, max_steps)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = moment_shardings(abstract_opt, abstract_params, param_shardings, replicated)
    state_shardings = {"params": param_shardings, "opt_state": opt_shardings, "step": replicated}
    if abstract:
        shapes = {"params": abstract_params, "opt_state": abstract_opt,
                  "step": jax.ShapeDtypeStruct((), jnp.int32)}
        # One sharding per array (a Variable holds one), so the Variable wrappers stay in place.
        leaves, treedef = jax.tree.flatten(shapes)
        state = treedef.unflatten([
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
            for x, s in zip(leaves, jax.tree.leaves(state_shardings), strict=True)
        ])
    else:
        params = jax.jit(init_params, out_shardings=param_shardings)()
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
        state = {"params": params, "opt_state": opt_state,
                 "step": jax.device_put(jnp.zeros([], jnp.int32), replicated)}
    accum, global_micro = batch_geometry(run_cfg.train, mesh)
    setup = TrainSetup(
        model_cfg=model_cfg,
        graphdef=graphdef,
        tx=tx,
        mesh=mesh,
        state_shardings=state_shardings,
        batch_sharding=NamedSharding(mesh, BATCH_SPEC),
        accum=accum,
        global_micro_batch=global_micro,
    )
    return setup, state


def abstract_state(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


LOSS_NORMALIZATIONS = ("micro_batch", "global")


def rank_rows(setup: TrainSetup) -> int:
    """Rows of one data-parallel device in a micro-batch: the official per-rank micro-batch."""
    return setup.global_micro_batch // (setup.mesh.shape["data"] * setup.mesh.shape["fsdp"])


def token_weights(valid: jax.Array, rows_per_rank: int, normalization: str) -> jax.Array:
    """Per-token loss weights [A, B, T] whose weighted sum is the step's objective.

    'global': 1 / (real tokens of the step). 'micro_batch' (official, spec §7.5): every device
    micro-batch's mean over its own real tokens, divided by the accumulation count and averaged over
    devices, i.e. 1 / (tokens of that device micro-batch · A · ranks). A micro-batch with no real
    token contributes nothing (officially its mean is NaN)."""
    A, B, T = valid.shape
    v = valid.astype(jnp.float32)
    if normalization == "global":
        return v / jnp.maximum(jnp.sum(v), 1.0)
    if normalization != "micro_batch":
        raise ValueError(f"train.loss_normalization={normalization!r}: use one of {LOSS_NORMALIZATIONS}")
    ranks = B // rows_per_rank
    per_rank = v.reshape(A, ranks, rows_per_rank * T)
    counts = jnp.sum(per_rank, axis=-1, keepdims=True)
    return (per_rank / (jnp.maximum(counts, 1.0) * A * ranks)).reshape(A, B, T)


def draw_depths(cfg: ModelConfig, key: jax.Array, step, accum: int, micro: int, rows_per_rank: int, T: int):
    """(n, k) int32 [A, micro] (per-token: [A, micro, T]) for one optimiser step (spec §5.3-5.5).

    The curriculum counter of micro-batch a is the official micro-batch counter `step·A + a + 1`.
    Per-sequence/per-token: each row draws from `fold_in(key, global row)`; with `lockstep_n` every
    device draws the same values (row index within the device), as the official shared seed does.
    Per-batch: one (n, k) per device micro-batch; `lockstep_n` / `lockstep_k` share n / k across
    devices, else each device draws its own (as every official rank does)."""
    key_n, key_k = jax.random.split(key)
    micro_step = step * accum + jnp.arange(accum) + 1  # [A]
    ranks = micro // rows_per_rank
    if cfg.recurrent_iteration_method == "per-batch":
        def one(a, r):
            kn = jax.random.fold_in(jax.random.fold_in(key_n, a), 0 if cfg.lockstep_n else r)
            kk = jax.random.fold_in(jax.random.fold_in(key_k, a), 0 if cfg.lockstep_k else r)
            return sample_depths(kn, cfg, micro_step[a], (), k_key=kk)

        n, k = jax.vmap(lambda a: jax.vmap(lambda r: one(a, r))(jnp.arange(ranks)))(jnp.arange(accum))
        # [A, ranks] -> every row of its device
        return jnp.repeat(n, rows_per_rank, axis=1), jnp.repeat(k, rows_per_rank, axis=1)
    row = jnp.arange(micro) % rows_per_rank if cfg.lockstep_n else jnp.arange(micro)

    def one_row(a, r):
        kn = jax.random.fold_in(key_n, a * micro + r)
        n, k = sample_depths(kn, cfg, micro_step[a][None], (1, T))
        return n[0], k[0]

    return jax.vmap(lambda a: jax.vmap(lambda r: one_row(a, r))(row))(jnp.arange(accum))


def random_positions(cfg: ModelConfig, key: jax.Array, micro: int, rows_per_rank: int, T: int):
    """Training positions [micro, T] under `randomize_positions_from = M` (spec §2.4.1): per device
    micro-batch, one sorted random set of T distinct positions from [0, M), shared by its rows."""
    keys = jax.random.split(key, micro // rows_per_rank)
    pos = jax.vmap(lambda k: jnp.sort(jax.random.permutation(k, cfg.randomize_positions_from)[:T]))(keys)
    return jnp.repeat(pos, rows_per_rank, axis=0)


def depth_group_count(requested: int, rows_per_rank: int) -> int:
    """Groups per micro-batch for `train.depth_groups`: the largest divisor of a device's rows that is
    at most `requested` (0: no sorting, the official layout)."""
    if requested <= 0:
        return 0
    return max(g for g in range(1, min(requested, rows_per_rank) + 1) if rows_per_rank % g == 0)


def depth_order(n, k, accum: int, micro: int, ranks: int, groups: int):
    """The row layout that sorts a step's sequences by sampled depth: `order` [A, micro] with
    `new[a, j] = old.flat[order[a, j]]`.

    Sorted ascending by n + k (a per-token row by its deepest token), micro-batch a takes the a-th
    block of the sorted rows, and inside it the rows are dealt so that group g of every device holds
    consecutive sorted rows (the layout `Parcae.forward_train` groups with `row_shards`). Every row
    keeps its own depths, h0, positions and loss weight, so the objective is unchanged."""
    total = n + k
    total = total.reshape(accum * micro, -1).max(axis=-1)
    ranked = jnp.argsort(total, stable=True).reshape(accum, groups, ranks, micro // (groups * ranks))
    return ranked.transpose(0, 2, 1, 3).reshape(accum, micro)


def make_train_step(setup: TrainSetup, train_cfg):
    """`train_step(state, batch, key) -> (state, metrics)`; batch = {"inputs", "labels"[, "mask"]}."""
    cfg, graphdef, tx = setup.model_cfg, setup.graphdef, setup.tx
    k_max = max_grad_steps(cfg) if cfg.arch == "parcae" else 0
    z_loss = float(train_cfg.z_loss)
    per_rank = rank_rows(setup)
    normalization = str(train_cfg.loss_normalization)
    chunk_len = int(train_cfg.loss_chunk_len)
    groups = depth_group_count(int(train_cfg.depth_groups), per_rank) if cfg.arch == "parcae" else 0
    ranks = setup.global_micro_batch // per_rank

    def micro_loss(params, mb, weights, depths, h0, positions):
        model = nnx.merge(graphdef, params)
        if cfg.arch == "parcae":
            n, k = depths
            x, tel = model.forward_train(
                mb["inputs"], n, k, max_grad_steps=k_max, initial_state=h0, positions=positions,
                depth_groups=max(groups, 1), row_shards=ranks if groups else 1, features=True,
            )
        else:
            x, tel = model.forward_train(mb["inputs"], positions=positions, features=True)
        # The head and loss a sequence chunk at a time, recomputed in the backward pass.
        nll, lse = losses.over_chunks(lambda xc, lc: losses.token_losses(model.head(xc), lc), chunk_len,
                                      x, mb["labels"], remat=chunk_len > 0)
        objective = jnp.sum(nll * weights)
        if z_loss:
            objective = objective + z_loss * jnp.sum(jnp.square(lse) * weights)
        return objective, (jnp.sum(nll * weights), tel)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state, batch, key):
        params, step = state["params"], state["step"]
        valid = batch["labels"] != losses.IGNORE_INDEX
        if "mask" in batch:
            valid = valid & batch["mask"].astype(bool)
        total_tokens = jnp.sum(valid).astype(jnp.float32)
        weights = token_weights(valid, per_rank, normalization)
        A, Bm, T = batch["inputs"].shape
        step_key = jax.random.fold_in(key, step)
        depth_key, state_key, pos_key = jax.random.split(step_key, 3)
        # Depths and h0 are functions of (step, global sequence index) (per device where the official
        # semantics are per rank), so every mesh and accumulation split of the same batch agrees.
        seq_index = jnp.arange(A * Bm).reshape(A, Bm)
        positions = None
        if cfg.randomize_positions_from is not None:
            positions = jax.vmap(lambda a: random_positions(cfg, jax.random.fold_in(pos_key, a), Bm, per_rank,
                                                            T))(jnp.arange(A))
        if cfg.arch == "parcae":
            depths = draw_depths(cfg, depth_key, step, A, Bm, per_rank, T)
        else:
            depths = (jnp.zeros((A,), jnp.int32), jnp.zeros((A,), jnp.int32))
        rows = (batch, weights, depths, seq_index, positions)
        if groups:  # every row moves with its depths, h0 (by its index), positions and loss weight
            order = depth_order(*depths, A, Bm, ranks, groups)
            rows = jax.tree.map(lambda x: x.reshape(A * Bm, *x.shape[2:])[order], rows)
            # The permutation is a gather across the whole batch, after which the partitioner keeps
            # the rows replicated: without this constraint every device computed the full global
            # micro-batch (seen in the XLA cost analysis of `parcae_jax.aot`).
            rows = jax.tree.map(
                lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(setup.mesh, PartitionSpec(
                    *BATCH_SPEC[:2], *(None,) * (x.ndim - 2)))), rows)

        def body(carry, xs):
            grads, nll = carry
            mb, w, (n, k), seqs, pos = xs
            h0 = row_states(state_key, cfg, seqs, T) if cfg.arch == "parcae" else None
            (_, (nll_mb, tel)), g = grad_fn(params, mb, w, (n, k), h0, pos)
            grads = jax.tree.map(jnp.add, grads, g)
            return (grads, nll + nll_mb), tel

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (grads, loss), tels = jax.lax.scan(body, (zeros, jnp.zeros([], jnp.float32)), rows)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "target_tokens": total_tokens,
            **optimizer_metrics(opt_state),
            **{k: jnp.mean(v) for k, v in tels.items()},
        }
        new_state = {"params": new_params, "opt_state": opt_state, "step": step + 1}
        return new_state, metrics

    # Metrics are replicated so every process can read them (multi-process runs included).
    replicated = NamedSharding(setup.mesh, PartitionSpec())
    return jax.jit(
        train_step,
        in_shardings=(setup.state_shardings, setup.batch_sharding, None),
        out_shardings=(setup.state_shardings, replicated),
        donate_argnums=0,
    )


def compile_train_step(step_fn, state, setup: TrainSetup, block_size: int):
    """Compile ahead of time once; returns (compiled, memory analysis or None)."""
    T = block_size
    batch = {
        "inputs": jax.ShapeDtypeStruct((setup.accum, setup.global_micro_batch, T), jnp.int32),
        "labels": jax.ShapeDtypeStruct((setup.accum, setup.global_micro_batch, T), jnp.int32),
    }
    # Traced with the mesh in context: the attention's `auto` backend places its kernel by it (splash on
    # a TPU mesh runs under shard_map; without a mesh it would fall back to XLA attention).
    with jax.set_mesh(setup.mesh):
        compiled = step_fn.lower(abstract_state(state), batch, jax.random.key(0)).compile()
    try:
        mem = compiled.memory_analysis()
    except Exception:  # not every backend reports it
        mem = None
    return compiled, mem
