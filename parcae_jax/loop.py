"""The one recurrence loop, shared by the evaluation forward, truncated-BPTT training and cached decoding.

`recur(step, h, count=, bound=)` applies a recurrence step up to `bound` times. Every element of the
state's leading axes ([B, T]) runs its own number of steps, `count` (shape (), [B] or [B, T]); an
element whose count is spent keeps its state (per-token depths: it still serves as key/value). A step
may also report convergence (adaptive depth at decode time), which retires the element early.

* `bound` a Python int: a `lax.scan` of static length, so reverse-mode autodiff works (the gradient
  steps of training). Every trip runs the step; elements past their count keep their state, so one
  compiled program serves every sampled depth. The trips are not skipped with a `lax.cond` once every
  count is spent: outside a checkpoint, reverse mode stacks every residual of a `lax.cond` in a scan
  body per trip, loop-invariant or not (the weights, the injection's input term, RoPE), which cost the
  140M train step 0.8 GiB of its 11.8 GiB at micro-batch 8 x 2048 (`parcae_jax.aot`, v5p-8), and a
  skip only pays when every row drew fewer steps than `bound` (almost never at the released depth
  sampling).
* `bound` traced: a `lax.while_loop` (evaluation, the gradient-free prefix, decoding), which with
  `stop_when_done` also ends as soon as every element has converged.

`step(r, h, carry, run) -> (h_new, carry, converged)`: `r` the 0-based recurrence, `run` [B, T] the
elements this step advances, `carry` anything else the step threads through the loop (cache
buffers), `converged` a [B, T] bool or None.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


class Recurred(NamedTuple):
    """`h` the final states; `h_prev` each element's state before its last step (h0 if none ran);
    `carry` the step's final carry; `depth` [B, T] steps each element ran; `steps` loop trips."""

    h: Float[Array, "B T D"]
    h_prev: Float[Array, "B T D"]
    carry: Any
    depth: Int[Array, "B T"]
    steps: Int[Array, ""]


def rel_residual(h_new: Float[Array, "... D"], h_old: Float[Array, "... D"]) -> Float[Array, " ..."]:
    """‖h_t − h_{t−1}‖ / ‖h_t‖ per element."""
    diff = jnp.linalg.norm(h_new - h_old, axis=-1)
    return diff / (jnp.linalg.norm(h_new, axis=-1) + 1e-12)


def per_element(x, lead: tuple[int, ...]) -> Int[Array, " ..."]:
    """A count of shape (), [B] or [B, T] as int32, broadcastable against the leading axes `lead`."""
    x = jnp.asarray(x, jnp.int32)
    return x.reshape(x.shape + (1,) * (len(lead) - x.ndim))  # () / [B] broadcast against [B, T]


def recur(
    step: Callable,
    h: Float[Array, "B T D"],
    *,
    count,
    bound,
    carry: Any = None,
    stop_when_done: bool = False,
) -> Recurred:
    """Run `step` (see the module docstring) from state `h`; returns a `Recurred`."""
    lead = h.shape[:-1]
    count = per_element(count, lead)
    differentiable = isinstance(bound, int)

    def one(r, state):
        h, h_prev, carry, active, depth = state
        run = active & (r < count)
        h_new, carry, converged = step(r, h, carry, run)
        keep = run[..., None]
        h_prev = jnp.where(keep, jax.lax.stop_gradient(h), h_prev)  # telemetry only: no gradient
        h = jnp.where(keep, h_new, h)
        depth = jnp.where(run, r + 1, depth)
        if converged is not None:
            active = active & ~(run & converged)
        return h, h_prev, carry, active, depth

    state = (h, jax.lax.stop_gradient(h), carry, jnp.ones(lead, bool), jnp.zeros(lead, jnp.int32))
    if differentiable:
        state, _ = jax.lax.scan(lambda state, r: (one(r, state), None), state, jnp.arange(bound))
        trips = jnp.int32(bound)
    else:
        bound = jnp.asarray(bound, jnp.int32)

        def cond(loop_state):
            r, state = loop_state
            going = r < bound
            return going & jnp.any(state[3]) if stop_when_done else going

        trips, state = jax.lax.while_loop(cond, lambda s: (s[0] + 1, one(s[0], s[1])), (jnp.int32(0), state))
    h, h_prev, carry, _, depth = state
    return Recurred(h, h_prev, carry, depth, trips)

