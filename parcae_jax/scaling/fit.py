"""`scaling fit`: every fit of the paper's scaling study from the finished runs of a sweep root.

Reads `ROOT/*/result.json` (see `runner.build_result`) and writes `OUT/fits.json`; the CLI has
`plots.py` draw the PNGs from the fits. The fits (`laws.py`):

1. isoFLOP: per FLOP budget, parabolas of the final validation loss (at the training recurrence) in
   ln(mean recurrence) and in ln(trained tokens); their vertices are the compute-optimal μ_rec* and D*.
2. power laws across budgets: μ_rec* ∝ C^a and D* ∝ C^b (the paper reports a ≈ 0.40, b ≈ 0.78).
3. test-time: L(T) = L_inf + Z·exp(−z·T) per run, on its depth sweep (`evaluation.testtime_law`).
4. the unified law over (μ, D, T) with leave-one-run-out mean relative error (paper: 0.85–1.31%).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Callable

import numpy as np

from parcae_jax import fileio
from parcae_jax.errors import UserError
from parcae_jax.scaling import laws
from parcae_jax.scaling.state import RESULT_FILE

PAPER_EXPONENTS = {"recurrence": 0.40, "tokens": 0.78}


def load_results(root: str | os.PathLike) -> list[dict]:
    """Every `result.json` directly under `root`, sorted by (budget, recurrence)."""
    results = []
    for path in sorted(pathlib.Path(root).glob(f"*/{RESULT_FILE}")):
        results.append(json.loads(path.read_text()))
    return sorted(results, key=lambda r: (r["flop_budget"], r["mean_recurrence"]))


def depth_curve(result: dict) -> tuple[list[int], list[float]]:
    """(depths, losses) of a run: its depth sweep, else the final validation losses by depth."""
    sweep = result.get("depth_sweep")
    if sweep and sweep.get("depths"):
        return [int(d) for d in sweep["depths"]], [float(v) for v in sweep["losses"]]
    by_depth = result.get("val_loss_by_depth", {})
    depths = sorted(by_depth, key=int)
    return [int(d) for d in depths], [float(by_depth[d]) for d in depths]


def fit_isoflops(results: list[dict]) -> list[dict]:
    budgets = sorted({r["flop_budget"] for r in results})
    out = []
    for budget in budgets:
        runs = sorted((r for r in results if r["flop_budget"] == budget), key=lambda r: r["mean_recurrence"])
        losses = [r["val_loss"] for r in runs]
        out.append({
            "flop_budget": budget,
            "runs": [r["name"] for r in runs],
            "mean_recurrences": [r["mean_recurrence"] for r in runs],
            "tokens": [r["tokens"] for r in runs],
            "val_losses": losses,
            "recurrence": laws.isoflop_optimum([r["mean_recurrence"] for r in runs], losses),
            "tokens_fit": laws.isoflop_optimum([r["tokens"] for r in runs], losses),
        })  # fmt: skip
    return out


def fit_power_laws(isoflops: list[dict]) -> dict:
    """μ_rec* and D* against the budget, over budgets whose parabola has an interior minimum."""
    out = {}
    for key, fit_key in (("recurrence", "recurrence"), ("tokens", "tokens_fit")):
        usable = [b for b in isoflops if b[fit_key]["ok"] and b[fit_key]["interior"]]
        if len(usable) < 2:
            out[key] = {"error": f"needs interior optima at 2+ budgets, got {len(usable)}"}
            continue
        law = laws.fit_power_law(
            [b["flop_budget"] for b in usable],
            [b[fit_key]["optimum"] for b in usable],
            [b[fit_key]["log_optimum_err"] for b in usable],
        )
        out[key] = law | {
            "budgets": [b["flop_budget"] for b in usable],
            "paper_exponent": PAPER_EXPONENTS[key],
        }
    return out


def fit_test_time(results: list[dict]) -> dict:
    """Per run, L(T) = L_inf + Z·exp(−z·T) (needs ≥ 4 depths for 3 parameters and an error)."""
    try:
        from parcae_jax.evaluation.testtime_law import fit_test_time_law
    except ImportError as e:
        return {"error": f"parcae_jax.evaluation.testtime_law unavailable: {e}"}
    out = {}
    for r in results:
        depths, losses = depth_curve(r)
        if len(depths) < 4:
            out[r["name"]] = {"error": f"{len(depths)} depths; needs 4 or more"}
            continue
        try:
            fit = fit_test_time_law(depths, losses)
        except (RuntimeError, ValueError) as e:  # scipy's curve_fit raises RuntimeError on no convergence
            out[r["name"]] = {"error": str(e)}
            continue
        values = {k: float(v) for k, v in fit.items() if isinstance(v, int | float | np.floating)}
        # Z > 0: the loss falls with depth and saturates. Models that did not learn to loop (often
        # r̄ = 1 at small budgets) get worse with depth, and the law degenerates (Z < 0, z → 0).
        out[r["name"]] = values | {"saturating": bool(values["Z"] > 0 and values["z"] > 0)}
    return out


def unified_data(results: list[dict]) -> dict[str, np.ndarray]:
    rows = []
    for i, r in enumerate(results):
        for depth, loss in zip(*depth_curve(r), strict=True):
            rows.append((r["mean_recurrence"], r["tokens"], depth, loss, i))
    arr = np.array(rows, dtype=float).reshape(-1, 5)
    return {"mu": arr[:, 0], "tokens": arr[:, 1], "depth": arr[:, 2], "loss": arr[:, 3], "run": arr[:, 4]}


def fit_all(results: list[dict]) -> dict:
    """Every fit as one JSON-able dict (plus the fitted `UnifiedLaw` under "_law" for the plots)."""
    if not results:
        raise UserError("no finished runs (no */result.json): run `python -m parcae_jax.scaling run` first")
    isoflops = fit_isoflops(results)
    fits = {
        "num_runs": len(results),
        "runs": {
            r["name"]: {k: r[k] for k in ("mean_recurrence", "flop_budget", "tokens", "val_loss")}
            for r in results
        },
        "isoflop": isoflops,
        "power_laws": fit_power_laws(isoflops),
        "test_time": fit_test_time(results),
    }
    data = unified_data(results)
    try:
        unified = laws.fit_unified_law(
            data["mu"], data["tokens"], data["depth"], data["loss"], runs=data["run"]
        )
    except ValueError as e:
        fits["unified"] = {"error": str(e)}
    else:
        fits["_law"] = unified.pop("law")
        fits["unified"] = unified | {"observed": data["loss"].tolist()}
    return fits


def run_fit(
    root: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    plot: Callable[[list[dict], dict, pathlib.Path], list[str]] | None = None,
) -> dict:
    """Fit, write OUT/fits.json; OUT defaults to ROOT/fits. `plot(results, fits, out)` (the CLI passes
    `plots.plot_all`: plots are drawn from fits, so this module never imports them) writes PNGs
    there and returns their names, which fits.json lists."""
    out = pathlib.Path(out) if out is not None else pathlib.Path(root) / "fits"
    out.mkdir(parents=True, exist_ok=True)
    results = load_results(root)
    fits = fit_all(results)
    fits["plots"] = plot(results, fits, out) if plot is not None else []
    public = {k: v for k, v in fits.items() if not k.startswith("_")}  # "_law" is for the plots only
    fileio.write_json_atomic(out / "fits.json", fileio.to_jsonable(public))
    return fits


def summary(fits: dict) -> str:
    """A few lines for the terminal."""
    lines = [f"{fits['num_runs']} finished runs"]
    for b in fits["isoflop"]:
        rec, tok = b["recurrence"], b["tokens_fit"]
        rec_text = (
            f"μ* {rec['optimum']:.2f} (±{_pct(rec['log_optimum_err'])})"
            if rec["ok"]
            else f"μ* n/a ({rec['reason']})"
        )
        tok_text = f"D* {tok['optimum']:.3g} (±{_pct(tok['log_optimum_err'])})" if tok["ok"] else "D* n/a"
        flag = "" if rec.get("interior", True) else " [outside sampled range]"
        lines.append(f"  C={b['flop_budget']:.3g}: {rec_text}, {tok_text}{flag}")
    for key, symbol in (("recurrence", "a"), ("tokens", "b")):
        law = fits["power_laws"][key]
        if "error" in law:
            lines.append(f"  power law {symbol}: n/a ({law['error']})")
        else:
            lines.append(
                f"  power law {symbol} = {law['exponent']:.3f} ± {law['exponent_err']:.3f} "
                f"over {law['num_budgets']} budgets (paper {law['paper_exponent']})"
            )
    tt, u = fits["test_time"], fits["unified"]
    good = [v for v in tt.values() if "error" not in v] if "error" not in tt else []
    if good:
        mre = np.mean([v.get("mean_rel_error", np.nan) for v in good])
        saturating = sum(v["saturating"] for v in good)
        lines.append(
            f"  test-time law fitted on {len(good)}/{len(tt)} runs, mean rel. error {mre:.3%}; "
            f"{saturating} saturate (Z > 0), {len(good) - saturating} get worse with depth"
        )
    elif "error" in tt:
        lines.append(f"  test-time law: n/a ({tt['error']})")
    if "error" in u:
        lines.append(f"  unified law: n/a ({u['error']})")
    else:
        lines.append("  unified law " + ", ".join(f"{k}={v:.4g}" for k, v in u["params"].items()))
        lines.append(
            f"    mean rel. error {u['mean_rel_error']:.3%} in sample, {u['loo_mean_rel_error']:.3%} "
            f"leave-one-run-out ({u['num_points']} points, {u['num_runs']} runs; paper 0.85-1.31%)"
        )
    return "\n".join(lines)


def _pct(log_err: float) -> str:
    return "n/a" if not math.isfinite(log_err) else f"{math.expm1(log_err):.0%}"
