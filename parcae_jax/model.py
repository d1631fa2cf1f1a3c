"""Parcae (prelude → looped core → coda) and the GPT baseline, in Flax NNX (PARCAE_SPEC §2).

Module tree names follow the official state-dict keys (§11) so conversion is a fixed renaming.
The recurrence splits the injection and core blocks once (`nnx.split`) and closes over their state
in `jax.lax.fori_loop` (evaluation, gradient-free prefix) and `jax.lax.scan` (gradient steps): only
the hidden state is carried and the core weights are never copied per step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from parcae_jax import init as inits
from parcae_jax.config import ModelConfig
from parcae_jax.injection import make_injection
from parcae_jax.layers import Block, Embed, Linear, Norm, rope_table
from parcae_jax.loop import per_element, recur, rel_residual


def init_state(key: jax.Array, cfg: ModelConfig, shape: tuple[int, ...]) -> Float[Array, "B T Dr"]:
    """Initial recurrent state h0 for every official `state_init` (spec §2.5), fp32."""
    kind = cfg.state_init
    if kind == "zero":
        return jnp.zeros(shape, jnp.float32)
    if kind == "normal":
        return jax.random.normal(key, shape, jnp.float32)
    if kind == "embed":
        return jax.random.normal(key, shape, jnp.float32) / jnp.sqrt(cfg.n_embd)
    if kind == "like-init":
        std = cfg.embedding_std
        h = std * jax.random.truncated_normal(key, -3.0, 3.0, shape, jnp.float32)
        return h * cfg.embedding_scale
    if kind == "unit":
        h = jax.random.normal(key, shape, jnp.float32)
        mean = h.mean(-1, keepdims=True)
        std = jnp.std(h, axis=-1, keepdims=True, ddof=1)
        return (h - mean) / (std + 1e-8)
    raise ValueError(f"unknown state_init {kind!r}")


def row_states(key: jax.Array, cfg: ModelConfig, rows: Int[Array, " B"], length: int
               ) -> Float[Array, "B T Dr"]:
    """The one initial-state rule: row r's h0 is `init_state(fold_in(key, r), (length, d_r))`.

    Training, validation, scoring, generation and reports all draw h0 this way, with `rows` the global
    row ids of their stream. JAX's partitionable threefry makes position p's noise depend only on
    (key, r, p), not on `length`, so a prefix of a row gets the states of the whole row's prefix.
    """
    return jax.vmap(lambda r: init_state(jax.random.fold_in(key, r), cfg, (length, cfg.d_rec)))(rows)


def _remat_policy(impl: str):
    if "sac" in impl:
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return None  # full recompute


def _stop_gradient_tree(tree):
    return jax.tree.map(jax.lax.stop_gradient, tree)


def _blocks(cfg: ModelConfig, layer_ids, width, heads, kv_heads, hidden, rngs: nnx.Rngs) -> nnx.List:
    """One stage's blocks; each layer id decides its value-embedding gate (spec §2.6)."""
    return nnx.List(
        [
            Block(cfg, width=width, heads=heads, kv_heads=kv_heads, hidden=hidden,
                  has_gate=cfg.has_ve_gate(layer_id), rngs=rngs)
            for layer_id in layer_ids
        ]
    )


class _LM(nnx.Module):
    """Pieces shared by Parcae and GPT: embeddings, value embeddings, head, RoPE positions."""

    config: ModelConfig
    arch: str  # the config arch the subclass builds

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        """Checks and the embeddings/head, created first (the parameter init order is fixed)."""
        if cfg.arch != self.arch:
            raise ValueError(f"{type(self).__name__} needs a {self.arch} config, got arch={cfg.arch!r}")
        inits.check_strategy(cfg)
        self.config = cfg
        V, d = cfg.padded_vocab, cfg.n_embd
        self.wte = Embed(
            V, d, axes=("vocab", "embed"), init_fn=inits.matrix(cfg, cfg.embedding_std), cfg=cfg, rngs=rngs
        )
        ve_width = cfg.n_kv_heads * cfg.head_size
        # Official default nn.Embedding init N(0, 1), never re-initialised. Sharded as wte is: a table's
        # width takes the fsdp axis (with "kv_heads" there it found the tensor axis already taken by
        # "vocab" and stayed whole on every device, the tables and their Adam moments included).
        self.value_embeds = nnx.Dict(
            {
                str(i): Embed(
                    V, ve_width, axes=("vocab", "embed"), init_fn=inits.normal(1.0), cfg=cfg, rngs=rngs
                )
                for i in cfg.ve_table_indices()
            }
        )
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else Linear(
                d,
                V,
                axes=("embed", "vocab"),
                init_fn=inits.matrix(cfg, cfg.embedding_std),
                use_bias=False,
                cfg=cfg,
                rngs=rngs,
            )
        )

    def value_embedding(self, ids, table: int):
        """The value embedding of table `table` for `ids`, or None where the table does not exist."""
        key = str(table)
        return self.value_embeds[key](ids) if key in self.value_embeds else None

    def rope(self, ids, positions=None):
        """RoPE (cos, sin) [B, T, D_h/2] at `positions` [B, T] (default 0..T-1)."""
        cfg = self.config
        T = ids.shape[1]
        if T > cfg.rope_table_length:
            raise ValueError(
                f"sequence length {T} exceeds the model's block_size {cfg.rope_table_length}; "
                "truncate the input or use a config with a larger block_size"
            )
        cos, sin = rope_table(cfg)
        if positions is None:
            positions = jnp.arange(T)[None, :]
        positions = jnp.broadcast_to(positions, ids.shape)
        return cos[positions], sin[positions]

    def embed(self, ids):
        x = self.wte(ids).astype(jnp.float32)
        return x * self.config.embedding_scale if self.config.embedding_scale != 1.0 else x

    def head(self, x: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        cfg = self.config
        cdt = jnp.dtype(cfg.compute_dtype)
        if self.lm_head is None:
            logits = self.wte.attend(x, cdt)
        else:
            logits = self.lm_head(x)
        logits = logits.astype(jnp.float32)
        if cfg.logit_softcap is not None:
            c = float(cfg.logit_softcap)
            logits = c * jnp.tanh(logits / c)
        return logits

    def _stage(self, blocks, tables, x, ids, rope, layer_kv, remat: bool):
        """Blocks in order; `layer_kv(i)` gives layer i its cache slot (see `Attention`), or None."""
        for i, (blk, table) in enumerate(zip(blocks, tables, strict=True)):
            ve, kv = self.value_embedding(ids, table), None if layer_kv is None else layer_kv(i)
            if remat:
                x = nnx.remat(lambda b, x, ve, kv=kv: b(x, ve, *rope, kv=kv))(blk, x, ve)
            else:
                x = blk(x, ve, *rope, kv=kv)
        return x


class Parcae(_LM):
    """`model(ids, num_steps=R, initial_state=h0)` → logits [B, L, V_padded] (evaluation semantics)."""

    arch = "parcae"

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        super().__init__(cfg, rngs)
        d = cfg.n_embd
        ids = cfg.layer_ids()

        def stage(name, width, heads, kv_heads, hidden):
            return _blocks(cfg, ids[name], width, heads, kv_heads, hidden, rngs)

        H, Hkv, F = cfg.num_attention_heads, cfg.n_kv_heads, cfg.mlp_hidden
        self.prelude = stage("prelude", d, H, Hkv, F)
        self.adapter = make_injection(cfg, rngs)
        # The core never uses GQA: its kv heads equal its query heads (spec §3.2).
        self.core_block = stage("core_block", cfg.d_rec, cfg.rec_heads, cfg.rec_heads, cfg.rec_mlp_hidden)
        self.C = Linear(
            cfg.d_rec,
            d,
            axes=("state", "embed"),
            init_fn=inits.matrix(cfg, cfg.embedding_std),
            use_bias=cfg.bias,
            cfg=cfg,
            rngs=rngs,
        )
        self.coda = stage("coda", d, H, Hkv, F)
        self.ln_f = Norm(d, cfg)
        self.ln_prelude = Norm(d, cfg) if cfg.prelude_norm else None

    # ---- pieces (the cached decode in kv_cache.py runs these same pieces with cache slots) ---------
    def prelude_forward(self, ids, rope, layer_kv=None) -> Float[Array, "B T D"]:
        """Embedding and prelude blocks: the injected input e (after `ln_prelude`)."""
        tables = self.config.ve_tables()["prelude"]
        x = self._stage(self.prelude, tables, self.embed(ids), ids, rope, layer_kv, remat=False)
        return self.ln_prelude(x) if self.ln_prelude is not None else x

    def coda_features(self, h, ids, rope, layer_kv=None, *, training: bool = False) -> Float[Array, "B T D"]:
        """C, coda blocks and ln_f: the features the head reads, from the final recurrent state."""
        cfg = self.config
        remat = training and cfg.remat and "in-coda" in cfg.activation_checkpoint_impl
        x = self.C(h).astype(jnp.float32)
        x = self._stage(self.coda, cfg.ve_tables()["coda"], x, ids, rope, layer_kv, remat=remat)
        return self.ln_f(x)

    def coda_forward(self, h, ids, rope, layer_kv=None, *, training: bool = False) -> Float[Array, "B T V"]:
        """`coda_features`, then the head: logits fp32 from the final recurrent state."""
        return self.head(self.coda_features(h, ids, rope, layer_kv, training=training))

    def initial_state(self, ids, rng=None, initial_state=None):
        shape = (*ids.shape, self.config.d_rec)
        if initial_state is not None:
            if initial_state.shape != shape:
                raise ValueError(f"initial_state has shape {initial_state.shape}, expected {shape}")
            return initial_state.astype(jnp.float32)
        return init_state(jax.random.key(0) if rng is None else rng, self.config, shape)

    def recurrence(self, ids, e, rope, *, training: bool):
        """The one recurrence step, for every caller: returns `(step, args)` with
        `step(args, h, layer_kv=None) -> h'` pure (injection, then every core block).

        `args = (weights, rows)`: `weights` the injection and core weights (split once, so loops close
        over them instead of copying them per step); `rows` what is per row [B, ...] (the loop-invariant
        half of the injection, the core's value embeddings, RoPE), so a caller may run the step on a
        subset of rows by slicing `rows` alone (`forward_train`'s depth groups). The gradient-free
        prefix passes them stop-gradient'ed. `layer_kv(j)` gives core layer j its cache slot at this
        step (decoding). Under training, per-block remat applies.
        """
        cfg = self.config
        graph_a, state_a = nnx.split(self.adapter)
        graph_c, state_c = nnx.split(self.core_block)
        ves = [self.value_embedding(ids, t) for t in cfg.ve_tables()["core_block"]]
        e_term = self.adapter.input_term(e)  # loop-invariant half of the injection
        per_block = training and cfg.remat and "per-block" in cfg.activation_checkpoint_impl
        policy = _remat_policy(cfg.activation_checkpoint_impl)

        def step(args, h, layer_kv=None):
            (state_a, state_c), (e_term, ves, rope) = args
            adapter, core = nnx.merge(graph_a, state_a), nnx.merge(graph_c, state_c)
            x = adapter(h, e_term)
            for j, (blk, ve) in enumerate(zip(core, ves, strict=True)):
                kv = None if layer_kv is None else layer_kv(j)
                if per_block:
                    block = jax.checkpoint(lambda x, ve, b=blk, kv=kv: b(x, ve, *rope, kv=kv), policy=policy)
                    x = block(x, ve)
                else:
                    x = blk(x, ve, *rope, kv=kv)
            return x

        return step, ((state_a, state_c), (e_term, ves, tuple(rope)))

    # ---- evaluation forward -------------------------------------------------------------------
    def __call__(
        self,
        ids: Int[Array, "B T"],
        *,
        num_steps=None,
        initial_state=None,
        rng=None,
        positions=None,
        return_telemetry: bool = False,
        features: bool = False,
    ):
        """Logits after `num_steps` recurrences (default `mean_recurrence`; may be a traced int, so
        changing it does not recompile). h0 is `initial_state`, else drawn from `rng` (default key 0).
        `features=True` returns the head's input [B, T, D] instead (`losses.over_chunks` applies the
        head a chunk at a time)."""
        cfg = self.config
        num_steps = cfg.mean_recurrence if num_steps is None else num_steps
        rope = self.rope(ids, positions)
        e = self.prelude_forward(ids, rope)
        h0 = self.initial_state(ids, rng, initial_state)
        step, args = self.recurrence(ids, e, rope, training=False)
        # A Python-int depth gives a static scan (differentiable); a traced one a while loop.
        out = recur(lambda r, h, c, run: (step(args, h), c, None), h0, count=num_steps, bound=num_steps)
        x = self.coda_features(out.h, ids, rope)
        logits = x if features else self.head(x)
        if not return_telemetry:
            return logits
        return logits, self._telemetry(out.h, out.h_prev, num_steps, 0)

    # ---- training forward ---------------------------------------------------------------------
    def forward_train(
        self,
        ids: Int[Array, "B T"],
        n_steps,
        k_steps,
        *,
        max_grad_steps: int,
        initial_state=None,
        rng=None,
        positions=None,
        depth_groups: int = 1,
        row_shards: int = 1,
        features: bool = False,
    ):
        """Truncated-BPTT forward: per element, `n` gradient-free then `k` gradient recurrences.

        `n_steps`/`k_steps` are int arrays of shape (), (B,) or (B, T) (per-batch/sequence/token). The
        gradient-free prefix runs in `depth_groups` groups of rows, each looping only to its own
        largest n (rows sorted by depth make the groups tight). With the rows split in `row_shards`
        equal blocks (one per data-parallel device), group g is the g-th slice of every block, so each
        group stays spread over every device and no rows move between devices. Then every element runs
        `max_grad_steps` masked steps (those beyond the batch's max(k) are skipped), so one compiled
        program serves every sampled depth (`loop.recur`). Returns (logits fp32 [B, T, V], or with
        `features` the head's input [B, T, D], and a telemetry dict with the executed and sampled
        recurrences per sequence).
        """
        cfg = self.config
        rope = self.rope(ids, positions)
        e = self.prelude_forward(ids, rope)
        h0 = jax.lax.stop_gradient(self.initial_state(ids, rng, initial_state))
        n = jnp.broadcast_to(per_element(n_steps, ids.shape), ids.shape)
        k = jnp.asarray(k_steps, jnp.int32)
        if ids.shape[0] % (depth_groups * row_shards):
            raise ValueError(f"depth_groups {depth_groups} x row_shards {row_shards} does not divide the "
                             f"{ids.shape[0]} rows of the batch")

        def group(x, g):  # [B, ...] -> group g's rows [B / depth_groups, ...]
            x = x.reshape(row_shards, depth_groups, -1, *x.shape[1:])[:, g]
            return x.reshape(-1, *x.shape[2:])

        step, args = self.recurrence(ids, e, rope, training=True)
        # Gradient-free prefix, group by group: every input is stop-gradient'ed so autodiff never sees
        # the while loops; a group's step reads its slice of the per-row arguments.
        frozen_weights, frozen_rows = _stop_gradient_tree(args)
        prefix, group_max = [], []
        for g in range(depth_groups):
            args_g = (frozen_weights, jax.tree.map(lambda x, g=g: group(x, g), frozen_rows))
            n_g = group(n, g)
            group_max.append(jnp.max(n_g))
            run = recur(lambda r, h, c, run, a=args_g: (step(a, h), c, None),
                        group(h0, g), count=n_g, bound=group_max[-1])
            prefix.append(run.h.reshape(row_shards, -1, *run.h.shape[1:]))
        h = jnp.stack(prefix, axis=1).reshape(h0.shape)  # back to the rows' order
        h = jax.lax.stop_gradient(h)

        grad_step = step
        if cfg.remat and "per-iteration" in cfg.activation_checkpoint_impl:
            grad_step = jax.checkpoint(step, policy=_remat_policy(cfg.activation_checkpoint_impl))
        out = recur(lambda r, h, c, run: (grad_step(args, h), c, None), h, count=k, bound=int(max_grad_steps))
        x = self.coda_features(out.h, ids, rope, training=True)
        tel = self._telemetry(out.h, None, jnp.mean(n), jnp.mean(k))
        tel["rel_residual"] = jnp.mean(rel_residual(out.h, out.h_prev))
        # Recurrences per sequence: sampled (n + k as drawn) and executed (its group's prefix bound
        # plus the gradient steps the masked scan ran).
        grad_trips = out.steps.astype(jnp.float32)
        tel["sampled_recurrences"] = jnp.mean((n + per_element(k, ids.shape)).astype(jnp.float32))
        tel["executed_recurrences"] = jnp.mean(jnp.stack(group_max).astype(jnp.float32)) + grad_trips
        return (x if features else self.head(x)), tel

    def _telemetry(self, h, h_prev, n, k):
        h = jax.lax.stop_gradient(h)
        tel = {k_: jax.lax.stop_gradient(v) for k_, v in self.adapter.telemetry().items()}
        tel["state_norm"] = jnp.mean(jnp.linalg.norm(h, axis=-1))
        if h_prev is not None:
            tel["rel_residual"] = jnp.mean(rel_residual(h, h_prev))
        tel["num_steps_no_grad"] = jnp.asarray(n, jnp.float32)
        tel["num_steps_with_grad"] = jnp.asarray(k, jnp.float32)
        return tel


class GPT(_LM):
    """The non-looped baseline with the same layers: `model(ids)` → logits [B, L, V_padded]."""

    arch = "gpt"

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        super().__init__(cfg, rngs)
        self.h = _blocks(cfg, cfg.layer_ids()["h"], cfg.n_embd, cfg.num_attention_heads, cfg.n_kv_heads,
                         cfg.mlp_hidden, rngs)
        self.ln_f = Norm(cfg.n_embd, cfg)

    def __call__(self, ids: Int[Array, "B T"], *, positions=None, layer_kv=None, features: bool = False,
                 **unused):
        """Logits (or with `features` the head's input); `layer_kv(i)` gives layer i its cache slot
        when decoding (see `Attention`)."""
        cfg = self.config
        rope = self.rope(ids, positions)
        x = self._stage(self.h, range(cfg.n_layer), self.embed(ids), ids, rope, layer_kv, remat=cfg.remat)
        x = self.ln_f(x)
        return x if features else self.head(x)

    def forward_train(self, ids, n_steps=None, k_steps=None, *, max_grad_steps=0, positions=None,
                      features: bool = False, **unused):
        return self(ids, positions=positions, features=features), {}


def build_model(cfg: ModelConfig | dict, *, seed: int = 0) -> Parcae | GPT:
    """A freshly initialised model for a config (or official-field dict)."""
    if isinstance(cfg, dict):
        cfg = ModelConfig.from_dict(cfg)
    cls = Parcae if cfg.arch == "parcae" else GPT
    return cls(cfg, nnx.Rngs(params=seed))


@functools.cache
def abstract_model(cfg: ModelConfig):
    """Shape-only model (no memory, no compute): for parameter counts and sharding plans."""
    return nnx.eval_shape(lambda: build_model(cfg))
