"""Parameter and FLOP accounting (PARCAE_SPEC §10), training budgets (§7.2) and peak FLOP/s for MFU.

Two FLOP counts per token, both for one training forward + backward:

* `flops_per_token` — the **official** cost formula of `scripts/cost.py`, used for FLOP budgets
  (`train.max_flops`) and the scaling-law FLOP axes. Per token, with `T = block_size`:

      GPT:     6·P_total + 3·n_layer·4dT
      Parcae:  6·P_nc + A_nc + 2·P_core·f + 4·P_core·b + A_core·f + 2·A_core·b
               A_nc = 3·(P + C_n)·4dT,  A_core = R·4·d_r·T

  `f` recurrences run forward, the last `b` of them also backward (budget: f = r̄, b = k̄). It counts
  every parameter as a matmul weight (value-embedding tables included), no causal halving of
  attention, and no head matmul for the tied head. Exact integers, equal to the verified figures.

* `hardware_flops_per_token` — what the accelerator executes, for **MFU**. Differences:
  causal attention is halved (2·width·T per layer forward); the head matmul 2·d·V (padded vocab) is
  counted, ×3 with backward; only matmul weights count (Linear kernels and the injection's `B`; the
  value-embedding and token-embedding lookups, norms and the diagonal injection's vectors do not);
  the diagonal injection's e·Bᵀ runs once per forward, not per recurrence (a linear injection's
  state half runs per recurrence); gradient-free recurrences run forward only; with `remat` on, the
  recomputed forward of the checkpointed part is added (only its attention under a `sac` policy).
  Defaults to the expected training split (f = t + s, b = s); pass the batch maxima actually run
  (`max n + max k`, `max k`) to count the masked compute the JAX loop really performs.

Parameter counts come from the real (shape-only) model, so they follow every config option.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import types
from collections.abc import Mapping

import jax
import ml_collections
from flax import nnx

from parcae_jax import errors, recurrence
from parcae_jax.cli_config import load_config, split_config_args
from parcae_jax.config import ModelConfig
from parcae_jax.errors import ConfigError
from parcae_jax.model import abstract_model

# ---------------------------------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------------------------------

# Leaf names of weights used in matmuls: Linear kernels and the diagonal injection's B (d_r × d).
_MATMUL_LEAVES = ("kernel", "B")


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    """Parameter counts in the §10 sense (the tied head is counted once, as `wte`)."""

    embedding: int  # P_emb: the token embedding `wte` only
    total: int  # P_total: all unique parameters − P_emb (value-embedding tables included)
    core: int  # P_core: the core (recurrent) blocks; 0 for GPT
    value_embeddings: int  # part of `total`
    matmul: Mapping[str, int]  # matmul weight entries per top-level module (hardware FLOPs)

    @property
    def non_core(self) -> int:  # P_nc
        return self.total - self.core

    @property
    def unique(self) -> int:  # what the checkpoint holds (spec §3.5 "total params")
        return self.total + self.embedding


def as_model_config(cfg) -> ModelConfig:
    """A `ModelConfig` from a ModelConfig, an official-field dict or a run config (its `model`)."""
    if isinstance(cfg, ModelConfig):
        return cfg
    if isinstance(cfg, ml_collections.ConfigDict):
        cfg = cfg.model.to_dict() if "model" in cfg else cfg.to_dict()
    return ModelConfig.from_dict(dict(cfg))


@functools.cache
def _param_counts(cfg: ModelConfig) -> ParamCounts:
    params = nnx.to_flat_state(nnx.state(abstract_model(cfg), nnx.Param))
    by_module: dict[str, int] = {}
    matmul: dict[str, int] = {}
    for path, var in params:
        size = math.prod(var.get_value().shape)
        top = str(path[0])
        by_module[top] = by_module.get(top, 0) + size
        if path[-1] in _MATMUL_LEAVES:
            matmul[top] = matmul.get(top, 0) + size
    embedding = by_module.get("wte", 0)
    return ParamCounts(
        embedding=embedding,
        total=sum(by_module.values()) - embedding,
        core=by_module.get("core_block", 0),
        value_embeddings=by_module.get("value_embeds", 0),
        matmul=types.MappingProxyType(matmul),  # read-only: the counts are cached per config
    )


def param_counts(cfg) -> ParamCounts:
    """Parameter counts of a model config (ModelConfig, official-field dict or run config)."""
    return _param_counts(as_model_config(cfg))


# ---------------------------------------------------------------------------------------------------
# Official cost formula (spec §10)
# ---------------------------------------------------------------------------------------------------


def expected_split(cfg, step: int | None = None) -> tuple[int, int]:
    """(t, s) = (max(r̄ − k̄, 0), k̄): the expected gradient-free and gradient recurrences per step
    (spec §5.1), after any curriculum in `sampling_scheme` when `step` is given. (0, 0) for GPT.
    The trainer's cumulative FLOP counter adds `flops_per_token(cfg, f=t + s, b=s)` per token."""
    cfg = as_model_config(cfg)
    if cfg.arch == "gpt":
        return 0, 0
    if step is None or "curriculum" not in cfg.sampling_scheme:
        return max(cfg.mean_recurrence - cfg.mean_backprop_depth, 0), cfg.mean_backprop_depth
    t, s = recurrence.targets(cfg, step)  # the curriculum rule lives with the depth sampler
    return int(t), int(s)  # curriculum targets are whole numbers (ceil)


def training_flops_per_token(cfg, step: int | None = None, seq_len: int | None = None) -> int:
    """Official FLOPs/token at the expected split of `step`: f = t + s, b = s."""
    t, s = expected_split(cfg, step)
    return flops_per_token(cfg, f=t + s, b=s, seq_len=seq_len)


def _attention_widths(cfg: ModelConfig) -> tuple[int, int]:
    """(H·D_h of the main blocks, H_r·D_h of the core blocks): what attention's two matmuls span."""
    main = cfg.num_attention_heads * cfg.head_size
    core = cfg.rec_heads * cfg.rec_head_size if cfg.arch == "parcae" else 0
    return main, core


def flops_per_token(cfg, f: int | None = None, b: int | None = None, seq_len: int | None = None) -> int:
    """Official training FLOPs per token (spec §10; see the module docstring).

    f: recurrences run forward (default r̄); b: of which backpropagated (default k̄); seq_len: the
    attention length T (default block_size). GPT ignores f and b. Exact for integer arguments.
    """
    cfg = as_model_config(cfg)
    T = cfg.block_size if seq_len is None else seq_len
    p = param_counts(cfg)
    width, core_width = _attention_widths(cfg)
    attn = 4 * width * T  # one layer's attention forward: QKᵀ and AV, 2·width·T each, no causal halving
    if cfg.arch == "gpt":
        return 6 * p.total + 3 * cfg.n_layer * attn
    f = cfg.mean_recurrence if f is None else f
    b = cfg.mean_backprop_depth if b is None else b
    a_core = cfg.n_core * 4 * core_width * T
    a_nc = 3 * (cfg.n_prelude + cfg.n_coda) * attn
    return 6 * p.non_core + a_nc + 2 * p.core * f + 4 * p.core * b + a_core * f + 2 * a_core * b


# ---------------------------------------------------------------------------------------------------
# Hardware FLOPs (MFU)
# ---------------------------------------------------------------------------------------------------


def hardware_flops_per_token(
    cfg,
    f: int | None = None,
    b: int | None = None,
    seq_len: int | None = None,
    remat: bool | None = None,
) -> int:
    """FLOPs the hardware executes per training token (forward + backward), for MFU.

    See the module docstring for how it differs from `flops_per_token`. f/b default to the expected
    split (t + s, s); remat defaults to `cfg.remat`, with the policy `activation_checkpoint_impl`.
    """
    cfg = as_model_config(cfg)
    T = cfg.block_size if seq_len is None else seq_len
    remat = cfg.remat if remat is None else remat
    mm = param_counts(cfg).matmul
    width, core_width = _attention_widths(cfg)
    causal_attn = 2 * width * T  # per layer forward: 4·width·T halved by the causal mask
    head = 2 * cfg.n_embd * cfg.padded_vocab  # tied or untied, the logits matmul

    if cfg.arch == "gpt":
        blocks = 2 * mm.get("h", 0) + cfg.n_layer * causal_attn
        recompute = blocks if remat else 0  # GPT checkpoints every block, full recompute
        return 3 * (blocks + head) + recompute

    if f is None or b is None:
        t, s = expected_split(cfg)
        f = t + s if f is None else f
        b = s if b is None else b
    if not 0 <= b <= f:
        raise ValueError(f"need 0 <= b <= f (backpropagated steps among forward steps), got f={f}, b={b}")
    # A linear injection's state half (d_r × d_r) multiplies h every recurrence; its input half and
    # the diagonal injection's B act on e once per forward (`input_term`, outside the loop).
    state_mm = cfg.d_rec * cfg.d_rec if cfg.injection_type == "linear" else 0
    core_blocks = 2 * mm.get("core_block", 0) + cfg.n_core * 2 * core_width * T
    step = core_blocks + 2 * state_mm
    once_mm = sum(mm.values()) - mm.get("core_block", 0) - mm.get("lm_head", 0) - state_mm
    once = 2 * once_mm + (cfg.n_prelude + cfg.n_coda) * causal_attn + head

    total = 3 * once + (f - b) * step + 3 * b * step
    if remat:
        impl = cfg.activation_checkpoint_impl
        # A `sac` policy saves weight matmuls; attention's batched matmuls are still recomputed.
        core_attention_only = cfg.n_core * 2 * core_width * T
        if "per-iteration" in impl:
            total += b * (core_attention_only if "sac" in impl else step)
        if "per-block" in impl:  # (nested inside per-iteration, a block's forward runs a third time)
            total += b * (core_attention_only if "sac" in impl else core_blocks)
        if "in-coda" in impl:  # coda blocks, full recompute
            total += 2 * mm.get("coda", 0) + cfg.n_coda * causal_attn
    return total


# ---------------------------------------------------------------------------------------------------
# Training budget (spec §7.2, §10)
# ---------------------------------------------------------------------------------------------------

STOP_CRITERIA = ("max_steps", "max_tokens", "max_flops", "tokens_per_param")
PARAM_COUNT_BASES = ("unique", "non_embedding")  # what train.tokens_per_param multiplies


@dataclasses.dataclass(frozen=True)
class Budget:
    criterion: str  # the `train.*` field that set the budget
    tokens: int  # token budget (before rounding down to whole steps)
    steps: int  # optimiser steps
    tokens_per_step: int  # world_batch_size × block_size
    flops_per_token: int  # official, at f = r̄, b = k̄

    @property
    def trained_tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def total_flops(self) -> int:
        return self.trained_tokens * self.flops_per_token


def training_budget(cfg_run: ml_collections.ConfigDict) -> Budget:
    """Tokens and optimiser steps of a run config; exactly one `train` stop criterion must be set.

    max_tokens: as given; max_flops: ⌊max_flops / FLOPs-per-token⌋ (official formula, f = r̄, b = k̄);
    tokens_per_param: ratio × every unique parameter (the official `token_to_param_ratio`), or
    × P_total (non-embedding, value embeddings included) with train.tokens_per_param_counts='non_embedding';
    max_steps: steps × tokens per step. Steps = tokens // (world_batch_size × block_size), the
    official `(max_tokens // world_size) // (micro_batch · block_size · accumulation)` (nested floor
    divisions of positive integers equal one floor division).
    """
    cfg = as_model_config(cfg_run)
    train = cfg_run.train
    chosen = [name for name in STOP_CRITERIA if train.get(name) is not None]
    if len(chosen) > 1:
        values = ", ".join(f"train.{name}={train[name]}" for name in chosen)
        clear = " ".join(f"--config.train.{name}=None" for name in chosen[:-1])
        raise ConfigError(
            f"two stop criteria are set ({values}); the config file may set one already: keep one and "
            f"clear the others with =None (e.g. {clear})"
        )
    if not chosen:
        raise ConfigError(f"no stop criterion: set one of train.{{{', '.join(STOP_CRITERIA)}}}")
    criterion = chosen[0]
    value = train[criterion]
    tokens_per_step = int(train.world_batch_size) * cfg.block_size
    if tokens_per_step <= 0:
        raise ConfigError(f"train.world_batch_size must be positive, got {train.world_batch_size}")
    fpt = flops_per_token(cfg)
    if criterion == "max_steps":
        steps = int(value)
        tokens = steps * tokens_per_step
    else:
        if criterion == "max_tokens":
            tokens = int(value)
        elif criterion == "max_flops":
            tokens = int(value) // fpt  # FLOP budgets are whole numbers (1e18 is exact in a float)
        else:
            counts = param_counts(cfg)
            base = train.tokens_per_param_counts
            if base not in PARAM_COUNT_BASES:
                raise ConfigError(
                    f"train.tokens_per_param_counts={base!r}: use 'unique' (official) or 'non_embedding'"
                )
            tokens = int(value * (counts.unique if base == "unique" else counts.total))
        steps = tokens // tokens_per_step
    if steps <= 0:
        raise ConfigError(
            f"train.{criterion}={value} gives {tokens} tokens: less than one step of {tokens_per_step}"
        )
    return Budget(criterion, tokens, steps, tokens_per_step, fpt)


# ---------------------------------------------------------------------------------------------------
# Peak FLOP/s (MFU denominators)
# ---------------------------------------------------------------------------------------------------

# Dense bf16 FLOP/s per device. TPUs by exact `device_kind` ("TPU v5" is v5p, "lite" is the e chip).
_TPU_PEAK = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5": 459e12,
    "tpu v5p": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
}
# NVIDIA kinds look like "NVIDIA H100 80GB HBM3" (SXM) or "NVIDIA A100-SXM4-40GB": first substring wins.
_GPU_PEAK = (
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),
    ("h200", 989e12),
    ("a100", 312e12),
)


def peak_flops_per_device(device=None) -> float | None:
    """Peak dense bf16 FLOP/s of a device (a `jax.Device`, a `device_kind` string, or the first local
    device); None for a CPU or an unknown accelerator (MFU reported as n/a)."""
    if device is None:
        device = jax.devices()[0]
    if not isinstance(device, str):
        if device.platform == "cpu":
            return None
        device = device.device_kind
    kind = " ".join(device.lower().split())
    if kind in _TPU_PEAK:
        return _TPU_PEAK[kind]
    if kind.startswith("tpu"):
        return None
    for pattern, peak in _GPU_PEAK:
        if pattern in kind:
            return peak
    return None


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def _row(label: str, value) -> str:
    text = f"{value:,}" if isinstance(value, int) else str(value)
    return f"  {label:<44} {text:>26}"


def report(cfg_run: ml_collections.ConfigDict) -> str:
    """The CLI's table: parameters, FLOPs/token (official and hardware), budget, peak FLOP/s."""
    cfg = as_model_config(cfg_run)
    p = param_counts(cfg)
    lines = [f"{cfg.name or cfg.arch} ({cfg.arch}), block_size {cfg.block_size}"]
    lines += ["Parameters", _row("embedding (wte)", p.embedding)]
    if cfg.arch == "parcae":
        lines += [_row("core blocks (P_core)", p.core), _row("non-core (P_nc)", p.non_core)]
    lines += [
        _row("value-embedding tables (part of P_total)", p.value_embeddings),
        _row("total, non-embedding (P_total)", p.total),
        _row("unique, with embedding", p.unique),
        "FLOPs per token (training, forward + backward)",
    ]
    if cfg.arch == "parcae":
        t, s = expected_split(cfg)
        lines += [
            _row(
                f"official (f=r̄={cfg.mean_recurrence}, b=k̄={cfg.mean_backprop_depth})", flops_per_token(cfg)
            ),
            _row(f"official at the expected split (t={t}, s={s})", training_flops_per_token(cfg)),
            _row(
                f"hardware (t={t}, s={s}, remat={'on' if cfg.remat else 'off'})",
                hardware_flops_per_token(cfg),
            ),
        ]
    else:
        lines += [
            _row("official", flops_per_token(cfg)),
            _row(f"hardware (remat={'on' if cfg.remat else 'off'})", hardware_flops_per_token(cfg)),
        ]
    lines.append("Training budget")
    try:
        budget = training_budget(cfg_run)
    except ValueError as e:
        lines.append(f"  n/a: {e}")
    else:
        value = cfg_run.train[budget.criterion]
        lines += [
            _row(
                f"criterion train.{budget.criterion}",
                f"{value:,}" if isinstance(value, int) else f"{value:g}",
            ),
            _row(
                f"tokens per step ({cfg_run.train.world_batch_size} × {cfg.block_size})",
                budget.tokens_per_step,
            ),
            _row("token budget", budget.tokens),
            _row("optimiser steps", budget.steps),
            _row("tokens trained (whole steps)", budget.trained_tokens),
            _row("total FLOPs (official)", f"{budget.total_flops:.4e}"),
            _row("total FLOPs (hardware)", f"{budget.trained_tokens * hardware_flops_per_token(cfg):.4e}"),
        ]
    device = jax.devices()[0]
    peak = peak_flops_per_device(device)
    lines += [
        "Peak bf16 FLOP/s per device",
        _row(device.device_kind, "n/a" if peak is None else f"{peak:.4g}"),
    ]
    return "\n".join(lines)


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path, overrides, rest = split_config_args(argv)
    parser = argparse.ArgumentParser(
        prog="python -m parcae_jax.flops",
        description="Parameters, FLOPs per token and training budget of a run config. "
        "Usage: --config configs/x.py[:arg] [--config.a.b=value ...] (value None clears a field).",
    )
    parser.parse_args(rest)  # only --help; anything else is an error
    if path is None:
        parser.error("--config is required")
    print(report(load_config(path, overrides)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default sys.argv[1:]) in the error boundary; its exit status."""
    return errors.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
