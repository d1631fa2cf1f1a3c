"""stability: the injection (diagonal / linear concat-and-project / add) × learning rate grid.

The paper's claim: the diagonal injection, whose state matrix exp(-Δ·A) has spectral radius < 1 by
construction, trains stably at learning rates where the linear concat+project injection of prior
recurrent-depth models (an unconstrained state block W_h) and the additive one (state matrix I) spike
and diverge. Every run uses the same data, steps and seed; only the injection and the learning rate
(the AdamW and Muon rates of the recipe, multiplied by the same factor) change.

Per run: final and maximum training loss, loss spikes, divergence, and ρ, the spectral radius of the
injection's state matrix over training (the trainer's `rho_A`: max exp(-Δ·A) for diagonal, the largest
|eigenvalue| of W_h computed by Gelfand's formula for linear, 1 for add).

Definitions, fixed before any run: a *spike* is a step, after the first 10% of the run, whose loss
exceeds 1.1 × the median of the 10 steps before it (consecutive spike steps count once); a run
*diverged* if a loss was non-finite (the trainer stops then) or its final loss (mean of the last 10
steps) is above its first logged loss; *final loss* is that mean, *maximum loss* the largest loss after
the first 10% of the run.
"""

from __future__ import annotations

import statistics

import numpy as np

from parcae_jax.experiments import common

INJECTIONS = ("diagonal", "linear", "add")
STOPPED_RUNS_ARE_RESULTS = True  # a non-finite loss stops a run: that is a divergence, measured
SPIKE_RATIO = 1.1
SPIKE_WINDOW = 10
# Learning-rate multipliers of the recipe's rates (tiny: AdamW 3e-3, Muon 2e-2; 140M: 8e-3 both).
SCALES = {
    "micro": {"multipliers": (8.0,), "steps": 4, "batch": 8},
    "cpu": {"multipliers": (0.5, 1.0, 2.0, 4.0, 8.0), "steps": 180, "batch": 16},
    "gpu": {"multipliers": (0.5, 1.0, 2.0, 4.0, 8.0), "tokens": 60_000_000, "batch": 64},
    "tpu": {"multipliers": (0.5, 1.0, 2.0, 4.0, 8.0), "tokens": 250_000_000, "batch": 128},
}


def runs(scale: str, data_dir: str | None) -> list[common.Run]:
    spec = SCALES[scale]
    setup = common.scale_setup(scale, spec)
    recipe = common.recipe_rates(setup.base)
    data = common.data_overrides(data_dir, common.dataset_vocab(data_dir))
    out = []
    for injection in INJECTIONS:
        for m in spec["multipliers"]:
            lr = f"train.lr={recipe['lr'] * m:.6g}"
            muon = f"train.muon_lr={recipe['muon_lr'] * m:.6g}"
            overrides = (
                *setup.shape,
                *setup.train,
                *data,
                *setup.stop,
                f"model.injection_type={injection}",
                lr,
                muon,
                "train.log_every=1",
                "train.loss_guardrail=none",
            )
            out.append(common.Run(f"{injection}_lr{m:g}x", overrides, base=setup.base))
    return out


def spikes(losses: list[float]) -> int:
    """Spike events: steps after the first 10% whose loss exceeds SPIKE_RATIO × the median of the
    SPIKE_WINDOW steps before; consecutive spike steps are one event."""
    start = max(SPIKE_WINDOW, len(losses) // 10)
    events, previous = 0, False
    for t in range(start, len(losses)):
        spike = losses[t] > SPIKE_RATIO * statistics.median(losses[t - SPIKE_WINDOW : t])
        events += spike and not previous
        previous = spike
    return events


def measure(rows: list[dict]) -> dict:
    """The per-run figures from its metrics rows (see the module docstring for the definitions)."""
    steps = [r["step"] for r in rows if "loss" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    if not losses:
        return {"steps_run": 0, "diverged": None}
    finite = [x for x in losses if common.finite(x)]
    nonfinite = len(finite) < len(losses)
    tail = finite[-10:]
    final = float(np.mean(tail)) if tail else float("nan")
    late = finite[max(1, len(finite) // 10) :] or finite
    rho = [(r["step"], r["rho_A"]) for r in rows if "rho_A" in r]
    return {
        "steps_run": steps[-1],
        "first_loss": losses[0],
        "final_loss": final,
        "max_loss": max(late) if late else float("nan"),
        "spikes": spikes(finite),
        "nonfinite_loss": nonfinite,
        "diverged": bool(nonfinite or not final <= losses[0]),
        "rho_first": rho[0][1] if rho else None,
        "rho_last": rho[-1][1] if rho else None,
        "rho_max": max(v for _, v in rho) if rho else None,
        "rho_curve": {"steps": [s for s, _ in rho], "rho": [v for _, v in rho]},
        "loss_curve": {"steps": steps, "loss": losses},
    }


def analyze(points, outcomes: dict[str, dict], scale: str) -> dict:
    spec = SCALES[scale]
    recipe = common.recipe_rates(common.scale_setup(scale, spec).base)
    table = []
    for point in points:
        injection, _, rest = point.name.partition("_lr")
        m = float(rest.rstrip("x"))
        o = outcomes[point.name]
        entry = {
            "run": point.name,
            "injection": injection,
            "lr_multiplier": m,
            "lr": recipe["lr"] * m,
            "muon_lr": recipe["muon_lr"] * m,
            "state": o["state"],
        }
        entry |= measure(o["rows"])
        entry["val_loss"] = o["result"]["val_loss"] if o["result"] else None
        table.append(entry)
    verdict = {}
    for injection in INJECTIONS:
        mine = [e for e in table if e["injection"] == injection]
        stable = [e["lr_multiplier"] for e in mine if e["diverged"] is False]
        verdict[injection] = {
            "largest_stable_multiplier": max(stable) if stable else None,
            "diverged_at": [e["lr_multiplier"] for e in mine if e["diverged"]],
            "total_spikes": sum(e.get("spikes", 0) for e in mine),
            "best_final_loss": min(
                (e["final_loss"] for e in mine if common.finite(e.get("final_loss"))), default=None
            ),
            "rho_max": max((e["rho_max"] for e in mine if e.get("rho_max") is not None), default=None),
        }
    return {
        "recipe_rates": recipe,
        "runs": table,
        "by_injection": verdict,
        "definitions": __doc__.split("Definitions, fixed before any run: ")[1].strip(),
    }


def draw(results: dict, out) -> list[str]:
    plt = common.pyplot()
    runs = results["runs"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, injection in enumerate(INJECTIONS):
        mine = sorted((e for e in runs if e["injection"] == injection), key=lambda e: e["lr_multiplier"])
        x = [e["lr"] for e in mine]
        y = [e["final_loss"] if common.finite(e.get("final_loss")) else np.nan for e in mine]
        ax.plot(x, y, marker="o", color=f"C{i}", label=injection)
        for e, yy in zip(mine, y, strict=True):
            if e["diverged"]:
                ax.scatter(
                    [e["lr"]],
                    [yy if np.isfinite(yy) else e.get("first_loss", np.nan)],
                    marker="x",
                    s=80,
                    color=f"C{i}",
                )
    ax.set_xscale("log")
    ax.set_xticks([e["lr"] for e in runs if e["injection"] == INJECTIONS[0]])
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda x, _: f"{x:.2g}"))
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel("AdamW learning rate (Muon's scaled alike)")
    ax.set_ylabel("final training loss (mean of last 10 steps)")
    ax.set_title("final loss vs learning rate (x: diverged)")
    ax.legend()
    ax.grid(alpha=0.3)
    names = [common.save(fig, out / "final_loss_vs_lr.png")]

    fig, axes = plt.subplots(1, len(INJECTIONS), figsize=(13, 3.8), sharey=False)
    for ax, injection in zip(axes, INJECTIONS, strict=True):
        mine = sorted((e for e in runs if e["injection"] == injection), key=lambda e: e["lr_multiplier"])
        for j, e in enumerate(mine):
            curve = e.get("rho_curve") or {"steps": [], "rho": []}
            ax.plot(
                curve["steps"],
                curve["rho"],
                color=plt.cm.viridis(j / max(1, len(mine) - 1)),
                label=f"lr × {e['lr_multiplier']:g}",
            )
        ax.axhline(1.0, color="grey", ls="--", lw=1)
        ax.set_title(f"{injection}: spectral radius ρ of the state matrix")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("ρ")
    axes[0].legend(fontsize=7)
    names.append(common.save(fig, out / "rho_over_steps.png"))
    return names


def summary(results: dict) -> list[str]:
    lines = [
        f"{'run':<18} {'final':>7} {'max':>7} {'spikes':>6} {'diverged':>8} {'ρ first':>8} {'ρ last':>8}"
    ]
    for e in results["runs"]:

        def num(v):
            return f"{v:.3f}" if common.finite(v) else "-"

        lines.append(
            f"{e['run']:<18} {num(e.get('final_loss')):>7} {num(e.get('max_loss')):>7} "
            f"{e.get('spikes', '-'):>6} {str(e['diverged']):>8} {num(e.get('rho_first')):>8} "
            f"{num(e.get('rho_last')):>8}"
        )
    for injection, v in results["by_injection"].items():
        lines.append(
            f"{injection}: stable up to lr × {v['largest_stable_multiplier']}, diverged at "
            f"{v['diverged_at'] or 'none'}, {v['total_spikes']} spikes, max ρ {v['rho_max']}"
        )
    return lines
