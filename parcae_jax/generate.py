"""Text generation with a preallocated KV cache, adaptive per-token depth, and the depth/loss report.

    python -m parcae_jax.generate --model PATH --prompt TEXT [--prompt TEXT ...] [--num-steps N]
        [--temperature T] [--top-k K] [--top-p P] [--max-new-tokens N] [--seed S]
        [--exit-eps EPS] [--exit-criterion residual|kl] [--exited-kv last|frozen]
        [--cache-budget K | --lookup compress-...] [--stop-token ID ...] [--tokenizer DIR]
    python -m parcae_jax.generate report --model PATH --data DATASET_DIR --eps 0,1e-3,1e-2
        [--num-steps N] [--exit-criterion residual|kl] [--exited-kv last|frozen] [--block-size T]
        [--batch-size B] [--max-batches N]

PATH is a training workdir (latest checkpoint, or `--step`), a parcae-jax pretrained folder or an
official PyTorch folder. The tokenizer is `--tokenizer`, else a `tokenizer/` folder inside or next to
PATH, else the one the training run used.

Generation prefills all prompts in one call (right-padded; every row keeps its real positions, so
RoPE and the initial state see position p at cache index p), then decodes one token per row per
step: inside one `lax.while_loop` when nothing is streamed, or a jitted step driven from Python when
`on_token` is given (the CLI streams that way). Both use the same step, so they give the same tokens.

Determinism: the initial recurrent state of every position is drawn once from the key as one
[B, max_len, d_r] array and position p reads row p, exactly as a no-cache forward over the whole
sequence with `initial_state=h0[:, :T]`; so greedy decoding with the cache equals the no-cache
recomputation (tested). The draw depends on the batch size and max_len, not on the depth.
The depth is a runtime value (no recompilation) up to `max_depth`, which sizes the cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from parcae_jax.depth_report import adaptive_depth_report, format_report
from parcae_jax.kv_cache import EXIT_CRITERIA, EXITED_KV, CachePlan, budget_lookup, forward_chunk, init_cache
from parcae_jax.model import init_state

_USAGE = __doc__.split("\n\n")[0]

# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Next-token rule (official order: temperature, top-k, then top-p). temperature <= 0: greedy."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def sample_tokens(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """int32 [B] from logits [B, V] (V = the real vocabulary, padding already cut)."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / max(sampling.temperature, 1e-8)
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p is not None and sampling.top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        # Keep a token while the mass before it is < top_p: the most likely one always stays.
        keep = jnp.cumsum(probs, axis=-1) - probs < sampling.top_p
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


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
        raise ValueError(f"stop_tokens has {len(rows)} rows for {batch} prompts")
    width = max(1, max(len(list(r)) for r in rows))
    out = np.full((batch, width), -1, np.int32)
    for b, r in enumerate(rows):
        out[b, : len(list(r))] = list(r)
    return out


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    num_steps: int | None = None,
    sampling: Sampling = Sampling(),
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
    if not prompts or min(len(p) for p in prompts) == 0:
        raise ValueError("generate needs at least one prompt, each with at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    parcae = cfg.arch == "parcae"
    num_steps = int(cfg.mean_recurrence if num_steps is None else num_steps) if parcae else 1
    max_depth = max(num_steps, 1) if max_depth is None or not parcae else int(max_depth)
    if num_steps > max_depth:
        raise ValueError(f"num_steps={num_steps} exceeds max_depth={max_depth} (the cache's depth)")
    if cache_budget is not None:
        if lookup != "full":
            raise ValueError(f"give cache_budget or lookup, not both (lookup={lookup!r})")
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
    h0_all = init_state(state_key, cfg, (B, plan.max_len, cfg.d_rec)) if parcae else None
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


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def load_model(path: str, step: int | None = None, **overrides):
    """A training workdir (checkpoints/ inside) or a native/official pretrained folder."""
    from parcae_jax import checkpointing, pretrained

    if (pathlib.Path(path).expanduser() / checkpointing.CHECKPOINT_DIR).is_dir():
        return checkpointing.load_model_from_workdir(path, step, **overrides)
    return pretrained.load_pretrained(path, **overrides)


def _has_tokenizer(folder: pathlib.Path) -> bool:
    return (folder / "tokenizer.model").is_file() or (folder / "tokenizer.json").is_file()


def find_tokenizer(model_path: str) -> str | None:
    """`tokenizer/` inside or next to the model folder, the folder itself, or the training run's."""
    from parcae_jax import checkpointing

    path = pathlib.Path(model_path).expanduser()
    for folder in (path / "tokenizer", path, path.parent / "tokenizer"):
        if folder.is_dir() and _has_tokenizer(folder):
            return str(folder)
    if not (path / checkpointing.CHECKPOINT_DIR).is_dir():
        return None
    ckpt = checkpointing.Checkpointer(path, async_save=False)
    try:
        step = ckpt.latest_step()
        data = ckpt.read_meta(step).get("config", {}).get("data", {}) if step is not None else {}
    finally:
        ckpt.close()
    if data.get("tokenizer"):
        return data["tokenizer"]
    if data.get("source") == "shakespeare":  # the folder `ensure_shakespeare_dataset` builds
        root = os.path.expanduser(data.get("cache_dir", "~/.cache/parcae_jax"))
        folder = pathlib.Path(root) / f"shakespeare-v{data.get('vocab_size')}" / "tokenizer"
        return str(folder) if _has_tokenizer(folder) else None
    return None


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def _add_model_args(parser):
    parser.add_argument("--model", required=True, help="training workdir, native or official folder")
    parser.add_argument("--step", type=int, default=None, help="a workdir's checkpoint (default: latest)")
    parser.add_argument("--num-steps", type=int, default=None, help="recurrences (default mean_recurrence)")
    parser.add_argument("--exit-criterion", choices=EXIT_CRITERIA, default="residual")
    parser.add_argument("--exited-kv", choices=EXITED_KV, default="last",
                        help="K/V an exited token serves at deeper steps (see parcae_jax.kv_cache)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed of the initial state and sampling")


def _sample_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m parcae_jax.generate", description=_USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(parser)
    parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--exit-eps", type=float, default=None, help="adaptive depth threshold (default off)")
    parser.add_argument("--cache-budget", type=int, default=None, help="core cache slots per layer")
    parser.add_argument("--lookup", default="full", help="official lookup strategy, e.g. compress-s4")
    parser.add_argument("--stop-token", type=int, action="append", default=None, help="default: EOS")
    parser.add_argument("--no-bos", action="store_true", help="do not start prompts with BOS")
    args = parser.parse_args(argv)

    from parcae_jax.data.tokenizer import load_tokenizer

    tok_path = args.tokenizer or find_tokenizer(args.model)
    if tok_path is None:
        parser.error(f"no tokenizer found for {args.model}; pass --tokenizer PATH")
    tokenizer = load_tokenizer(tok_path)
    model = load_model(args.model, args.step)
    prefix = [] if args.no_bos or tokenizer.bos_id is None else [tokenizer.bos_id]
    prompts = [prefix + tokenizer.encode(p) for p in args.prompt]
    default_stop = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    stop = args.stop_token if args.stop_token is not None else default_stop
    streamed = [[] for _ in prompts]
    shown = [""]

    def on_token(t, tokens, done):
        for b, x in enumerate(tokens):
            if x >= 0:
                streamed[b].append(int(x))
        text = tokenizer.decode(streamed[0])
        if text.startswith(shown[0]):  # a partial multi-byte character waits for its next token
            sys.stdout.write(text[len(shown[0]):])
            sys.stdout.flush()
            shown[0] = text

    single = len(prompts) == 1
    if single:
        sys.stdout.write(args.prompt[0])
        sys.stdout.flush()
    start = time.perf_counter()
    result = generate(
        model, prompts, max_new_tokens=args.max_new_tokens, num_steps=args.num_steps,
        sampling=Sampling(args.temperature, args.top_k, args.top_p), stop_tokens=stop, key=args.seed,
        exit_eps=args.exit_eps, exit_criterion=args.exit_criterion, exited_kv=args.exited_kv,
        lookup=args.lookup, cache_budget=args.cache_budget, on_token=on_token if single else None,
    )
    seconds = time.perf_counter() - start
    if single:
        sys.stdout.write(tokenizer.decode(result.tokens[0])[len(shown[0]):] + "\n")
    else:
        for prompt, tokens in zip(args.prompt, result.tokens, strict=True):
            print(f"--- {prompt}{tokenizer.decode(tokens)}")
    n = sum(len(t) for t in result.tokens)
    depth = f", mean depth {result.mean_depth:.2f}" if model.config.arch == "parcae" else ""
    print(f"[{n} tokens in {seconds:.2f} s (compile included){depth}]", file=sys.stderr)
    return 0


def _report_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m parcae_jax.generate report",
                                     description="Adaptive depth: mean depth and loss against fixed depth.")
    _add_model_args(parser)
    parser.add_argument("--data", required=True, help="prepared token dataset folder")
    parser.add_argument("--split", default="val")
    parser.add_argument("--eps", default="0,1e-3,3e-3,1e-2,3e-2,1e-1", help="comma list of thresholds")
    parser.add_argument("--block-size", type=int, default=None, help="default: the model's block_size")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-batches", type=int, default=4)
    args = parser.parse_args(argv)

    from parcae_jax.data.pipeline import eval_batches

    model = load_model(args.model, args.step)
    block = args.block_size or model.config.block_size
    batches = eval_batches(args.data, split=args.split, block_size=block, batch_size=args.batch_size,
                           max_batches=args.max_batches)
    eps = [float(x) for x in args.eps.split(",") if x.strip()]
    rows = adaptive_depth_report(model, batches, eps, num_steps=args.num_steps, criterion=args.exit_criterion,
                                 exited_kv=args.exited_kv, key=args.seed)
    steps = args.num_steps or model.config.mean_recurrence
    print(f"max depth {steps}, {rows[0]['tokens']} tokens of {args.data} ({args.split})")
    print(format_report(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "report":
        return _report_main(argv[1:])
    return _sample_main(argv)


if __name__ == "__main__":
    sys.exit(main())
