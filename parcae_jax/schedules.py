"""Per-step schedules of the official recipe (spec §7.3, §7.4), as optax schedules of the optimiser step.

Every schedule takes the optimiser-step counter `τ_opt` (0 at the first accumulation boundary, counting
skipped steps too) and returns a float32 scalar; `optim.build_optimizer` feeds them to
`optax.inject_hyperparams`, whose counter advances on every `update` call, skipped or not.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

LR_SCHEDULES = ("trapezoid", "constant", "linear", "cosine")


def resolve_steps(value: float, max_steps: int) -> int:
    """Warm-up / cool-down length: values < 1 are fractions of `max_steps` (`int(fraction · max_steps)`)."""
    if value < 0:
        raise ValueError(f"step counts must be non-negative, got {value}")
    return int(value * max_steps) if value < 1 else int(value)


def lr_schedule(
    kind: str, lr: float, min_lr: float, warmup_steps: float, cooldown_steps: float, max_steps: int
) -> optax.Schedule:
    """Absolute (AdamW) learning rate at optimiser step τ (spec §7.4), priority as in the spec:

    * `W > 0 and τ < W`:  lr · τ / W                                          (linear warm-up)
    * `Cd > 0 and τ > S − Cd`:  max(lr · (S − τ) / Cd, min_lr)                 (linear cool-down)
    * `τ > S`:  min_lr
    * otherwise the decay rule, with `s = (τ − W) / (S − W)`: trapezoid/constant → lr;
      linear → lr − s·(lr − min_lr); cosine → min_lr + ½(1 + cos(π s))(lr − min_lr).
    """
    if kind not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {kind!r}")
    total = max_steps
    warmup = resolve_steps(warmup_steps, total)
    cooldown = resolve_steps(cooldown_steps, total)
    decay_steps = max(total - warmup, 1)

    if kind in ("trapezoid", "constant"):
        decay = optax.constant_schedule(lr)
    elif kind == "linear":
        decay = optax.linear_schedule(lr, min_lr, decay_steps)
    else:  # cosine; optax's `alpha` is the final value as a fraction of the initial one
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=min_lr / lr if lr else 0.0)

    schedules: list[optax.Schedule] = []
    boundaries: list[int] = []
    if warmup > 0:
        schedules.append(optax.linear_schedule(0.0, lr, warmup))
        boundaries.append(warmup)
    schedules.append(decay)

    if cooldown > 0:
        # The cool-down rule wins from τ = S − Cd + 1 on (τ = S − Cd itself still follows the decay rule),
        # but never over the warm-up. join_schedules hands each piece the steps since its boundary, so the
        # ramp is re-anchored on the absolute step τ = start + k.
        start = max(total - cooldown + 1, warmup)

        def cooldown_piece(k, start=start):
            # lr · (S − τ) / Cd written out (not optax.linear_schedule, whose `init + (end − init)·frac`
            # loses ~1e-4 relative precision in float32 near the end of the ramp).
            remaining = jnp.maximum(total - (k + start), 0).astype(jnp.float32)
            return jnp.maximum(lr * remaining / cooldown, min_lr)

        schedules.append(cooldown_piece)
        boundaries.append(start)
    else:
        schedules.append(optax.constant_schedule(min_lr))  # τ > S
        boundaries.append(total + 1)

    joined = optax.join_schedules(schedules, boundaries)
    return lambda step: jnp.asarray(joined(step), jnp.float32)


def muon_momentum_schedule(start: float, target: float, warmup_steps: int) -> optax.Schedule:
    """μ(τ) = start + min(τ / warmup_steps, 1) · (target − start) (0.85 → 0.95 over 300 steps)."""
    if warmup_steps <= 0:
        return optax.constant_schedule(target)
    return optax.linear_schedule(start, target, warmup_steps)


def muon_weight_decay_schedule(muon_wd: float, max_steps: int) -> optax.Schedule:
    """wd(τ) = muon_wd · max(0, 1 − τ / max_steps) (linear to 0 at the end of training)."""
    return optax.linear_schedule(muon_wd, 0.0, max_steps)
