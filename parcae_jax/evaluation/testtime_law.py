"""The test-time scaling law of a looped model: loss against recurrence depth T saturates as

    L(T) = L_inf + Z · exp(-z · T)

(Parcae paper, test-time compute section). `fit_test_time_law` fits it by nonlinear least squares and
reports the parameters, their standard errors (from the covariance of the fit) and the fit's mean
relative error. Used per checkpoint by the depth sweep and by the scaling-law tooling.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

PARAMS = ("L_inf", "Z", "z")


def saturating_law(T, L_inf: float, Z: float, z: float):
    """L(T) = L_inf + Z·exp(-z·T), elementwise over `T`."""
    return L_inf + Z * np.exp(-z * np.asarray(T, dtype=np.float64))


def _linear_fit(T: np.ndarray, L: np.ndarray, z: float) -> tuple[float, float, float]:
    """For a fixed decay rate the law is linear in (L_inf, Z): closed-form least squares, with its SSE."""
    design = np.stack([np.ones_like(T), np.exp(-z * T)], axis=1)
    (L_inf, Z), *_ = np.linalg.lstsq(design, L, rcond=None)
    residual = design @ np.array([L_inf, Z]) - L
    return float(L_inf), float(Z), float(residual @ residual)


def _initial_guess(T: np.ndarray, L: np.ndarray) -> tuple[float, float, float]:
    """Best (L_inf, Z, z) over a log-spaced grid of z: a starting point the refinement cannot miss by
    much, since for each z the other two parameters are solved exactly."""
    span = max(float(T.max() - T.min()), 1.0)
    best = None
    for z in np.geomspace(1e-3 / span, 50.0 / max(float(T.min()), 1e-3), 400):
        L_inf, Z, sse = _linear_fit(T, L, z)
        if best is None or sse < best[3]:
            best = (L_inf, Z, z, sse)
    return best[0], best[1], best[2]


def fit_test_time_law(depths: Sequence[float], losses: Sequence[float], sigma: Sequence[float] | None = None
                      ) -> dict[str, float]:
    """Fit L(T) = L_inf + Z·exp(-z·T) to (depth, loss) points.

    `sigma` (optional, same length): per-point standard deviations, used as weights (e.g. the spread
    over initial-state seeds). Returns {"L_inf", "Z", "z"} (z > 0), their standard errors
    {"L_inf_err", "Z_err", "z_err"} (NaN when there are no more points than parameters), and
    "mean_rel_error" = mean |L_fit(T) - L(T)| / L(T) over the points.
    """
    from scipy.optimize import OptimizeWarning, curve_fit

    T = np.asarray(depths, dtype=np.float64)
    L = np.asarray(losses, dtype=np.float64)
    if T.shape != L.shape or T.ndim != 1:
        raise ValueError(f"depths and losses must be 1-D of the same length, got {T.shape} and {L.shape}")
    if len(T) < 3:
        raise ValueError(f"fitting L_inf, Z and z needs at least 3 depths, got {len(T)}")
    if not np.all(np.isfinite(L)):
        raise ValueError(f"losses must be finite to fit the test-time law, got {L.tolist()}")
    weights = None
    if sigma is not None:
        weights = np.asarray(sigma, dtype=np.float64)
        # Zero spread (deterministic state init) would give infinite weight: treat as unweighted.
        weights = None if not np.all(weights > 0) else weights
    p0 = _initial_guess(T, L)
    try:
        with warnings.catch_warnings():  # 3 points: covariance undefined, reported as NaN below
            warnings.simplefilter("ignore", OptimizeWarning)
            params, cov = curve_fit(
                saturating_law, T, L, p0=p0, sigma=weights, absolute_sigma=False,
                bounds=([-np.inf, -np.inf, 0.0], [np.inf, np.inf, np.inf]), maxfev=20000,
            )
    except RuntimeError:  # no convergence: keep the grid solution, uncertainties unknown
        params, cov = np.array(p0), np.full((3, 3), np.nan)
    with np.errstate(invalid="ignore"):
        errors = np.sqrt(np.diag(cov)) if np.all(np.isfinite(cov)) else np.full(3, np.nan)
    fitted = saturating_law(T, *params)
    out = {name: float(v) for name, v in zip(PARAMS, params, strict=True)}
    out.update({f"{name}_err": float(e) for name, e in zip(PARAMS, errors, strict=True)})
    out["mean_rel_error"] = float(np.mean(np.abs(fitted - L) / np.abs(L)))
    return out


def describe_fit(fit: dict[str, float]) -> str:
    """One line: `L(T) = 3.21(±0.01) + 1.50(±0.05)·exp(-0.62(±0.03)·T), mean rel. error 0.4%`."""

    def term(name, value):
        err = fit.get(f"{name}_err", math.nan)
        return f"{value:.4g}" + ("" if not math.isfinite(err) else f"(±{err:.2g})")

    sign = "+" if fit["Z"] >= 0 else "-"
    law = f"{term('L_inf', fit['L_inf'])} {sign} {term('Z', abs(fit['Z']))}·exp(-{term('z', fit['z'])}·T)"
    return f"L(T) = {law}, mean rel. error {100 * fit['mean_rel_error']:.2f}%"
