"""The eight released model configurations (PARCAE_SPEC §3.4-3.5), as official-field dicts."""

from __future__ import annotations

from typing import Any

_COMMON: dict[str, Any] = {
    "block_size": 2048,
    "vocab_size": 32768,
    "padding_multiple": 64,
    "bias": False,
    "tie_embeddings": True,
    "norm_class_name": "RMSNorm",
    "norm_eps": 1e-5,
    "mlp_class_name": "BaseMLP",
    "nonlin_name": "ReLU2",
    "qk_norm": True,
    "logit_softcap": None,
    "init_strategy": "scaled-zero",
    "init_orthogonal": True,
}

_PARCAE_COMMON: dict[str, Any] = {
    "prelude_norm": True,
    "injection_type": "diagonal",
    "state_init": "like-init",
    "mean_recurrence": 8,
    "mean_backprop_depth": 4,
    "sampling_scheme": "poisson-truncated-full",
    "recurrent_iteration_method": "per-sequence",
}

# name -> (d, heads, stage layers P=R=C for Parcae / n_layer for GPT)
_SIZES = {
    "small-140m": (768, 6, 2, 6),
    "medium-370m": (1024, 8, 4, 12),
    "large-770m": (1280, 10, 6, 18),
    "xlarge-1_3b": (1536, 12, 8, 24),
}

# Official registry names and their aliases (spec §3.4).
ALIASES = {"gpt-medium-380m": "gpt-medium-370m", "gpt-xlarge-1_6b": "gpt-xlarge-1_3b"}


def released(name: str) -> dict[str, Any]:
    """Official-field dict (with `arch`) of a released config, e.g. 'parcae-small-140m'."""
    name = ALIASES.get(name, name)
    arch, _, size = name.partition("-")
    if arch not in ("parcae", "gpt") or size not in _SIZES:
        valid = [f"{a}-{s}" for a in ("parcae", "gpt") for s in _SIZES] + sorted(ALIASES)
        raise KeyError(f"unknown released config {name!r}; valid names: {valid}")
    d, heads, stage, n_layer = _SIZES[size]
    cfg = dict(_COMMON, arch=arch, name=name, hf_config={"org": "SandyResearch", "name": name})
    cfg.update(n_embd=d, num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=4 * d)
    if arch == "parcae":
        cfg.update(_PARCAE_COMMON)
        cfg.update(
            n_layers_in_prelude=stage,
            n_layers_in_recurrent_block=stage,
            n_layers_in_coda=stage,
            recurrent_embedding_dimension=d,
            recurrent_intermediation_embedding_dimension=4 * d,
        )
    else:
        cfg["n_layer"] = n_layer
    return cfg


RELEASED = [f"{a}-{s}" for a in ("parcae", "gpt") for s in _SIZES]
