"""isoflop: at fixed training FLOPs, the loss-optimal mean recurrence and token count.

The paper's claim: for a fixed FLOP budget C, the validation loss is a parabola in ln(μ_rec) (and in
ln tokens) with an interior optimum, and the optima grow as power laws μ_rec* ∝ C^0.40, D* ∝ C^0.78.
This is the scaling package's sweep (`scaling plan/run/fit`) on a grid chosen where looping can win
at CPU scale: at width 64 with a 4096-piece vocabulary the embedding and head dominate a token's FLOPs,
so an extra recurrence costs little (μ_rec 8 costs 1.4× μ_rec 1 per token), and an optimum above 1 is
within reach if the models use the loop at all. At each budget a run of μ_rec trains on
⌊C / FLOPs-per-token(μ_rec)⌋ tokens.
"""

from __future__ import annotations

import math

import ml_collections

from parcae_jax.cli_config import load_config
from parcae_jax.experiments import common
from parcae_jax.scaling import fit, plots, sweep

SCALES = {
    # micro: a budget of 4 steps at μ_rec 1 (its FLOPs per token depend on the data's vocabulary)
    "micro": {"batch": 8, "recurrences": (1, 2), "budget_steps": (4,)},
    "cpu": {"batch": 16, "recurrences": (1, 2, 4, 8), "budgets": (5e11, 1.5e12, 4.5e12)},
    "gpu": {"batch": 128, "recurrences": (1, 2, 4, 8), "budgets": (1e17, 3e17, 1e18)},
    "tpu": {"batch": 256, "recurrences": (1, 2, 4, 8, 12), "budgets": (2e17, 6e17, 2e18)},
}
DEPTHS = (1, 2, 3, 4, 6, 8, 12, 16)


def runs(scale: str, data_dir: str | None) -> list[common.Run]:
    spec = SCALES[scale]
    # The stop criterion is the budget: steps/tokens given here only size the checkpoint cadence.
    sizing = {"steps": 300, "tokens": 200_000_000} | spec
    setup = common.scale_setup(scale, sizing)
    base = setup.base
    data = common.data_overrides(data_dir, common.dataset_vocab(data_dir))
    config = ml_collections.ConfigDict(
        {"backprop_depth": "ceil_half", "overrides": (*setup.shape, *setup.train, *data)}
    )
    base_cfg = load_config(str(sweep.REPO / base))
    budgets = spec.get("budgets") or _budgets_of_steps(base, config, spec["budget_steps"])
    out = []
    for budget in budgets:
        for mu in spec["recurrences"]:
            overrides = sweep.point_overrides(base_cfg, config, mu, budget)
            limit = max(2 * mu, 4)
            out.append(
                common.Run(
                    sweep.point_name(mu, budget),
                    tuple(overrides),
                    base=base,
                    flop_budget=float(budget),
                    test_depths=tuple(sorted({d for d in DEPTHS if d <= limit} | {mu})),
                    depth_sweep_batches=1 if scale == "micro" else 8,
                    depth_sweep_batch_size=8,
                )
            )
    return out


def _budgets_of_steps(base: str, config, steps: tuple[int, ...]) -> list[float]:
    one = sweep.make_point(
        "one",
        base,
        [*config.overrides, "model.mean_recurrence=1", "model.mean_backprop_depth=1"],
        "/nonexistent",
    )
    return [float(n * one.tokens_per_step * one.flops_per_token) for n in steps]


def analyze(points, outcomes: dict[str, dict], scale: str) -> dict:
    results = [o["result"] for o in outcomes.values() if o["result"] is not None]
    fits = fit.fit_all(results)
    fits.pop("_law", None)
    budgets = []
    for b in fits["isoflop"]:
        losses = dict(zip(b["mean_recurrences"], b["val_losses"], strict=True))
        best = min(losses, key=losses.get)
        budgets.append(
            {
                "flop_budget": b["flop_budget"],
                "losses_by_recurrence": losses,
                "best_sampled_recurrence": best,
                "parabola_optimum": b["recurrence"].get("optimum"),
                "interior": b["recurrence"].get("interior"),
            }
        )
    return {"fits": fits, "budgets": budgets, "results": results}


def draw(results: dict, out) -> list[str]:
    # the fitted unified law object the plots need is not JSON: fit again (milliseconds)
    return plots.plot_all(results["results"], fit.fit_all(results["results"]), out)


def summary(results: dict) -> list[str]:
    lines = []
    for b in results["budgets"]:
        losses = ", ".join(f"μ{m}: {v:.4f}" for m, v in sorted(b["losses_by_recurrence"].items()))
        opt = b["parabola_optimum"]
        opt_text = f"{opt:.2f}" if opt is not None and math.isfinite(opt) else "n/a"
        lines.append(
            f"C={b['flop_budget']:.3g}: {losses}; best sampled μ {b['best_sampled_recurrence']}, "
            f"parabola μ* {opt_text}{'' if b['interior'] else ' (outside the grid)'}"
        )
    lines += fit.summary(results["fits"]).splitlines()[1:]
    return lines
