"""Text generation for the `sample` task and the lm-eval adapter's `generate_until`.

`sample_texts` uses the KV-cached `parcae_jax.engine` when prompt + new tokens fit the model;
otherwise `NoCacheSampler`, a plain loop that recomputes the whole fixed-length, padded sequence for
every new token and keeps the last `max_len` tokens as context. The loop is quadratic but compiles
once and needs nothing beyond `model(...)`. Both pick tokens with `parcae_jax.sampling`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from parcae_jax import engine
from parcae_jax.errors import ConfigError
from parcae_jax.evaluation.scoring import model_apply
from parcae_jax.sampling import GREEDY, Sampling, sample_tokens


class NoCacheSampler:
    """`generate(prompts, ...)`: batched autoregressive sampling by full recomputation."""

    def __init__(self, model: nnx.Module, *, max_len: int | None = None, vocab_size: int | None = None):
        cfg = model.config
        self.max_len = int(max_len or cfg.block_size)
        # Only ids the tokenizer can decode are sampled (the model's vocabulary is padded).
        self.vocab_size = int(vocab_size or cfg.vocab_size)
        apply, self.state = model_apply(model)

        def next_tokens(state, ids, lengths, depth, key, uids, sample_key, sampling):
            out = apply(state, ids, depth, key, uids)  # features: only the last positions need the head
            last = out.head(jnp.take_along_axis(out.x, (lengths - 1)[:, None, None], axis=1))[:, 0]
            return sample_tokens(last[:, : self.vocab_size], sample_key, sampling)

        self.fn = jax.jit(next_tokens, static_argnames="sampling")

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, sampling: Sampling = GREEDY,
                 depth: int = 0, key: jax.Array | None = None, seed: int = 0,
                 stop_ids: Sequence[int] = ()) -> list[list[int]]:
        """New tokens per prompt. `key` draws the initial states (row r from fold_in(key, r)), `seed`
        the sampling. Sequences longer than `max_len` keep their last `max_len` tokens as context.
        A row stops at a token in `stop_ids` (kept)."""
        key = jax.random.key(0) if key is None else key
        sample_key = jax.random.key(seed)
        seqs = [list(p) for p in prompts]
        if any(len(s) == 0 for s in seqs):
            raise ConfigError("every prompt needs at least one token (e.g. BOS)")
        new: list[list[int]] = [[] for _ in seqs]
        done = np.zeros(len(seqs), bool)
        uids = jnp.arange(len(seqs), dtype=jnp.int32)
        for t in range(max_new_tokens):
            contexts = [s[-self.max_len:] for s in seqs]
            ids = np.zeros((len(seqs), self.max_len), np.int32)
            for i, c in enumerate(contexts):
                ids[i, :len(c)] = c
            lengths = jnp.asarray([len(c) for c in contexts], jnp.int32)
            tokens = np.asarray(self.fn(self.state, jnp.asarray(ids), lengths, jnp.int32(depth), key, uids,
                                        jax.random.fold_in(sample_key, t), sampling=sampling))
            for i in np.flatnonzero(~done):
                token = int(tokens[i])
                seqs[i].append(token)
                new[i].append(token)
                done[i] = token in stop_ids
            if done.all():
                break
        return new


def sample_texts(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, sampling: Sampling,
                 depth: int, key: jax.Array, seed: int = 0) -> tuple[list[dict], str]:
    """([{"prompt", "completion", "tokens"}], generator name) for text prompts (each starts with BOS).
    Uses the KV-cached engine when the whole sequence fits the model, else the no-cache loop."""
    ids = [[tokenizer.bos_id, *tokenizer.encode(p)] for p in prompts]
    if max(len(i) for i in ids) + max_new_tokens <= model.config.block_size:
        steps = depth if model.config.arch == "parcae" else None
        result = engine.generate(model, ids, max_new_tokens=max_new_tokens, num_steps=steps,
                                 sampling=sampling, stop_tokens=[tokenizer.eos_id], key=key)
        outs, name = result.tokens, "kv_cache"
    else:
        sampler = NoCacheSampler(model, vocab_size=tokenizer.vocab_size)
        outs = sampler.generate(ids, max_new_tokens=max_new_tokens, sampling=sampling, depth=depth, key=key,
                                seed=seed, stop_ids=(tokenizer.eos_id,))
        name = "no_cache"
    # The model's vocabulary is padded beyond the tokenizer's: such ids have no text.
    texts = [tokenizer.decode([t for t in o if t < tokenizer.vocab_size]) for o in outs]
    rows = zip(prompts, texts, outs, strict=True)
    return [{"prompt": p, "completion": t, "tokens": len(o)} for p, t, o in rows], name
