"""Generation with a preallocated KV cache and adaptive per-token depth (`generate`); the command line
is `parcae_jax.generate`.

Generation prefills all prompts in one call (right-padded; every row keeps its real positions, so
RoPE and the initial state see position p at cache index p), then decodes one token per row per
step: inside one `lax.while_loop` when nothing is streamed, or a jitted step driven from Python when
`on_token` is given (the CLI streams that way). Both use the same step, so they give the same tokens.

Determinism: the initial recurrent state follows the project's one rule (`model.row_states`): row b's
h0 is drawn from fold_in(state key, b), and position p reads h0[b, p], exactly as a no-cache forward
over the whole sequence with `initial_state=h0[:, :T]`; so greedy decoding with the cache equals the
no-cache recomputation (tested). Position p's state depends only on the key, the row and p: not on
the batch size, max_len or the depth. The depth is a runtime value (no recompilation) up to
`max_depth`, which sizes the cache.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from parcae_jax.errors import ConfigError
from parcae_jax.kv_cache import CachePlan, budget_lookup, forward_chunk, init_cache
from parcae_jax.model import row_states
from parcae_jax.sampling import PLAIN, Sampling, sample_tokens

# ---------------------------------------------------------------------------------------------------
# Jitted prefill / decode (model passed as a static graphdef + its state: cheap per-token dispatch)
# ---------------------------------------------------------------------------------------------------

_STATIC = ("graphdef", "plan", "sampling")
# `run` (a dict pytree, traced) holds what a generation call fixes at its start: "lengths" [B] prompt
# lengths, "h0" [B, max_len, d_r] initial states (None: GPT), "num_steps", "exit_eps", the sampling
# "key" and "stop" [B, S] stop ids (-1 padded).


def _forward(model, cache, ids, positions, h0, run, plan):
    return forward_chunk(model, cache, ids, positions, h0, run["num_steps"], run["exit_eps"], plan)


def _next_token(model, logits, run, t, sampling):
    return sample_tokens(logits[:, : model.config.vocab_size], jax.random.fold_in(run["key"], t), sampling)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames="cache")
def _prefill(graphdef, params, cache, ids, run, *, plan, sampling):
    """Prompts [B, Lp] (row b real up to lengths[b]) → (first new token [B], its pass's depth [B],
    cache, prompt depths [B, Lp])."""
    model = nnx.merge(graphdef, params)
    B, T = ids.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    h0 = None if run["h0"] is None else run["h0"][:, :T]
    logits, cache, depth = _forward(model, cache, ids, positions, h0, run, plan)
    last = (run["lengths"] - 1)[:, None]
    tok = _next_token(model, jnp.take_along_axis(logits, last[..., None], axis=1)[:, 0], run, 0, sampling)
    return tok, jnp.take_along_axis(depth, last, axis=1)[:, 0], cache, depth


def _decode(model, cache, tok, t, run, plan, sampling):
    """Feed new token t−1 (`tok` [B]) at position lengths + t − 1: (token t [B], depth [B], cache)."""
    pos = (run["lengths"] + t - 1)[:, None]
    h0 = None if run["h0"] is None else jnp.take_along_axis(run["h0"], pos[..., None], axis=1)
    logits, cache, depth = _forward(model, cache, tok[:, None], pos, h0, run, plan)
    return _next_token(model, logits[:, 0], run, t, sampling), depth[:, 0], cache


@functools.lru_cache(maxsize=8)
def _decode_step(graphdef, plan, sampling):
    """Jitted `(params, cache, tok, t, run) -> (token, depth, cache)` for streaming. Built once per
    (graphdef, plan, sampling): hashing a graphdef costs milliseconds, too much to do per token."""

    def step(params, cache, tok, t, run):
        return _decode(nnx.merge(graphdef, params), cache, tok, t, run, plan, sampling)

    return jax.jit(step, donate_argnums=1)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames="cache")
def _decode_loop(graphdef, params, cache, tok0, depth0, run, out0, *, plan, sampling):
    """All remaining tokens in one while_loop; `out0` [B, M] fixes the number of new tokens.
    Returns (tokens [B, M], -1 after a row stopped; depths [B, M]; the final cache)."""
    model = nnx.merge(graphdef, params)

    def body(carry):
        t, cache, tok, done, out, depths = carry
        nxt, depth, cache = _decode(model, cache, tok, t, run, plan, sampling)
        out = out.at[:, t].set(jnp.where(done, -1, nxt))
        return t + 1, cache, nxt, done | _is_stop(nxt, run["stop"]), out, depths.at[:, t].set(depth)

    def cond(carry):
        return (carry[0] < out0.shape[1]) & ~jnp.all(carry[3])

    out, depths = out0.at[:, 0].set(tok0), jnp.zeros_like(out0).at[:, 0].set(depth0)
    done = _is_stop(tok0, run["stop"])
    carry = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, tok0, done, out, depths))
    return carry[4], carry[5], carry[1]


def _is_stop(tok, stop):
    return jnp.any(tok[:, None] == stop, axis=1)


# ---------------------------------------------------------------------------------------------------
# generate()
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Generation:
    """Per row: `tokens` new ids (a stop token, when hit, is the last), `depths` recurrences run by
    the pass that produced each of them, `prompt_depths` recurrences each prompt token ran. Also the
    initial state h0 [B, max_len, d_r] the key gave (Parcae; None for GPT), the static `plan` and
    the wall time of both phases."""

    tokens: list[list[int]]
    depths: list[list[int]]
    prompt_depths: list[list[int]]
    initial_state: jax.Array | None
    plan: CachePlan
    prefill_s: float = 0.0  # wall time of the prefill call, compilation included on a first call
    decode_s: float = 0.0  # wall time of the decoding that followed

    @property
    def mean_depth(self) -> float:
        flat = [d for row in self.depths for d in row]
        return float(np.mean(flat)) if flat else 0.0


def _stop_array(stop_tokens, batch: int) -> np.ndarray:
    """[B, S] int32, -1 padded: one list for every row, or one list per row."""
    stop_tokens = list(stop_tokens or [])
    rows = stop_tokens if stop_tokens and isinstance(stop_tokens[0], Iterable) else [stop_tokens] * batch
    if len(rows) != batch:
        raise ConfigError(f"stop_tokens has {len(rows)} rows for {batch} prompts")
    width = max(1, max(len(list(r)) for r in rows))
    out = np.full((batch, width), -1, np.int32)
    for b, r in enumerate(rows):
        out[b, : len(list(r))] = list(r)
    return out


def check_request(cfg, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Refuse a request the model cannot serve (ConfigError naming the numbers), before any work."""
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ConfigError("generate needs at least one prompt, each with at least one token")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.rope_table_length:
        raise ConfigError(
            f"a prompt of {longest} tokens plus {max_new_tokens} new tokens exceeds the model's block_size "
            f"{cfg.rope_table_length}; shorten the prompt or lower --max-new-tokens to at most "
            f"{max(cfg.rope_table_length - longest, 0)}"
        )


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    num_steps: int | None = None,
    sampling: Sampling = PLAIN,
    stop_tokens: Sequence[int] | Sequence[Sequence[int]] = (),
    key: int | jax.Array = 0,
    exit_eps: float | None = None,
    exit_criterion: str = "residual",
    exited_kv: str = "last",
    lookup: str = "full",
    cache_budget: int | None = None,
    max_depth: int | None = None,
    on_token: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
) -> Generation:
    """Sample up to `max_new_tokens` tokens after each prompt (lists of token ids, any lengths).

    `num_steps`: recurrences (default `mean_recurrence`), at most `max_depth` (default num_steps),
    which sizes the cache. `exit_eps`: enable adaptive depth with `exit_criterion` and `exited_kv`
    (see `kv_cache`). `cache_budget=k`:
    k recurrence slots per core layer (`compress-s<k>`), or any official `lookup`. `stop_tokens`:
    ids ending a row (one list, or one per row). `on_token(t, tokens [B], done [B])` streams each step
    (tokens -1 for rows that already stopped). `key`: seed or PRNG key for the state and sampling.
    """
    cfg = model.config
    prompts = [[int(x) for x in p] for p in prompts]
    check_request(cfg, prompts, max_new_tokens)
    parcae = cfg.arch == "parcae"
    num_steps = int(cfg.mean_recurrence if num_steps is None else num_steps) if parcae else 1
    max_depth = max(num_steps, 1) if max_depth is None or not parcae else int(max_depth)
    if num_steps > max_depth:
        raise ConfigError(f"num_steps={num_steps} exceeds max_depth={max_depth} (the cache's depth)")
    if cache_budget is not None:
        if lookup != "full":
            raise ConfigError(f"give cache_budget or lookup, not both (lookup={lookup!r})")
        lookup = budget_lookup(cache_budget)
    B, lengths = len(prompts), np.array([len(p) for p in prompts], np.int32)
    Lp = int(lengths.max())
    plan = CachePlan(
        max_len=Lp + max_new_tokens,
        max_depth=max_depth,
        lookup=lookup if parcae else "full",
        exit_criterion=exit_criterion if parcae and exit_eps is not None else None,
        exited_kv=exited_kv,
    )
    key = jax.random.key(key) if isinstance(key, int) else key
    state_key, sample_key = jax.random.split(key)
    h0_all = row_states(state_key, cfg, jnp.arange(B), plan.max_len) if parcae else None
    ids = np.zeros((B, Lp), np.int32)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = p
    run = {
        "lengths": jnp.asarray(lengths),
        "h0": h0_all,
        "num_steps": jnp.int32(num_steps),
        "exit_eps": jnp.float32(exit_eps or 0.0),
        "key": sample_key,
        "stop": jnp.asarray(_stop_array(stop_tokens, B)),
    }
    graphdef, params = nnx.split(model)
    static = dict(plan=plan, sampling=sampling)
    cache = init_cache(cfg, B, plan)
    start = time.perf_counter()
    tok, depth0, cache, prompt_depth = _prefill(graphdef, params, cache, ids, run, **static)
    jax.block_until_ready(tok)
    prefill_s, start = time.perf_counter() - start, time.perf_counter()
    if on_token is None:
        out0 = jnp.zeros((B, max_new_tokens), jnp.int32)
        out, depths, _ = _decode_loop(graphdef, params, cache, tok, depth0, run, out0, **static)
        out, depths = np.asarray(out), np.asarray(depths)
    else:
        step = functools.partial(_decode_step(graphdef, plan, sampling), params)
        out, depths = _stream(step, cache, tok, depth0, run, max_new_tokens, on_token)
    decode_s = time.perf_counter() - start
    tokens, used = [], []
    for b in range(B):
        n = int(np.argmax(out[b] < 0)) if np.any(out[b] < 0) else max_new_tokens
        tokens.append(out[b, :n].tolist())
        used.append(depths[b, :n].tolist())
    prompt_depth = np.asarray(prompt_depth)
    return Generation(
        tokens=tokens,
        depths=used,
        prompt_depths=[prompt_depth[b, : lengths[b]].tolist() for b in range(B)],
        initial_state=h0_all,
        plan=plan,
        prefill_s=prefill_s,
        decode_s=decode_s,
    )


def _stream(step, cache, tok, depth0, run, max_new_tokens, on_token):
    """The Python-driven twin of `_decode_loop`: one jitted `step` per token, `on_token` after each."""
    stop = np.asarray(run["stop"])
    B = stop.shape[0]
    out = np.full((B, max_new_tokens), -1, np.int32)
    depths = np.zeros((B, max_new_tokens), np.int32)
    out[:, 0], depths[:, 0] = np.asarray(tok), np.asarray(depth0)
    done = np.any(out[:, :1] == stop, axis=1)
    on_token(0, out[:, 0].copy(), done.copy())
    for t in range(1, max_new_tokens):
        if done.all():
            break
        tok, depth, cache = step(cache, tok, np.int32(t), run)
        tok_np = np.asarray(tok)
        out[:, t], depths[:, t] = np.where(done, -1, tok_np), np.asarray(depth)
        done = done | np.any(tok_np[:, None] == stop, axis=1)
        on_token(t, out[:, t].copy(), done.copy())
    return out, depths
