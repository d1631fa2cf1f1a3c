"""Test-time depth scaling of one checkpoint: held-out loss at recurrences 1…2·r̄, the saturating
law `L(T) = L_inf + Z·exp(-z·T)` fitted to it, and a PNG of data and fit.

Every depth runs through the same compiled program (the depth is a traced argument of the scorer),
and every depth sees the same rows and the same initial-state noise, so the curve isolates the
effect of looping longer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np

from parcae_jax.evaluation.lm_loss import evaluate_loss
from parcae_jax.evaluation.scoring import TokenScorer
from parcae_jax.evaluation.testtime_law import describe_fit, fit_test_time_law, saturating_law


def default_depths(mean_recurrence: int) -> list[int]:
    return list(range(1, 2 * int(mean_recurrence) + 1))


def run_depth_sweep(scorer: TokenScorer, rows, byte_lengths, *, depths: Sequence[int],
                    keys: Sequence[jax.Array], mean_recurrence: int, plot_path: str | None = None,
                    title: str = "") -> dict:
    """Loss per depth, the law's fit (or the reason it could not be fitted) and the plot's path."""
    depths = sorted({int(d) for d in depths})
    if depths[0] < 1:
        raise ValueError(f"sweep depths must be >= 1, got {depths}")
    programs_before = scorer.compiled_programs()
    per_depth = evaluate_loss(scorer, rows, byte_lengths, depths=depths, keys=keys)
    metric = "loss" if "loss" in per_depth[str(depths[0])] else "val_loss"
    losses = [per_depth[str(d)][metric] for d in depths]
    stds = [per_depth[str(d)][f"{metric}_std"] for d in depths]
    out = {
        "depths": depths,
        "metric": metric,
        "losses": losses,
        "losses_std": stds,
        "per_depth": per_depth,
        "mean_recurrence": int(mean_recurrence),
        "new_compiled_programs": scorer.compiled_programs() - programs_before,
    }
    try:
        out["fit"] = fit_test_time_law(depths, losses, sigma=stds if len(keys) > 1 else None)
    except ValueError as e:
        out["fit"], out["fit_error"] = None, str(e)
    if plot_path:
        out["plot"] = plot_sweep(depths, losses, stds, out["fit"], plot_path, metric=metric,
                                 mean_recurrence=mean_recurrence, title=title)
    return out


def plot_sweep(depths, losses, stds, fit: dict | None, path: str, *, metric: str, mean_recurrence: int,
               title: str = "") -> str:
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(depths, losses, yerr=stds if any(s > 0 for s in stds) else None, fmt="o", ms=4,
                capsize=3, label="measured")
    if fit is not None:
        grid = np.linspace(min(depths), max(depths), 200)
        ax.plot(grid, saturating_law(grid, fit["L_inf"], fit["Z"], fit["z"]), lw=1.5,
                label=describe_fit(fit).split(", mean")[0])
        if math.isfinite(fit["L_inf"]):
            ax.axhline(fit["L_inf"], color="grey", ls="--", lw=1, label=f"L_inf = {fit['L_inf']:.4g}")
    ax.axvline(mean_recurrence, color="C3", ls=":", lw=1, label=f"training mean recurrence {mean_recurrence}")
    ax.set_xlabel("recurrences T at test time")
    ax.set_ylabel(f"held-out {metric} (nats/token)")
    ax.set_title(title or "test-time depth scaling")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
