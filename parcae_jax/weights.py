"""Official state-dict keys ↔ our parameter tree (PARCAE_SPEC §11), on NumPy arrays (no torch).

Our paths are the NNX state paths (`prelude/0/attn/c_q/kernel`); official keys are the PyTorch names
(`transformer.prelude.0.attn.c_q.weight`). Linear kernels transpose (`(in, out)` ↔ `(out, in)`).
"""

from __future__ import annotations

from collections import OrderedDict

import jax
import numpy as np
from flax import nnx

from parcae_jax.config import ModelConfig
from parcae_jax.errors import UserError

# Wrapper prefixes that training frameworks add to key names (DDP, torch.compile, Lightning, HF).
_STRIP_PREFIXES = ("module.", "_orig_mod.", "_forward_module.", "model.")
ROPE_KEY = "freqs_cis"
# Parameter order inside one block, as the official modules register them.
_BLOCK_ORDER = [
    "norm_1",
    "attn.c_q",
    "attn.c_k",
    "attn.c_v",
    "attn.c_proj",
    "attn.ve_gate",
    "attn.qk_bias",
    "norm_2",
    "mlp.fc",
    "mlp.proj",
]


class WeightsError(UserError, ValueError):
    """A checkpoint that does not fit the model: names the key(s) and the shapes."""


def _is_untied_fused_gpt_head(cfg: ModelConfig) -> bool:
    # An untied GPT with the fused head stores lm_head transposed, (d, V) (spec §11.2).
    return cfg.arch == "gpt" and not cfg.tie_embeddings and bool(cfg.use_fused_head)


def official_key(path: tuple, cfg: ModelConfig) -> tuple[str, bool]:
    """(official key, transpose?) for one of our parameter paths."""
    parts = [str(p) for p in path]
    leaf = parts[-1]
    mods = parts[:-1]
    if leaf == "kernel":
        name, transpose = "weight", True
    elif leaf in ("scale", "embedding"):
        name, transpose = "weight", False
    else:  # bias, A_log, dt_bias, B, qk_bias
        name, transpose = leaf, False
    if mods and mods[0] == "lm_head" and _is_untied_fused_gpt_head(cfg):
        transpose = False
    if not mods:  # adapter-level raw parameters never sit at the root
        raise WeightsError(f"unexpected root parameter {path}")
    prefix = [] if mods[0] in ("value_embeds", "lm_head") else ["transformer"]
    return ".".join(prefix + mods + [name]), transpose


def _sort_key(key: str, cfg: ModelConfig):
    """Official `state_dict()` order (spec §11.1)."""
    stages = ["wte", "prelude", "h", "adapter", "core_block", "C", "coda", "ln_f", "ln_prelude"]
    parts = key.split(".")
    if parts[0] == ROPE_KEY:
        return (0,)
    if parts[0] == "value_embeds":
        return (2, int(parts[1]))
    if parts[0] == "lm_head":
        return (3,)
    stage = parts[1]
    rank = stages.index(stage) if stage in stages else len(stages)
    if stage in ("prelude", "core_block", "coda", "h"):
        sub = ".".join(parts[3:-1])
        pos = _BLOCK_ORDER.index(sub) if sub in _BLOCK_ORDER else len(_BLOCK_ORDER)
        return (1, rank, int(parts[2]), pos, parts[-1] != "weight")
    return (1, rank, 0, 0, parts[-1] not in ("weight", "A_log"), parts[-1] == "B")


def model_arrays(model: nnx.Module) -> dict[tuple, np.ndarray]:
    """Our parameters as {path: fp32 numpy array}."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {tuple(p): np.asarray(jax.device_get(v[...])) for p, v in flat}


def rope_table_numpy(cfg: ModelConfig) -> np.ndarray:
    """`freqs_cis` (1, L, 1, D_h/2, 2) fp32. The converter prefers the torch-computed table (bit-exact)."""
    d = cfg.head_size
    inv = 1.0 / (np.float32(cfg.rope_base) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))
    pos = np.arange(cfg.rope_table_length, dtype=np.float32) / np.float32(cfg.rope_condense_ratio)
    ang = np.outer(pos, inv.astype(np.float32)).astype(np.float32)
    return np.stack([np.cos(ang), np.sin(ang)], -1)[None, :, None].astype(np.float32)


def to_official(model: nnx.Module, extra: dict[str, np.ndarray] | None = None, rope=None) -> OrderedDict:
    """Official state dict (numpy), in official order. Tied models list `lm_head.weight` as the very
    same array object as `transformer.wte.weight`, so a torch writer can keep storage shared."""
    cfg: ModelConfig = model.config
    out: dict[str, np.ndarray] = {ROPE_KEY: rope if rope is not None else rope_table_numpy(cfg)}
    for path, arr in model_arrays(model).items():
        key, transpose = official_key(path, cfg)
        out[key] = np.ascontiguousarray(arr.T if transpose else arr)
    for key, arr in (extra or {}).items():
        out.setdefault(key, arr)
    if "lm_head.weight" not in out and (cfg.arch == "parcae" or bool(cfg.use_fused_head)):
        out["lm_head.weight"] = out["transformer.wte.weight"]  # tied: shared storage
    elif "lm_head.weight" not in out:
        out["lm_head.weight"] = out["transformer.wte.weight"].copy()  # unused nn.Linear (fused head off)
    return OrderedDict(sorted(out.items(), key=lambda kv: _sort_key(kv[0], cfg)))


def clean_keys(state: dict) -> dict:
    cleaned = {}
    for key, value in state.items():
        k = key
        stripped = True
        while stripped:
            stripped = False
            for p in _STRIP_PREFIXES:
                if k.startswith(p):
                    k, stripped = k[len(p) :], True
        cleaned[k] = value
    return cleaned


def load_official(model: nnx.Module, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Fill `model` in place from an official state dict. Strict: every parameter must be present
    with the right shape; keys the model does not use are returned (e.g. GPT's unused `lm_head`),
    so an export can reproduce the file exactly. Raises `WeightsError` naming keys and shapes."""
    cfg: ModelConfig = model.config
    state = clean_keys(state)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    wanted = {}
    for path, var in flat:
        key, transpose = official_key(tuple(path), cfg)
        wanted[key] = (path, var, transpose)
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise WeightsError(
            f"checkpoint is missing {len(missing)} parameter(s) the model needs, e.g. {missing[:5]}; "
            "is the config (layer counts, injection_type, value embeddings, tie_embeddings) the one the "
            "checkpoint was trained with?"
        )
    updates, mismatches = {}, []
    for key in sorted(wanted, key=lambda k: _sort_key(k, cfg)):
        path, var, transpose = wanted[key]
        arr = np.asarray(state[key], dtype=np.float32)
        arr = arr.T if transpose else arr
        expected = tuple(var[...].shape)
        if tuple(arr.shape) != expected:
            shown = tuple(reversed(expected)) if transpose else expected
            mismatches.append(f"{key!r}: checkpoint has {tuple(state[key].shape)}, the model expects {shown}")
        updates[tuple(path)] = arr
    if mismatches:
        raise WeightsError(
            f"shape mismatch in {len(mismatches)} parameter(s): "
            + "; ".join(mismatches[:3])
            + "; check n_embd/heads/intermediate sizes/vocab in the config"
        )
    extra = {k: np.asarray(v) for k, v in state.items() if k not in wanted and k != ROPE_KEY}
    tied_head = "lm_head.weight" in extra and np.array_equal(
        extra["lm_head.weight"], state["transformer.wte.weight"]
    )
    if tied_head and (cfg.arch == "parcae" or bool(cfg.use_fused_head)):
        extra.pop("lm_head.weight")
    allowed_extra = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unknown = sorted(set(extra) - allowed_extra)
    if unknown:
        raise WeightsError(
            f"checkpoint has {len(unknown)} key(s) the model does not have, e.g. {unknown[:5]}; "
            "the config does not match the checkpoint"
        )
    set_arrays(model, updates)
    return extra


def set_arrays(model: nnx.Module, arrays: dict[tuple, np.ndarray]) -> None:
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    for path, arr in arrays.items():
        var = flat[path]
        var[...] = jax.numpy.asarray(arr, dtype=var[...].dtype)
    nnx.update(model, state)
