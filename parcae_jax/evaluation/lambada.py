"""LAMBADA (OpenAI version) accuracy and perplexity from the bundle's `lambada_openai.jsonl`, scored the
way the official lm-eval adapter scores `lambada_openai` (PARCAE_SPEC §9.4):

request = (context, " " + last word); context and context+continuation are tokenised without BOS
(when the context's tokens are not a prefix of the whole, the context is right-stripped and tried
again); the whole is left-truncated to the model's length; the result is the summed log-probability
of the continuation tokens and whether greedy decoding reproduces all of them.
accuracy = mean(greedy), perplexity = exp(-mean(log-likelihood)).

`loglikelihood_rows` / `loglikelihoods` are shared with the lm-eval adapter (`lm_eval_adapter.py`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import jax
import numpy as np

from parcae_jax.evaluation.core import mean_and_pstd
from parcae_jax.evaluation.scoring import TokenScorer

LAMBADA_FILE = "lambada_openai.jsonl"


def lambada_requests(path) -> list[tuple[str, str]]:
    """(context, " " + word) per line of a bundle-style jsonl with "context" and "continuation"."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                item = json.loads(line)
                out.append((item["context"], " " + item["continuation"]))
    return out


def loglikelihood_rows(tokenizer, requests: Sequence[tuple[str, str]], max_len: int):
    """Per request: a row (inputs, targets) and the row positions [start, end) that score the
    continuation (position t predicts targets[t])."""
    rows, spans = [], []
    for context, continuation in requests:
        whole = list(tokenizer.encode(context + continuation))
        ctx = list(tokenizer.encode(context))
        if whole[:len(ctx)] != ctx:
            ctx = list(tokenizer.encode(context.rstrip()))
        n_ctx = len(ctx) if whole[:len(ctx)] == ctx else _common_prefix(ctx, whole)
        if n_ctx == 0:  # nothing to condition the first continuation token on: start from BOS
            whole, n_ctx = [tokenizer.bos_id, *whole], 1
        crop = max(0, len(whole) - (max_len + 1))
        whole, n_ctx = whole[crop:], max(1, n_ctx - crop)
        rows.append((np.asarray(whole[:-1], np.int32), np.asarray(whole[1:], np.int32)))
        spans.append((n_ctx - 1, len(whole) - 1))
    return rows, spans


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def loglikelihoods(scorer: TokenScorer, tokenizer, requests: Sequence[tuple[str, str]], *, depth: int,
                   key: jax.Array) -> list[tuple[float, bool]]:
    """(summed log-probability of the continuation, greedy reproduces it) per request."""
    rows, spans = loglikelihood_rows(tokenizer, requests, scorer.max_len)
    out = []
    for (ce, pred), (_, targets), (s, e) in zip(scorer.score(rows, depth=depth, key=key), rows, spans,
                                                strict=True):
        out.append((-float(ce[s:e].astype(np.float64).sum()), bool(np.array_equal(pred[s:e], targets[s:e]))))
    return out


def lambada_metrics(results: Sequence[tuple[float, bool]]) -> dict[str, float]:
    lls = np.array([ll for ll, _ in results], dtype=np.float64)
    return {"accuracy": float(np.mean([g for _, g in results])), "perplexity": float(math.exp(-lls.mean())),
            "mean_loglikelihood": float(lls.mean())}


def run_lambada(scorer: TokenScorer, tokenizer, path, *, depths: Sequence[int], keys: Sequence[jax.Array],
                max_examples: int = -1) -> dict:
    """{"file", "num_examples", "depths": {depth: metrics (mean over keys) and their std}}."""
    requests = lambada_requests(path)
    if max_examples > 0:
        requests = requests[:max_examples]
    by_depth = {}
    for depth in depths:
        runs = [lambada_metrics(loglikelihoods(scorer, tokenizer, requests, depth=depth, key=key))
                for key in keys]
        metrics = {}
        for name in runs[0]:
            metrics[name], metrics[f"{name}_std"] = mean_and_pstd([r[name] for r in runs])
        by_depth[str(depth)] = metrics
    return {"file": str(path), "num_examples": len(requests), "depths": by_depth}
