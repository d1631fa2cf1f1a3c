"""Scaling-law fits: isoFLOP parabolas, power laws across budgets, and the unified loss law.

* `isoflop_optimum(values, losses)`: per FLOP budget, a parabola of the loss in x = ln(value) (value =
  mean recurrence or tokens); the optimum is its vertex, exp(−b / 2a), with a standard error from the
  polynomial fit's covariance (delta method). Not defined for fewer than 3 points or a parabola that
  opens downwards; an error needs at least 4 points (3 fit the parabola exactly).
* `fit_power_law(C, y)`: y = k · C^e by (weighted) least squares in log–log, with standard errors.
* `UnifiedLaw`, fitted by `fit_unified_law`: one law over training recurrence μ (= r̄), trained
  tokens D and test-time recurrence T,

      L(μ, D, T) = E + A · μ^(−α) + B · (D / 10⁹)^(−β) + Z · exp(−z · T / μ)

  The first three terms are a Chinchilla-style law with the recurrence in the place of parameters
  (at a fixed model, looping is what adds effective depth, with diminishing returns α); the last is
  the test-time saturation L(T) = L_inf + Z·exp(−z·T) of each run, with the decay rate measured in
  units of the training recurrence (a model trained to loop μ times needs ~μ steps to converge), so
  L_inf(μ, D) = E + A·μ^(−α) + B·(D/10⁹)^(−β). The paper does not publish its functional form; this
  one is our choice and is stated in `fits.json`. Fitted by robust nonlinear least squares
  (`scipy.optimize.least_squares`, soft-L1 loss) on relative residuals, multi-start, and judged by
  leave-one-run-out mean relative error (all depths of a run held out together).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

TOKENS_UNIT = 1e9  # D is measured in billions of tokens inside the law (conditioning only)


# ---------------------------------------------------------------------------------------------------
# isoFLOP parabolas and power laws
# ---------------------------------------------------------------------------------------------------


def isoflop_optimum(values, losses) -> dict:
    """Vertex of loss ≈ a·x² + b·x + c with x = ln(value). Keys: optimum, log_optimum, log_optimum_err
    (standard error of ln optimum, NaN when not estimable), curvature a, interior (vertex inside the
    sampled range), ok (a parabola opening upwards was fitted)."""
    x = np.log(np.asarray(values, dtype=float))
    y = np.asarray(losses, dtype=float)
    best = float(np.exp(x[np.argmin(y)]))
    out = {"num_points": int(x.size), "best_observed": best, "ok": False}
    if x.size < 3 or np.unique(x).size < 3:
        return out | {"reason": "needs 3 distinct values"}
    if x.size > 3:
        coeffs, cov = np.polyfit(x, y, 2, cov=True)
    else:
        coeffs, cov = np.polyfit(x, y, 2), None
    a, b, _ = coeffs
    if a <= 0:
        return out | {"reason": "parabola opens downwards (no interior minimum)", "coeffs": coeffs.tolist()}
    vertex = -b / (2 * a)
    err = float("nan")
    if cov is not None:
        grad = np.array([b / (2 * a * a), -1 / (2 * a)])  # d vertex / d(a, b)
        err = float(math.sqrt(max(grad @ cov[:2, :2] @ grad, 0.0)))
    return out | {
        "ok": True,
        "optimum": float(np.exp(vertex)),
        "log_optimum": float(vertex),
        "log_optimum_err": err,
        "curvature": float(a),
        "min_loss": float(np.polyval(coeffs, vertex)),
        "interior": bool(x.min() <= vertex <= x.max()),
        "coeffs": coeffs.tolist(),
    }


def fit_power_law(compute, values, log_errors=None) -> dict:
    """values ≈ coefficient · compute^exponent, fitted as a line in (ln C, ln y); weights 1/σ² from
    `log_errors` (standard errors of ln y) when all are finite and positive. Errors need ≥ 3 points."""
    x = np.log(np.asarray(compute, dtype=float))
    y = np.log(np.asarray(values, dtype=float))
    if x.size < 2 or np.unique(x).size < 2:
        raise ValueError("a power law needs optima at 2 or more distinct budgets")
    w = np.ones_like(x)
    sigma = None if log_errors is None else np.asarray(log_errors, dtype=float)
    weighted = sigma is not None and np.all(np.isfinite(sigma)) and np.all(sigma > 0)
    if weighted:
        w = 1 / sigma**2
    X = np.stack([np.ones_like(x), x], axis=1)
    XtW = X.T * w
    cov_unscaled = np.linalg.inv(XtW @ X)
    intercept, slope = cov_unscaled @ XtW @ y
    resid = y - (intercept + slope * x)
    dof = x.size - 2
    if dof > 0:
        scale = float(resid**2 @ w) / dof
        cov = cov_unscaled * scale
        slope_err, intercept_err = math.sqrt(cov[1, 1]), math.sqrt(cov[0, 0])
    else:
        slope_err = intercept_err = float("nan")
    return {
        "exponent": float(slope),
        "exponent_err": slope_err,
        "coefficient": float(math.exp(intercept)),
        "log_coefficient_err": intercept_err,
        "num_budgets": int(x.size),
        "weighted": bool(weighted),
    }


# ---------------------------------------------------------------------------------------------------
# The unified law
# ---------------------------------------------------------------------------------------------------

PARAM_NAMES = ("E", "A", "alpha", "B", "beta", "Z", "z")
FORM = "L(mu, D, T) = E + A*mu^(-alpha) + B*(D/1e9)^(-beta) + Z*exp(-z*T/mu)"
_LOWER = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1e-3])
_UPPER = np.array([np.inf, np.inf, 4.0, np.inf, 4.0, np.inf, 50.0])


@dataclasses.dataclass(frozen=True)
class UnifiedLaw:
    E: float
    A: float
    alpha: float
    B: float
    beta: float
    Z: float
    z: float

    def __call__(self, mu, tokens, depth):
        return unified_loss(np.array(dataclasses.astuple(self)), mu, tokens, depth)


def unified_loss(theta, mu, tokens, depth):
    E, A, alpha, B, beta, Z, z = theta
    mu = np.asarray(mu, dtype=float)
    d = np.asarray(tokens, dtype=float) / TOKENS_UNIT
    t = np.asarray(depth, dtype=float)
    return E + A * mu ** (-alpha) + B * d ** (-beta) + Z * np.exp(-z * t / mu)


def _starts(loss):
    """Multi-start grid: the robust loss has local minima where one term absorbs another."""
    floor = 0.8 * float(np.min(loss))
    span = max(float(np.max(loss)) - float(np.min(loss)), 1e-3)
    for alpha, beta, z in itertools.product((0.3, 1.0), (0.3, 0.7), (0.5, 2.0)):
        yield np.array([floor, span, alpha, 0.2 * float(np.min(loss)), beta, span, z])


def _solve(mu, tokens, depth, loss, x0, f_scale):
    try:
        from scipy.optimize import least_squares
    except ImportError as e:
        raise ImportError("the scaling-law fits need scipy: pip install scipy") from e

    def residuals(theta):
        return (unified_loss(theta, mu, tokens, depth) - loss) / loss

    x0 = np.clip(x0, _LOWER + 1e-9, _UPPER - 1e-9)
    return least_squares(
        residuals, x0, bounds=(_LOWER, _UPPER), loss="soft_l1", f_scale=f_scale, max_nfev=4000
    )


def fit_unified_law(mu, tokens, depth, loss, *, f_scale: float = 0.01, runs=None, x0=None) -> dict:
    """Fit `FORM` to observations (one per run and test depth). `runs` labels each observation's run,
    for leave-one-run-out validation (default: every observation its own run). Returns params,
    param_errors (from the Jacobian at the optimum; approximate under the robust loss), in-sample
    and leave-one-out mean relative errors, and the law."""
    mu, tokens, depth, loss = (np.asarray(v, dtype=float) for v in (mu, tokens, depth, loss))
    if mu.size < len(PARAM_NAMES) + 1:
        raise ValueError(f"the unified law has {len(PARAM_NAMES)} parameters; got {mu.size} observations")
    starts = [np.asarray(x0, dtype=float)] if x0 is not None else list(_starts(loss))
    best = min((_solve(mu, tokens, depth, loss, s, f_scale) for s in starts), key=lambda r: r.cost)
    theta = best.x
    pred = unified_loss(theta, mu, tokens, depth)
    rel = np.abs(pred - loss) / loss
    errors = _param_errors(best)
    runs = np.arange(mu.size) if runs is None else np.asarray(runs)
    loo = leave_one_run_out(mu, tokens, depth, loss, runs, theta, f_scale)
    return {
        "form": FORM,
        "params": dict(zip(PARAM_NAMES, map(float, theta), strict=True)),
        "param_errors": dict(zip(PARAM_NAMES, map(float, errors), strict=True)),
        "mean_rel_error": float(rel.mean()),
        "max_rel_error": float(rel.max()),
        "loo_mean_rel_error": loo["mean_rel_error"],
        "loo_predictions": loo["predictions"].tolist(),
        "predictions": pred.tolist(),
        "num_points": int(mu.size),
        "num_runs": int(np.unique(runs).size),
        "loss": "soft_l1",
        "f_scale": f_scale,
        "law": UnifiedLaw(*map(float, theta)),
    }


def _param_errors(result) -> np.ndarray:
    J = result.jac
    dof = max(J.shape[0] - J.shape[1], 1)
    s2 = 2 * result.cost / dof
    try:
        cov = np.linalg.pinv(J.T @ J) * s2
    except np.linalg.LinAlgError:
        return np.full(J.shape[1], np.nan)
    return np.sqrt(np.clip(np.diag(cov), 0, None))


def leave_one_run_out(mu, tokens, depth, loss, runs, theta, f_scale) -> dict:
    """Refit without each run (warm-started at the full fit) and predict its observations."""
    preds = np.empty_like(loss)
    for run in np.unique(runs):
        held = runs == run
        keep = ~held
        if keep.sum() < len(PARAM_NAMES) + 1:
            preds[held] = np.nan
            continue
        fit = _solve(mu[keep], tokens[keep], depth[keep], loss[keep], theta, f_scale)
        preds[held] = unified_loss(fit.x, mu[held], tokens[held], depth[held])
    rel = np.abs(preds - loss) / loss
    return {
        "mean_rel_error": float(np.nanmean(rel)) if np.isfinite(rel).any() else float("nan"),
        "predictions": preds,
    }
