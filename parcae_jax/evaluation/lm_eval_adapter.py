"""An EleutherAI lm-evaluation-harness model for parcae-jax checkpoints (needs `pip install lm-eval`;
importing this module without it raises ImportError).

    import lm_eval
    from parcae_jax.evaluation.lm_eval_adapter import ParcaeLM

    lm = ParcaeLM("runs/tiny", num_steps=8)
    lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai", "hellaswag"])

or, once this module is imported, `--model parcae-jax --model_args checkpoint=runs/tiny,num_steps=8`.
Scoring follows the official adapter (PARCAE_SPEC §9.4/§9.5): no BOS, left truncation to the model's
length, fixed depth; `loglikelihood_rolling` scores non-overlapping windows of the model's length
(the first token of each later window from the previous window's last position); `generate_until`
decodes greedily (at most `max_gen_toks`, default 256, new tokens) and cuts at the stop strings.
"""

from __future__ import annotations

import jax
import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from parcae_jax.evaluation.lambada import loglikelihoods


@register_model("parcae-jax")
class ParcaeLM(LM):
    """`checkpoint`: anything eval.py accepts; or pass `model` (+ `tokenizer`) or a ready `scorer`."""

    def __init__(self, checkpoint: str | None = None, tokenizer=None, num_steps: int | None = None,
                 batch_size: int = 16, seed: int = 0, *, model=None, scorer=None):
        super().__init__()
        from parcae_jax import loading
        from parcae_jax.data.tokenizer import load_tokenizer
        from parcae_jax.evaluation.scoring import TokenScorer

        if checkpoint is not None:
            loaded = loading.load_model(checkpoint)
            model = loaded.model
            if tokenizer is None:
                tokenizer = loading.find_tokenizer(loaded)
        if isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer)
        if tokenizer is None:
            raise ValueError("ParcaeLM needs a tokenizer (a path or a Tokenizer)")
        if scorer is None:
            if model is None:
                raise ValueError("ParcaeLM needs a checkpoint path, a model or a scorer")
            scorer = TokenScorer.for_model(model, max_len=model.config.block_size, batch_size=int(batch_size),
                                           pad_id=tokenizer.pad_id or 0)
        self.model, self.tokenizer, self.scorer = model, tokenizer, scorer
        looped = model is None or model.config.arch == "parcae"
        default_depth = model.config.mean_recurrence if model is not None and looped else 0
        self.depth = int(num_steps) if num_steps is not None else int(default_depth)
        self.key = jax.random.key(int(seed))

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args[:2]) for r in requests]
        return loglikelihoods(self.scorer, self.tokenizer, pairs, depth=self.depth, key=self.key)

    def loglikelihood_rolling(self, requests) -> list[float]:
        L = self.scorer.max_len
        rows, owner = [], []
        for i, request in enumerate(requests):
            ids = np.asarray(self.tokenizer.encode(request.args[0]), np.int32)
            for start in range(0, max(len(ids) - 1, 0), L):
                window = ids[start:start + L + 1]
                rows.append((window[:-1], window[1:]))
                owner.append(i)
        totals = [0.0] * len(requests)
        for (ce, _), i in zip(self.scorer.score(rows, depth=self.depth, key=self.key), owner, strict=True):
            totals[i] -= float(ce.astype(np.float64).sum())
        return totals

    def generate_until(self, requests) -> list[str]:
        from parcae_jax.evaluation.sample import NoCacheSampler

        if self.model is None:
            raise ValueError("generate_until needs a model (this ParcaeLM was built from a scorer only)")
        sampler = NoCacheSampler(self.model, vocab_size=self.tokenizer.vocab_size)
        out = []
        for request in requests:
            context, kwargs = request.args[0], dict(request.args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids = [self.tokenizer.bos_id, *self.tokenizer.encode(context)]
            limit = int(kwargs.get("max_gen_toks", 256))
            new = sampler.generate([ids], max_new_tokens=limit, depth=self.depth, key=self.key,
                                   stop_ids=(self.tokenizer.eos_id,))[0]
            text = self.tokenizer.decode(new)
            cut = min([text.index(s) for s in until if s and s in text], default=len(text))
            out.append(text[:cut])
        return out
