"""The official MuonAdamW recipe (spec §7.3–§7.5) as one `optax.GradientTransformation`.

    tx = build_optimizer(params, cfg.train, max_steps)
    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params)   # params are required (weight decay)
    params = optax.apply_updates(params, updates)
    optimizer_metrics(opt_state)   # lr, muon_lr, muon_momentum, muon_wd, skipped steps, τ_opt

Structure (outermost first), each piece an optax transform:

    inject_hyperparams                 schedules of the optimiser step τ_opt (every call counts)
    └ conditionally_mask               `skip_first_step`: the τ_opt = 0 update is discarded
      └ apply_if_finite                `skip_nonfinite_grads`: non-finite gradients skip the step
        └ chain
          ├ clip_by_global_norm        `grad_clip` (off when <= 0)
          └ partition                  {'muon': muon(...), 'adamw': adamw(...)} by `param_groups`

`params` may be an `nnx.State` of `nnx.Param`s (as from `nnx.split(model, nnx.Param, ...)`) or its
pure-dict form; the grouping reads leaf paths and shapes only, so both give the same optimiser.

Layout: our linear kernels are `(in, out)`, the transpose of PyTorch's `(out, in)`. The spec's `r × c`
is the PyTorch shape, so for a kernel of our shape `(..., a, b)`: r = b (out), c = a (in). The Muon step
transposes each matrix to the PyTorch layout, follows the spec verbatim, and transposes back.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from parcae_jax import schedules
from parcae_jax.errors import ConfigError

MUON, ADAMW = "muon", "adamw"
OPTIMIZERS = ("muon_adamw", "adamw")

# Polar-Express coefficients (a, b, c) of the odd matrix polynomials, one triple per iteration (spec §7.3).
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
ORTHO_DTYPE = jnp.bfloat16  # the orthogonalised update X (and the scalars η, wd applied to it)

# Substrings of the lower-cased, '/'-joined parameter path that send a parameter to AdamW (spec §7.3:
# embeddings / value embeddings / untied head, norms, biases, the injection's A_log and dt_bias).
_ADAMW_SUBSTRINGS = ("wte", "embed", "lm_head", "norm", "ln_", "bias", "a_log", "dt_bias")
# Consecutive path segments that do the same: diagonal injection `B`, linear injection matrix.
_ADAMW_SEGMENT_PAIRS = (("adapter", "b"), ("adapter", "adapter"))
_READOUT = "c"  # the readout `C` (PyTorch `transformer.c.`): a path segment exactly equal to "c"


# ----------------------------------------------------------------------------------------------------
# Parameter grouping
# ----------------------------------------------------------------------------------------------------


def _path_segments(path) -> list[str]:
    """Lower-cased names of a tree path; the `.value` attribute of an `nnx.Variable` is dropped."""
    segments = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            segments.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            segments.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            if key.name != "value":
                segments.append(key.name)
        else:  # FlattenedIndexKey and friends
            segments.append(str(key))
    return [s.lower() for s in segments]


def param_label(path: str, ndim: int) -> str:
    """'adamw' or 'muon' for one parameter, from its '/'-joined path and its number of dimensions."""
    segments = path.lower().split("/")
    joined = "/".join(segments)
    pairs = set(zip(segments, segments[1:], strict=False))
    if (
        ndim < 2
        or any(s in joined for s in _ADAMW_SUBSTRINGS)
        or any(p in pairs for p in _ADAMW_SEGMENT_PAIRS)
        or _READOUT in segments
    ):
        return ADAMW
    return MUON


def param_groups(params) -> Any:
    """A pytree shaped like `params` with 'muon' / 'adamw' at the leaves (spec §7.3)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: param_label("/".join(_path_segments(path)), jnp.ndim(leaf)), params
    )


# ----------------------------------------------------------------------------------------------------
# Muon
# ----------------------------------------------------------------------------------------------------


class MuonState(NamedTuple):
    """Per-parameter state of `muon`; both trees are shaped like the (masked) params tree.

    momentum:      M, fp32, the parameter's shape `(..., in, out)`.
    second_moment: S, fp32, in the PyTorch layout (as in the official checkpoints): `(..., r, 1)` (per-row
                   statistics) if r >= c, else `(..., 1, c)` (per-column), with r = out and c = in.
    """

    momentum: optax.Updates
    second_moment: optax.Updates


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(r, c) of a kernel stored as `(..., in, out)`."""
    return shape[-1], shape[-2]


def _second_moment_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    r, c = _torch_shape(shape)
    return (*shape[:-2], r, 1) if r >= c else (*shape[:-2], 1, c)


def _frobenius(x: jax.Array) -> jax.Array:
    """‖x‖_F per matrix over the last two axes, accumulated in fp32, keepdims."""
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(-2, -1), keepdims=True))


def _polar_express(x: jax.Array, ns_steps: int, dtype) -> jax.Array:
    """Approximate polar factor of each `(..., r, c)` matrix (PyTorch layout), computed in bf16.

    The Gram matrix is taken on the smaller side: `A = XᵀX` (c × c) if r > c, else `A = XXᵀ` (r × r).
    """
    x = x.astype(dtype)
    x = x / (_frobenius(x).astype(dtype) * 1.02 + 1e-6)
    tall = x.shape[-2] > x.shape[-1]
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        if tall:
            gram = jnp.swapaxes(x, -1, -2) @ x
            x = a * x + x @ (b * gram + c * (gram @ gram))
        else:
            gram = x @ jnp.swapaxes(x, -1, -2)
            x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x


def _equalize(x: jax.Array, second_moment: jax.Array, beta2: float) -> tuple[jax.Array, jax.Array]:
    """NorMuon-style row/column equalisation of `x` (PyTorch layout, bf16), Frobenius norm preserved.

    Reduces along the columns (per-row statistics) if r >= c, else along the rows; statistics in fp32.
    """
    r, c = x.shape[-2:]
    axis = -1 if r >= c else -2
    n = x.shape[axis]
    mean_sq = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True)  # q
    second_moment = beta2 * second_moment + (1.0 - beta2) * mean_sq
    inv_rms = jax.lax.rsqrt(jnp.maximum(second_moment, 1e-10))  # σ
    # ‖X‖_F and ‖X ⊙ σ‖_F from the reduced statistics (σ is constant along the reduction axis).
    norm_before = jnp.sqrt(jnp.sum(mean_sq * n, axis=(-2, -1), keepdims=True))
    norm_after = jnp.sqrt(jnp.sum(mean_sq * n * jnp.square(inv_rms), axis=(-2, -1), keepdims=True))
    scale = inv_rms * (norm_before / jnp.maximum(norm_after, 1e-10))
    return x * scale.astype(x.dtype), second_moment


def _muon_leaf(grad, momentum, second_moment, param, *, lr, mu, wd, ns_steps, beta2, dtype):
    """One Muon step for one `(..., in, out)` kernel; returns (update to add, new M, new S)."""
    grad = grad.astype(jnp.float32)
    momentum = mu * momentum + (1.0 - mu) * grad
    nesterov = (1.0 - mu) * grad + mu * momentum

    x = _polar_express(jnp.swapaxes(nesterov, -1, -2), ns_steps, dtype)  # (..., r, c)
    x, second_moment = _equalize(x, second_moment, beta2)
    r, c = x.shape[-2:]
    x = jnp.swapaxes(x, -1, -2)  # back to (..., in, out)

    # Cautious decoupled weight decay: only where the update pushes the parameter towards zero.
    eta = (lr * math.sqrt(max(1.0, r / c))).astype(dtype)
    eta_wd = eta * wd.astype(dtype)
    param = param.astype(jnp.float32)
    towards_zero = (x.astype(jnp.float32) * param) >= 0
    step = (eta * x).astype(jnp.float32) + eta_wd.astype(jnp.float32) * param * towards_zero
    return -step, momentum, second_moment


def muon(
    learning_rate: jax.typing.ArrayLike,
    momentum: jax.typing.ArrayLike,
    weight_decay: jax.typing.ArrayLike,
    ns_steps: int = 5,
    beta2: float = 0.95,
    ortho_dtype=None,
) -> optax.GradientTransformation:
    """The official Muon variant (spec §7.3) on every leaf of the tree it is given (all ndim >= 2).

    Hand-written because no optax piece reproduces it: `optax.contrib.muon` has Nesterov momentum and
    accepts per-step coefficients, but not the 1.02 Frobenius pre-scaling, the bf16 iteration, the NorMuon
    second-moment equalisation, the √max(1, r/c) rescale of *our* (in, out) layout or the cautious weight
    decay, which needs X and the params in the same step. So the whole step is one transform whose output
    is the final update `−ηX − η·wd·P⊙[X⊙P ≥ 0]` (optax adds it: `P + u`).

    The official code stacks same-shape matrices into one batched call; the per-matrix maths is identical,
    so here each leaf is its own (possibly batched `(..., in, out)`) matrix.

    Args: scalars for this step: `learning_rate` (η before the shape factor), `momentum` μ, decoupled
    `weight_decay`; `ns_steps` Polar-Express iterations; `beta2` of the second moment S.
    """
    if not 1 <= ns_steps <= len(POLAR_EXPRESS_COEFFS):
        raise ConfigError(f"muon_ns_steps must be in [1, {len(POLAR_EXPRESS_COEFFS)}], got {ns_steps}")

    def init(params):
        return MuonState(
            momentum=jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
            second_moment=jax.tree.map(
                lambda p: jnp.zeros(_second_moment_shape(p.shape), jnp.float32), params
            ),
        )

    def update(updates, state, params=None):
        if params is None:
            raise ValueError(  # a caller's bug, not a user input: keeps its traceback
                "muon needs `params` (cautious weight decay): call tx.update(grads, state, params)"
            )
        grads, treedef = jax.tree.flatten(updates)
        moments, sms, ps = (treedef.flatten_up_to(t) for t in (state.momentum, state.second_moment, params))
        lr, mu, wd = (jnp.asarray(v, jnp.float32) for v in (learning_rate, momentum, weight_decay))
        dtype = ORTHO_DTYPE if ortho_dtype is None else jnp.dtype(ortho_dtype)
        outs = [
            _muon_leaf(g, m, s, p, lr=lr, mu=mu, wd=wd, ns_steps=ns_steps, beta2=beta2, dtype=dtype)
            for g, m, s, p in zip(grads, moments, sms, ps, strict=True)
        ]
        new_updates, new_m, new_s = (treedef.unflatten(list(col)) for col in zip(*outs, strict=True))
        return new_updates, MuonState(momentum=new_m, second_moment=new_s)

    return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------------------------------
# The full optimiser
# ----------------------------------------------------------------------------------------------------


def build_optimizer(params, train_cfg, max_steps: int) -> optax.GradientTransformation:
    """MuonAdamW (or plain AdamW) with the official schedules, clipping and step skipping.

    Args:
      params: the trainable parameters, an `nnx.State` of `nnx.Param`s or its pure-dict form (leaves may
        be abstract, e.g. `jax.ShapeDtypeStruct`). Only used to check the grouping here; the grouping is
        recomputed from the tree given to `update`, so either form works there.
      train_cfg: `cfg.train` (`base_config.py`): optimizer, lr, min_lr, warmup_steps, cooldown_steps,
        lr_schedule, betas, eps, weight_decay, muon_*, grad_clip, skip_nonfinite_grads, skip_first_step.
      max_steps: S, the number of optimiser steps of the run (schedules and the Muon wd decay).

    `update(grads, state, params)` needs `params`. With `skip_nonfinite_grads=False` a non-finite
    gradient is applied as is (the official trainer stops instead): the trainer must check the norm.
    """
    cfg = train_cfg
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {cfg.optimizer!r}")
    if cfg.lr <= 0:
        raise ConfigError(f"lr must be positive (the Muon LR is schedule · muon_lr / lr), got {cfg.lr}")
    if cfg.optimizer == "muon_adamw" and MUON not in jax.tree.leaves(param_groups(params)):
        raise ValueError("muon_adamw: no parameter falls in the Muon group (spec §7.3 grouping)")

    lr = schedules.lr_schedule(
        cfg.lr_schedule, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.cooldown_steps, max_steps
    )
    muon_scale = cfg.muon_lr / cfg.lr  # Muon groups have base_lr = muon_lr / lr

    def muon_lr(step):
        return lr(step) * muon_scale

    b1, b2 = cfg.betas

    def step_transform(learning_rate, muon_learning_rate, muon_momentum, muon_weight_decay):
        # eps_root = 0: optax's Adam is m̂ / (√v̂ + ε), eps outside the square root as in the spec.
        adamw = optax.adamw(learning_rate, b1=b1, b2=b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
        if cfg.optimizer == "adamw":
            per_group = adamw
        else:
            matrices = muon(
                muon_learning_rate,
                muon_momentum,
                muon_weight_decay,
                ns_steps=cfg.muon_ns_steps,
                beta2=cfg.muon_beta2,
                ortho_dtype=cfg.get("muon_ortho_dtype", None),
            )
            per_group = optax.partition({MUON: matrices, ADAMW: adamw}, param_groups)
        tx = per_group
        if cfg.grad_clip > 0:
            tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), per_group)
        if cfg.skip_nonfinite_grads:  # skip every non-finite step, however many in a row
            tx = optax.apply_if_finite(tx, max_consecutive_errors=jnp.iinfo(jnp.int32).max)
        if cfg.skip_first_step:  # the official trainer never applies its first step (τ_opt = 0)
            tx = optax.transforms.conditionally_mask(tx, lambda step: step > 0)
        return tx

    return optax.inject_hyperparams(step_transform)(
        learning_rate=lr,
        muon_learning_rate=muon_lr,
        muon_momentum=schedules.muon_momentum_schedule(
            cfg.muon_momentum_warmup_start, cfg.muon_momentum, cfg.muon_momentum_warmup_steps
        ),
        muon_weight_decay=schedules.muon_weight_decay_schedule(cfg.muon_wd, max_steps),
    )


def optimizer_metrics(opt_state) -> dict[str, jax.Array]:
    """Scalars to log after `update`: the values used by the step just taken, and the counters.

    lr / muon_lr / muon_momentum / muon_wd: the scheduled hyperparameters of that step;
    optimizer_step: τ_opt after the step (steps taken, skipped ones included);
    skipped_nonfinite_steps: total steps skipped for non-finite gradients (0 if skipping is off).
    """
    hp = opt_state.hyperparams
    skipped = optax.tree.get(opt_state, "total_notfinite", default=jnp.zeros([], jnp.int32))
    return {
        "lr": hp["learning_rate"],
        "muon_lr": hp["muon_learning_rate"],
        "muon_momentum": hp["muon_momentum"],
        "muon_wd": hp["muon_weight_decay"],
        "optimizer_step": opt_state.count,
        "skipped_nonfinite_steps": skipped,
    }
