"""Adaptive depth against fixed depth: average recurrences used and loss/accuracy over a range of ε.

Feeds the README's adaptive-depth table; the CLI is `python -m parcae_jax.generate report`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from parcae_jax import losses
from parcae_jax.kv_cache import EXIT_CRITERIA, CachePlan, forward_chunk, init_cache
from parcae_jax.model import row_states


@functools.partial(jax.jit, static_argnames=("graphdef", "plan"))
def _score(graphdef, params, inputs, labels, h0, num_steps, exit_eps, *, plan):
    """Teacher-forced sums over valid labels: (nll, correct argmax, tokens, recurrences)."""
    model = nnx.merge(graphdef, params)
    B, T = inputs.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    cache = init_cache(model.config, B, plan)
    logits, _, depth = forward_chunk(model, cache, inputs, positions, h0, num_steps, exit_eps, plan)
    _, aux = losses.cross_entropy(logits, labels)
    valid = labels >= 0
    correct = jnp.sum(valid & (jnp.argmax(logits[..., : model.config.vocab_size], -1) == labels))
    return jnp.stack([aux["nll_sum"], correct, aux["tokens"], jnp.sum(jnp.where(valid, depth, 0))])


def adaptive_depth_report(
    model,
    token_batches: Iterable[dict],
    eps_list: Sequence[float],
    *,
    num_steps: int | None = None,
    criterion: str = "residual",
    exited_kv: str = "last",
    key: int | jax.Array = 0,
) -> list[dict]:
    """Average recurrences used and loss/accuracy with adaptive exit at each ε, against fixed depth.

    `token_batches` yields {"inputs", "labels"} int32 [B, T] (labels -100 are ignored). Every sequence
    runs teacher-forced in one cached chunk: token t attends to tokens < t at the same step, reading
    an exited token's K/V as `exited_kv` says, which is what cached decoding computes (exactly so for
    the residual criterion; see `kv_cache` for kl).
    The initial state of row r (counted over all batches) comes from `fold_in(key, r)`, the same for
    every row of the table. Returns one dict per
    row, the fixed depth first: {"criterion", "eps", "mean_depth", "loss", "accuracy", "delta_loss",
    "delta_accuracy", "tokens"}.
    """
    cfg = model.config
    if cfg.arch != "parcae":
        raise ValueError("adaptive depth needs a Parcae model (GPT has no recurrence)")
    if criterion not in EXIT_CRITERIA:
        raise ValueError(f"criterion must be one of {EXIT_CRITERIA}, got {criterion!r}")
    num_steps = int(cfg.mean_recurrence if num_steps is None else num_steps)
    key = jax.random.key(key) if isinstance(key, int) else key
    graphdef, params = nnx.split(model)
    settings = [(None, 0.0)] + [(criterion, float(e)) for e in eps_list]
    totals = np.zeros((len(settings), 4))
    first_row = 0
    for batch in token_batches:
        inputs, labels = jnp.asarray(batch["inputs"]), jnp.asarray(batch["labels"])
        B, T = inputs.shape
        h0 = row_states(key, cfg, first_row + jnp.arange(B), T)  # the one h0 rule, by global row
        first_row += B
        for row, (crit, eps) in enumerate(settings):
            plan = CachePlan(max_len=T, max_depth=max(num_steps, 1), exit_criterion=crit, exited_kv=exited_kv)
            totals[row] += np.asarray(_score(graphdef, params, inputs, labels, h0, num_steps, eps, plan=plan))
    out = []
    for (crit, eps), (nll, correct, n, depth) in zip(settings, totals, strict=True):
        n = max(n, 1.0)
        out.append({"criterion": crit or "fixed", "eps": None if crit is None else eps,
                    "mean_depth": depth / n, "loss": nll / n, "accuracy": correct / n, "tokens": int(n)})
    for row in out:
        row["delta_loss"] = row["loss"] - out[0]["loss"]
        row["delta_accuracy"] = row["accuracy"] - out[0]["accuracy"]
    return out


def format_report(rows: list[dict]) -> str:
    """A Markdown table of `adaptive_depth_report` rows."""
    lines = ["| criterion | ε | mean depth | loss | Δ loss | accuracy | Δ accuracy |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        eps = "-" if r["eps"] is None else f"{r['eps']:g}"
        lines.append(f"| {r['criterion']} | {eps} | {r['mean_depth']:.2f} | {r['loss']:.4f} | "
                     f"{r['delta_loss']:+.4f} | {r['accuracy']:.4f} | {r['delta_accuracy']:+.4f} |")
    return "\n".join(lines)
