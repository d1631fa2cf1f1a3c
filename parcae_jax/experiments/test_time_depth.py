"""test-time-depth: models trained at μ_rec ∈ {2, 4, 8}, evaluated at T = 1 … 3·μ_rec recurrences.

The paper's claim: a Parcae's validation loss falls with the test-time recurrence T and saturates,
following L(T) = L_inf + Z·exp(−z·T), and the saturation point moves with the mean recurrence it was
trained at. Each model (same data, steps and recipe; backprop depth ⌈μ_rec/2⌉, the released 8/4
ratio) is scored by the evaluation package's depth sweep on the same validation rows at every T.

Saturation, defined before any run: T_sat is where the fitted gap Z·exp(−z·T) has fallen to 1% of its
value at T = 1, i.e. T_sat = 1 + ln(100)/z (when Z > 0 and z > 0); the empirical T_0.01 is the smallest
swept T whose loss is within 0.01 nats of the sweep's minimum. Both are reported against μ_rec.
"""

from __future__ import annotations

import math

import numpy as np

from parcae_jax.evaluation.testtime_law import describe_fit, fit_test_time_law, saturating_law
from parcae_jax.experiments import common

RECURRENCES = (2, 4, 8)
SCALES = {
    "micro": {"steps": 4, "batch": 8, "recurrences": (2,), "sweep_batches": 1},
    "cpu": {"steps": 400, "batch": 16, "recurrences": RECURRENCES, "sweep_batches": 8},
    "gpu": {"tokens": 1_000_000_000, "batch": 128, "recurrences": RECURRENCES, "sweep_batches": 16},
    "tpu": {"tokens": 4_000_000_000, "batch": 256, "recurrences": RECURRENCES, "sweep_batches": 32},
}
EMPIRICAL_TOLERANCE = 0.01  # nats


def runs(scale: str, data_dir: str | None) -> list[common.Run]:
    spec = SCALES[scale]
    setup = common.scale_setup(scale, spec)
    data = common.data_overrides(data_dir, common.dataset_vocab(data_dir))
    out = []
    for mu in spec["recurrences"]:
        k = math.ceil(mu / 2)
        depth = (f"model.mean_recurrence={mu}", f"model.mean_backprop_depth={k}")
        out.append(
            common.Run(
                f"rec{mu}",
                (*setup.shape, *setup.train, *data, *setup.stop, *depth),
                base=setup.base,
                test_depths=tuple(range(1, 3 * mu + 1)),
                depth_sweep_batches=spec["sweep_batches"],
                depth_sweep_batch_size=8,
            )
        )
    return out


def saturation(depths: list[int], losses: list[float], fit: dict | None) -> dict:
    best = min(losses)
    empirical = next(d for d, v in zip(depths, losses, strict=True) if v <= best + EMPIRICAL_TOLERANCE)
    fitted = None
    if fit and fit.get("Z", 0) > 0 and fit.get("z", 0) > 0:
        fitted = 1 + math.log(100) / fit["z"]
    return {"t_sat_fit": fitted, "t_empirical": empirical, "best_depth": depths[losses.index(best)]}


def analyze(points, outcomes: dict[str, dict], scale: str) -> dict:
    runs = {}
    for p in points:
        o = outcomes[p.name]
        entry = {
            "state": o["state"],
            "mean_recurrence": p.mean_recurrence,
            "mean_backprop_depth": p.mean_backprop_depth,
            "steps": p.steps,
            "tokens": p.trained_tokens,
        }
        sweep = (o["result"] or {}).get("depth_sweep")
        if sweep:
            depths, losses = [int(d) for d in sweep["depths"]], [float(v) for v in sweep["losses"]]
            try:
                fit = fit_test_time_law(depths, losses)
            except (ValueError, RuntimeError) as e:
                fit = {"error": str(e)}
            sat = saturation(depths, losses, fit if "error" not in fit else None)
            entry |= {
                "depths": depths,
                "losses": losses,
                "fit": fit,
                **sat,
                "t_sat_fit_over_mu": sat["t_sat_fit"] / p.mean_recurrence if sat["t_sat_fit"] else None,
                "t_empirical_over_mu": sat["t_empirical"] / p.mean_recurrence,
            }
        runs[p.name] = entry
    return {"runs": runs, "definitions": __doc__.split("Saturation, defined before any run: ")[1].strip()}


def draw(results: dict, out) -> list[str]:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, r in enumerate(results["runs"].values()):
        if "depths" not in r:
            continue
        ax.scatter(r["depths"], r["losses"], color=f"C{i}", s=14, label=f"μ_rec = {r['mean_recurrence']}")
        fit = r["fit"]
        if "error" not in fit:
            t = np.linspace(1, max(r["depths"]), 200)
            ax.plot(t, saturating_law(t, fit["L_inf"], fit["Z"], fit["z"]), color=f"C{i}", lw=1)
        ax.axvline(r["mean_recurrence"], color=f"C{i}", ls=":", lw=1)
    ax.set_xlabel("test-time recurrence T")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("L(T) = L_inf + Z exp(-zT); dotted: training μ_rec")
    ax.legend()
    ax.grid(alpha=0.3)
    return [common.save(fig, out / "loss_vs_test_depth.png")]


def summary(results: dict) -> list[str]:
    lines = []
    for name, r in results["runs"].items():
        if "depths" not in r:
            lines.append(f"{name}: {r['state']}, no depth sweep")
            continue
        fit = r["fit"]
        law = describe_fit(fit) if "error" not in fit else f"fit failed ({fit['error']})"
        t_fit = f"{r['t_sat_fit']:.1f}" if r["t_sat_fit"] else "n/a"
        lines.append(
            f"μ_rec {r['mean_recurrence']}: {law}; T_sat {t_fit}, T_0.01 {r['t_empirical']}, "
            f"best T {r['best_depth']}, L(1) {r['losses'][0]:.4f} → L({r['depths'][-1]}) "
            f"{r['losses'][-1]:.4f}"
        )
    return lines
