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


class _LM(nnx.Module):
    """Pieces shared by Parcae and GPT: embeddings, value embeddings, head, RoPE positions."""

    config: ModelConfig

    def _init_embeddings(self, cfg: ModelConfig, rngs: nnx.Rngs):
        V, d = cfg.padded_vocab, cfg.n_embd
        self.wte = Embed(
            V, d, axes=("vocab", "embed"), init_fn=inits.matrix(cfg, cfg.embedding_std), cfg=cfg, rngs=rngs
        )
        ve_width = cfg.n_kv_heads * cfg.head_size
        # Official default nn.Embedding init N(0, 1), never re-initialised.
        self.value_embeds = nnx.Dict(
            {
                str(i): Embed(
                    V, ve_width, axes=("vocab", "kv_heads"), init_fn=inits.normal(1.0), cfg=cfg, rngs=rngs
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

    def _ve(self, ids, table: int):
        key = str(table)
        return self.value_embeds[key](ids) if key in self.value_embeds else None

    def _rope(self, ids, positions):
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

    def _embed(self, ids):
        x = self.wte(ids).astype(jnp.float32)
        return x * self.config.embedding_scale if self.config.embedding_scale != 1.0 else x

    def _head(self, x: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
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


class Parcae(_LM):
    """`model(ids, num_steps=R, initial_state=h0)` → logits [B, L, V_padded] (evaluation semantics)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        if cfg.arch != "parcae":
            raise ValueError(f"Parcae needs a Parcae config, got arch={cfg.arch!r}")
        inits.check_strategy(cfg)
        self.config = cfg
        d = cfg.n_embd
        self._init_embeddings(cfg, rngs)
        ids = cfg.layer_ids()

        def stage(name, width, heads, kv_heads, hidden):
            return nnx.List(
                [
                    Block(
                        cfg,
                        width=width,
                        heads=heads,
                        kv_heads=kv_heads,
                        hidden=hidden,
                        has_gate=cfg.has_ve_gate(layer_id),
                        rngs=rngs,
                    )
                    for layer_id in ids[name]
                ]
            )

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

    # ---- pieces -------------------------------------------------------------------------------
    def prelude_forward(self, ids, rope) -> Float[Array, "B T D"]:
        tables = self.config.ve_tables()["prelude"]
        x = self._embed(ids)
        for blk, table in zip(self.prelude, tables, strict=True):
            x = blk(x, self._ve(ids, table), *rope)
        return self.ln_prelude(x) if self.ln_prelude is not None else x

    def coda_forward(self, h, ids, rope) -> Float[Array, "B T V"]:
        cfg = self.config
        x = self.C(h).astype(jnp.float32)
        remat_coda = cfg.remat and "in-coda" in cfg.activation_checkpoint_impl
        for blk, table in zip(self.coda, cfg.ve_tables()["coda"], strict=True):
            ve = self._ve(ids, table)
            if remat_coda:
                x = nnx.remat(lambda b, x, ve: b(x, ve, *rope))(blk, x, ve)
            else:
                x = blk(x, ve, *rope)
        return self._head(self.ln_f(x))

    def initial_state(self, ids, rng=None, initial_state=None):
        shape = (*ids.shape, self.config.d_rec)
        if initial_state is not None:
            if initial_state.shape != shape:
                raise ValueError(f"initial_state has shape {initial_state.shape}, expected {shape}")
            return initial_state.astype(jnp.float32)
        return init_state(jax.random.key(0) if rng is None else rng, self.config, shape)

    def _step_fn(self, ids, e, rope, *, training: bool):
        """A pure `h -> h'` applying one recurrence (injection, then every core block)."""
        cfg = self.config
        graph_a, state_a = nnx.split(self.adapter)
        graph_c, state_c = nnx.split(self.core_block)
        ves = [self._ve(ids, t) for t in cfg.ve_tables()["core_block"]]
        e_term = self.adapter.input_term(e)  # loop-invariant half of the injection
        per_block = training and cfg.remat and "per-block" in cfg.activation_checkpoint_impl
        policy = _remat_policy(cfg.activation_checkpoint_impl)

        def step(state_a, state_c, e_term, ves, h):
            adapter, core = nnx.merge(graph_a, state_a), nnx.merge(graph_c, state_c)
            x = adapter(h, e_term)
            for blk, ve in zip(core, ves, strict=True):
                if per_block:
                    x = jax.checkpoint(lambda x, ve, b=blk: b(x, ve, *rope), policy=policy)(x, ve)
                else:
                    x = blk(x, ve, *rope)
            return x

        return step, (state_a, state_c, e_term, ves)

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
    ):
        """Logits after `num_steps` recurrences (default `mean_recurrence`; may be a traced int, so
        changing it does not recompile). h0 is `initial_state`, else drawn from `rng` (default key 0)."""
        cfg = self.config
        num_steps = cfg.mean_recurrence if num_steps is None else num_steps
        rope = self._rope(ids, positions)
        e = self.prelude_forward(ids, rope)
        h0 = self.initial_state(ids, rng, initial_state)
        step, args = self._step_fn(ids, e, rope, training=False)

        def body(_, carry):
            h, _ = carry
            return step(*args, h), h

        h, h_prev = jax.lax.fori_loop(0, num_steps, body, (h0, h0))
        logits = self.coda_forward(h, ids, rope)
        if not return_telemetry:
            return logits
        return logits, self._telemetry(h, h_prev, num_steps, 0)

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
    ):
        """Truncated-BPTT forward: per element, `n` gradient-free then `k` gradient recurrences.

        `n_steps`/`k_steps` are int arrays of shape (), (B,) or (B, T) (per-batch/sequence/token). All
        elements run max(n) then `max_grad_steps` masked steps (gradient steps beyond the batch's
        max(k) are skipped by `lax.cond`), so one compiled program serves every sampled depth. An
        element whose depth is exhausted keeps its state (per-token: it still serves as key/value).
        Returns (logits fp32 [B, T, V], telemetry dict).
        """
        cfg = self.config
        rope = self._rope(ids, positions)
        e = self.prelude_forward(ids, rope)
        h0 = jax.lax.stop_gradient(self.initial_state(ids, rng, initial_state))
        step, args = self._step_fn(ids, e, rope, training=True)

        def as_mask_source(x):
            x = jnp.asarray(x, jnp.int32)
            return x.reshape(x.shape + (1,) * (3 - x.ndim))  # broadcast against [B, T, Dr]

        n_b, k_b = as_mask_source(n_steps), as_mask_source(k_steps)

        # Gradient-free prefix: every input is stop-gradient'ed so autodiff never sees the while loop.
        frozen = _stop_gradient_tree(args)

        def nograd_body(i, h):
            return jnp.where(i < n_b, step(*frozen, h), h)

        h = jax.lax.stop_gradient(jax.lax.fori_loop(0, jnp.max(n_b), nograd_body, h0))

        grad_step = step
        if cfg.remat and "per-iteration" in cfg.activation_checkpoint_impl:
            grad_step = jax.checkpoint(step, policy=_remat_policy(cfg.activation_checkpoint_impl))
        k_max_batch = jnp.max(k_b)

        def grad_body(carry, i):
            h, res = carry
            h_new = jax.lax.cond(i < k_max_batch, lambda h: grad_step(*args, h), lambda h: h, h)
            active = i < k_b
            rel = _rel_residual(h_new, h)
            res = jnp.where(active[..., 0], jax.lax.stop_gradient(rel), res)
            return (jnp.where(active, h_new, h), res), None

        res0 = jnp.zeros(h.shape[:2], jnp.float32)
        (h, res), _ = jax.lax.scan(grad_body, (h, res0), jnp.arange(max_grad_steps))
        logits = self.coda_forward(h, ids, rope)
        tel = self._telemetry(h, None, jnp.mean(n_b), jnp.mean(k_b))
        tel["rel_residual"] = jnp.mean(res)
        return logits, tel

    def _telemetry(self, h, h_prev, n, k):
        h = jax.lax.stop_gradient(h)
        tel = {k_: jax.lax.stop_gradient(v) for k_, v in self.adapter.telemetry().items()}
        tel["state_norm"] = jnp.mean(jnp.linalg.norm(h, axis=-1))
        if h_prev is not None:
            tel["rel_residual"] = jnp.mean(_rel_residual(h, h_prev))
        tel["num_steps_no_grad"] = jnp.asarray(n, jnp.float32)
        tel["num_steps_with_grad"] = jnp.asarray(k, jnp.float32)
        return tel


def _rel_residual(h_new, h_old):
    """‖h_t − h_{t−1}‖ / ‖h_t‖ per token."""
    diff = jnp.linalg.norm(h_new - h_old, axis=-1)
    return diff / (jnp.linalg.norm(h_new, axis=-1) + 1e-12)


class GPT(_LM):
    """The non-looped baseline with the same layers: `model(ids)` → logits [B, L, V_padded]."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        if cfg.arch != "gpt":
            raise ValueError(f"GPT needs a GPT config, got arch={cfg.arch!r}")
        inits.check_strategy(cfg)
        self.config = cfg
        self._init_embeddings(cfg, rngs)
        self.h = nnx.List(
            [
                Block(
                    cfg,
                    width=cfg.n_embd,
                    heads=cfg.num_attention_heads,
                    kv_heads=cfg.n_kv_heads,
                    hidden=cfg.mlp_hidden,
                    has_gate=cfg.has_ve_gate(i),
                    rngs=rngs,
                )
                for i in range(cfg.n_layer)
            ]
        )
        self.ln_f = Norm(cfg.n_embd, cfg)

    def __call__(self, ids: Int[Array, "B T"], *, positions=None, **unused):
        cfg = self.config
        rope = self._rope(ids, positions)
        x = self._embed(ids)
        for i, blk in enumerate(self.h):
            ve = self._ve(ids, i)
            if cfg.remat:
                x = nnx.remat(lambda b, x, ve: b(x, ve, *rope))(blk, x, ve)
            else:
                x = blk(x, ve, *rope)
        return self._head(self.ln_f(x))

    def forward_train(self, ids, n_steps=None, k_steps=None, *, max_grad_steps=0, positions=None, **unused):
        return self(ids, positions=positions), {}


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
