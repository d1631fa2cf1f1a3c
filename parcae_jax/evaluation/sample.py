"""Text generation for the `sample` task and the lm-eval adapter's `generate_until`.

`sample_texts` uses the KV-cached `parcae_jax.generate` when prompt + new tokens fit the model;
otherwise (or without that module) `NoCacheSampler`, a plain loop that recomputes the whole
fixed-length, padded sequence for every new token and keeps the last `max_len` tokens as context.
The loop is quadratic but compiles once and needs nothing beyond `model(...)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from parcae_jax.evaluation.scoring import model_apply


class NoCacheSampler:
    """`generate(prompts, ...)`: batched autoregressive sampling by full recomputation."""

    def __init__(self, model: nnx.Module, *, max_len: int | None = None, vocab_size: int | None = None):
        cfg = model.config
        self.max_len = int(max_len or cfg.block_size)
        # Only ids the tokenizer can decode are sampled (the model's vocabulary is padded).
        self.vocab_size = int(vocab_size or cfg.vocab_size)
        apply, self.state = model_apply(model)

        def last_logits(state, ids, lengths, depth, key, uids):
            logits = apply(state, ids, depth, key, uids)
            return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0].astype(jnp.float32)

        self.fn = jax.jit(last_logits)

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, depth: int = 0, key: jax.Array | None = None, seed: int = 0,
                 stop_ids: Sequence[int] = ()) -> list[list[int]]:
        """New tokens per prompt (greedy when temperature == 0). Sequences longer than `max_len` keep
        their last `max_len` tokens as context. A row stops at a token in `stop_ids` (kept)."""
        key = jax.random.key(0) if key is None else key
        rng = np.random.default_rng(seed)
        seqs = [list(p) for p in prompts]
        if any(len(s) == 0 for s in seqs):
            raise ValueError("every prompt needs at least one token (e.g. BOS)")
        new: list[list[int]] = [[] for _ in seqs]
        done = np.zeros(len(seqs), bool)
        uids = jnp.arange(len(seqs), dtype=jnp.int32)
        for _ in range(max_new_tokens):
            contexts = [s[-self.max_len:] for s in seqs]
            ids = np.zeros((len(seqs), self.max_len), np.int32)
            for i, c in enumerate(contexts):
                ids[i, :len(c)] = c
            lengths = jnp.asarray([len(c) for c in contexts], jnp.int32)
            logits = np.asarray(self.fn(self.state, jnp.asarray(ids), lengths, jnp.int32(depth), key, uids))
            logits = logits[:, :self.vocab_size].astype(np.float64)
            for i in np.flatnonzero(~done):
                token = pick_token(logits[i], temperature, top_k, rng)
                seqs[i].append(token)
                new[i].append(token)
                done[i] = token in stop_ids
            if done.all():
                break
        return new


def pick_token(logits: np.ndarray, temperature: float, top_k: int | None, rng: np.random.Generator) -> int:
    """Argmax when temperature <= 0, else a sample from softmax(logits / T) restricted to the top k."""
    if temperature <= 0:
        return int(np.argmax(logits))
    scaled = logits / temperature
    if top_k:
        cutoff = np.sort(scaled)[-min(int(top_k), len(scaled))]
        scaled = np.where(scaled >= cutoff, scaled, -np.inf)
    probs = np.exp(scaled - scaled.max())
    return int(rng.choice(len(probs), p=probs / probs.sum()))


def sample_texts(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, temperature: float,
                 top_k: int | None, depth: int, key: jax.Array, seed: int = 0) -> tuple[list[dict], str]:
    """([{"prompt", "completion", "tokens"}], generator name) for text prompts (each starts with BOS).
    Uses the KV-cached `parcae_jax.generate` when the whole sequence fits the model, else the loop."""
    ids = [[tokenizer.bos_id, *tokenizer.encode(p)] for p in prompts]
    fits = max(len(i) for i in ids) + max_new_tokens <= model.config.block_size
    try:
        from parcae_jax import generate as cached
    except ImportError:
        cached = None
    if cached is not None and fits:
        steps = depth if model.config.arch == "parcae" else None
        result = cached.generate(model, ids, max_new_tokens=max_new_tokens, num_steps=steps,
                                 sampling=cached.Sampling(temperature=temperature, top_k=top_k or None),
                                 stop_tokens=[tokenizer.eos_id], key=key)
        outs, name = result.tokens, "kv_cache"
    else:
        sampler = NoCacheSampler(model, vocab_size=tokenizer.vocab_size)
        outs = sampler.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                depth=depth, key=key, seed=seed, stop_ids=(tokenizer.eos_id,))
        name = "no_cache"
    # The model's vocabulary is padded beyond the tokenizer's: such ids have no text.
    texts = [tokenizer.decode([t for t in o if t < tokenizer.vocab_size]) for o in outs]
    rows = zip(prompts, texts, outs, strict=True)
    return [{"prompt": p, "completion": t, "tokens": len(o)} for p, t, o in rows], name
