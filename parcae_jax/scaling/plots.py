"""PNG plots of `scaling fit`: isoFLOP curves, power laws, test-time curves, predicted vs observed."""

from __future__ import annotations

import math
import pathlib

import numpy as np

from parcae_jax.scaling.fit import depth_curve


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int):
    plt = _pyplot()
    cmap = plt.get_cmap("viridis")
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def _save(plt, fig, path: pathlib.Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_isoflops(fits: dict, path: pathlib.Path) -> None:
    """Loss against mean recurrence and against tokens, one curve per budget, parabola and minimum."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    budgets = fits["isoflop"]
    for color, b in zip(_colors(len(budgets)), budgets, strict=True):
        label = f"C = {b['flop_budget']:.3g}"
        for ax, values, key in (
            (axes[0], b["mean_recurrences"], "recurrence"),
            (axes[1], b["tokens"], "tokens_fit"),
        ):
            ax.plot(values, b["val_losses"], "o", color=color, label=label)
            fit = b[key]
            if not fit["ok"]:
                continue
            lo, hi = math.log(min(values)), math.log(max(values))
            x = np.linspace(min(lo, fit["log_optimum"]) - 0.1, max(hi, fit["log_optimum"]) + 0.1, 100)
            ax.plot(np.exp(x), np.polyval(fit["coeffs"], x), "-", color=color, lw=1)
            err = fit["log_optimum_err"]
            xerr = None
            if err is not None and math.isfinite(err):
                xerr = [[fit["optimum"] * (1 - math.exp(-err))], [fit["optimum"] * math.expm1(err)]]
            ax.errorbar([fit["optimum"]], [fit["min_loss"]], xerr=xerr, fmt="*", ms=12, color=color, mec="k")
    axes[0].set_xlabel("mean recurrence μ_rec (training)")
    axes[1].set_xlabel("training tokens D")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_ylabel("final validation loss")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle("isoFLOP curves: parabola in log x per budget, ★ = optimum (± 1σ)")
    _save(plt, fig, path)


def plot_power_laws(fits: dict, path: pathlib.Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, fit_key, symbol, ylabel in (
        (axes[0], "recurrence", "recurrence", "a", "optimal mean recurrence μ_rec*"),
        (axes[1], "tokens", "tokens_fit", "b", "optimal tokens D*"),
    ):
        pts = [(b["flop_budget"], b[fit_key]) for b in fits["isoflop"] if b[fit_key]["ok"]]
        for c, fit in pts:
            err = fit["log_optimum_err"]
            yerr = None
            if err is not None and math.isfinite(err):
                yerr = [[fit["optimum"] * (1 - math.exp(-err))], [fit["optimum"] * math.expm1(err)]]
            marker = "o" if fit["interior"] else "x"  # x: vertex outside the sampled range (not fitted)
            ax.errorbar([c], [fit["optimum"]], yerr=yerr, fmt=marker, color="C0", capsize=3)
        law = fits["power_laws"][key]
        if "error" not in law:
            c = np.geomspace(min(law["budgets"]) / 1.5, max(law["budgets"]) * 1.5, 50)
            label = f"{symbol} = {law['exponent']:.3f}"
            if law["exponent_err"] is not None and math.isfinite(law["exponent_err"]):
                label += f" ± {law['exponent_err']:.3f}"
            label += f" (paper {law['paper_exponent']})"
            ax.plot(c, law["coefficient"] * c ** law["exponent"], "-", color="C1", label=label)
            ax.legend(fontsize=9)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("FLOP budget C")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("compute-optimal recurrence and data: power laws in C")
    _save(plt, fig, path)


def plot_test_time(results: list[dict], fits: dict, path: pathlib.Path) -> None:
    """Loss against test-time recurrence T, one panel per budget: data, per-run law (solid), unified
    law (dashed)."""
    plt = _pyplot()
    budgets = sorted({r["flop_budget"] for r in results})
    cols = min(len(budgets), 3)
    rows = math.ceil(len(budgets) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    law = fits.get("_law")
    recurrences = sorted({r["mean_recurrence"] for r in results})
    color_of = dict(zip(recurrences, _colors(len(recurrences)), strict=True))
    for ax, budget in zip(axes.flat, budgets, strict=False):
        for r in (r for r in results if r["flop_budget"] == budget):
            depths, losses = depth_curve(r)
            color = color_of[r["mean_recurrence"]]
            ax.plot(depths, losses, "o", color=color, ms=4, label=f"μ_rec = {r['mean_recurrence']}")
            t = np.linspace(min(depths), max(depths), 100)
            per_run = fits["test_time"].get(r["name"], {})
            if "L_inf" in per_run:
                ax.plot(
                    t, per_run["L_inf"] + per_run["Z"] * np.exp(-per_run["z"] * t), "-", color=color, lw=1
                )
            if law is not None:
                ax.plot(t, law(r["mean_recurrence"], r["tokens"], t), "--", color=color, lw=1, alpha=0.7)
        ax.set_title(f"C = {budget:.3g}")
        ax.set_xlabel("test-time recurrence T")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(budgets) :]:
        ax.axis("off")
    fig.suptitle("test-time scaling: L(T) = L_inf + Z·exp(−z·T) per run (solid), unified law (dashed)")
    _save(plt, fig, path)


def plot_predicted_vs_observed(fits: dict, path: pathlib.Path) -> None:
    plt = _pyplot()
    u = fits["unified"]
    observed = np.array(u["observed"])
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot(observed, u["predictions"], "o", ms=3, alpha=0.7, label=f"in sample ({u['mean_rel_error']:.2%})")
    loo = np.array(u["loo_predictions"], dtype=float)
    if np.isfinite(loo).any():
        ax.plot(
            observed, loo, "x", ms=4, alpha=0.7, label=f"leave-one-run-out ({u['loo_mean_rel_error']:.2%})"
        )
    lo, hi = observed.min(), observed.max()
    pad = 0.05 * (hi - lo + 1e-9)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k-", lw=0.8)
    ax.set_xlabel("observed loss")
    ax.set_ylabel("predicted loss")
    ax.set_title("unified law: predicted vs observed\n(mean relative error)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(plt, fig, path)


def plot_all(results: list[dict], fits: dict, out: pathlib.Path) -> list[str]:
    """Every plot the fits support; returns the file names written."""
    written = []
    jobs = [
        ("isoflop.png", lambda p: plot_isoflops(fits, p)),
        ("power_laws.png", lambda p: plot_power_laws(fits, p)),
    ]
    jobs.append(("test_time.png", lambda p: plot_test_time(results, fits, p)))
    if "error" not in fits["unified"]:
        jobs.append(("predicted_vs_observed.png", lambda p: plot_predicted_vs_observed(fits, p)))
    for name, draw in jobs:
        draw(out / name)
        written.append(name)
    return written
