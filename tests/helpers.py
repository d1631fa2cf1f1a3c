"""Shared test utilities: fixture loading and tiny model configs."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from parcae_jax import presets
from parcae_jax.config import ModelConfig

REFERENCE = pathlib.Path(__file__).parent / "fixtures" / "reference"
CASES = ["parcae_diag", "parcae_linear", "parcae_gqa_ve", "gpt_baseline"]


def case_dir(case: str) -> pathlib.Path:
    return REFERENCE / case


def case_config(case: str, **overrides) -> ModelConfig:
    with open(case_dir(case) / "config.json") as f:
        d = json.load(f)
    return ModelConfig.from_dict({**d, "compute_dtype": "float32", **overrides})


def case_meta(case: str) -> dict:
    with open(case_dir(case) / "meta.json") as f:
        return json.load(f)


def load_npy(case: str, name: str) -> np.ndarray:
    return np.load(case_dir(case) / name)


def tiny_parcae(**overrides) -> ModelConfig:
    """A very small Parcae with every 140M architecture choice (VE, qk-norm, prelude norm, ...)."""
    d = presets.released("parcae-small-140m")
    d.update(
        block_size=32,
        vocab_size=64,
        padding_multiple=64,
        n_embd=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        recurrent_embedding_dimension=32,
        recurrent_intermediation_embedding_dimension=64,
        n_layers_in_prelude=1,
        n_layers_in_recurrent_block=2,
        n_layers_in_coda=1,
        mean_recurrence=4,
        mean_backprop_depth=2,
        compute_dtype="float32",
    )
    d.update(overrides)
    return ModelConfig.from_dict(d)
