"""Model configuration: every field of the official `Config`/`ParcaeConfig`/`GPTConfig`, same names
and meanings (PARCAE_SPEC §3), plus a few JAX-only execution fields.

`ModelConfig` is a frozen dataclass so it can be a static (hashable) argument of jitted code. It is
built from a plain dict (a config file's `config.model`, or an official `config.json`) by
`ModelConfig.from_dict`, which rejects unknown keys with the list of valid ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

# Fields of the official base `Config`, in `dataclasses.asdict` order (spec §11.3).
_BASE_FIELDS: dict[str, Any] = {
    "name": "",
    "hf_config": {},
    "block_size": 4096,
    "n_embd": 4096,
    "intermediate_size": None,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "vocab_size": 50254,
    "padding_multiple": 512,
    "padded_vocab_size": None,
    "rope_settings": {"use_rope": True, "rope_condense_ratio": 1, "rope_base": 50000},
    "use_abacus": False,
    "randomize_positions_from": None,
    "block_class_name": "TransformerPreNormBlock",
    "norm_class_name": "LayerNorm",
    "attn_impl": "flash",
    "norm_eps": 1e-5,
    "mlp_class_name": "BaseMLP",
    "nonlin_name": "GELU",
    "bias": False,
    "qk_bias": False,
    "init_strategy": "scaled",
    "init_orthogonal": False,
    "skip_initialization": False,
    "mup_model_scaling_factor": 1,
    "use_fused_head": "pytorch",
    "debias_attention": False,
    "center_attention": False,
    "clip_qkv": None,
    "qk_norm": False,
    "logit_softcap": None,
    "activation_checkpoint_impl": "per-block",
    "simple_ops": False,
    "strategy": "single",
}

# Fields `ParcaeConfig` adds (and defaults it changes), in order.
_PARCAE_FIELDS: dict[str, Any] = {
    "injection_type": "diagonal",
    "n_layers_in_recurrent_block": 4,
    "n_layers_in_prelude": 1,
    "n_layers_in_coda": 1,
    "state_init": "like-init",
    "recurrent_embedding_dimension": 1024,
    "recurrent_intermediation_embedding_dimension": 3520,
    "recurrent_num_attention_heads": None,
    "prelude_norm": False,
    "sampling_scheme": "poisson-truncated-full",
    "mean_recurrence": 32,
    "mean_backprop_depth": 8,
    "lockstep_n": False,
    "lockstep_k": False,
    "curriculum_target": "forward",
    "recurrent_iteration_method": "per-batch",
    "tie_embeddings": False,
    "model_class_name": "Parcae",
    "_is_recurrent_block_config": False,
}
_PARCAE_DEFAULT_OVERRIDES = {"activation_checkpoint_impl": "per-iteration"}

_GPT_FIELDS: dict[str, Any] = {"n_layer": 16, "tie_embeddings": False}

# JAX-only execution fields: never written to an official config.json.
_JAX_FIELDS: dict[str, Any] = {
    "arch": "parcae",  # "parcae" (ParcaeConfig) or "gpt" (GPTConfig)
    "compute_dtype": "bfloat16",  # matmul/activation dtype; params stay in param_dtype
    "param_dtype": "float32",
    "remat": False,  # activation checkpointing, with the policy `activation_checkpoint_impl`
    "attention_impl": None,  # jax.nn.dot_product_attention implementation: None, "xla", "cudnn"
}

CLASS_NAMES = {"parcae": "ParcaeConfig", "gpt": "GPTConfig"}
INJECTION_TYPES = ("diagonal", "linear", "add")
STATE_INITS = ("normal", "embed", "like-init", "zero", "unit")
NORM_CLASSES = ("RMSNorm", "LayerNorm")
MLP_CLASSES = ("BaseMLP", "GatedMLP")
# Official depth-sampling vocabulary (spec §5.2-5.4): a scheme names one of these (substring test, in
# this order), optionally followed by `-curriculum-L` / `-curriculum-sqrt-L`.
SAMPLING_SCHEMES = (
    "poisson-unbounded",
    "poisson-fill",
    "poisson-truncated-full",
    "poisson-full",
    "poisson-bounded",
    "fixed",
)
ITERATION_METHODS = ("per-batch", "per-sequence", "per-token")
CURRICULUM_TARGETS = ("forward", "backward", "both")
# All compute the same mean cross-entropy; official GPT folders may store None.
FUSED_HEADS = (None, "pytorch", "cce", "hhe", "full-triton")
VE_GATE_CHANNELS = 32  # the value-embedding gate reads the first 32 channels of the block input


def official_fields(arch: str) -> dict[str, Any]:
    """Official field names with their defaults, in the order `config.json` stores them."""
    if arch == "parcae":
        fields = dict(_BASE_FIELDS) | _PARCAE_DEFAULT_OVERRIDES
        fields.update(_PARCAE_FIELDS)
    elif arch == "gpt":
        fields = dict(_BASE_FIELDS)
        fields.update(_GPT_FIELDS)
    else:
        raise ValueError(f"unknown model arch {arch!r}: expected 'parcae' or 'gpt'")
    return fields


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """All model fields. Dict-valued official fields are stored as sorted item tuples (hashable)."""

    values: tuple[tuple[str, Any], ...]

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        class_name = d.pop("_class_name", None)
        arch = d.pop("arch", None)
        if arch is None:
            arch = {"ParcaeConfig": "parcae", "GPTConfig": "gpt"}.get(class_name, "parcae")
        if class_name is not None and CLASS_NAMES[arch] != class_name:
            raise ValueError(f"config says _class_name={class_name!r} but arch={arch!r}")
        fields = official_fields(arch) | _JAX_FIELDS
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise KeyError(
                f"unknown model config field(s) {unknown} for arch {arch!r}. Valid fields: {sorted(fields)}"
            )
        merged = {**fields, **d, "arch": arch}
        if isinstance(merged["rope_settings"], dict):
            merged["rope_settings"] = {**_BASE_FIELDS["rope_settings"], **merged["rope_settings"]}
        cfg = cls(tuple((k, _freeze(v)) for k, v in merged.items()))
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, path) -> ModelConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def replace(self, **updates) -> ModelConfig:
        return ModelConfig.from_dict({**self.to_dict(), **updates})

    def to_dict(self) -> dict[str, Any]:
        return {k: _thaw(v) for k, v in self.values}

    def to_official_dict(self) -> dict[str, Any]:
        """The official `config.json` content: every official field in order, plus `_class_name`."""
        d = self.to_dict()
        out = {k: d[k] for k in official_fields(self.arch)}
        out["_class_name"] = CLASS_NAMES[self.arch]
        return out

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        for k, v in object.__getattribute__(self, "values"):
            if k == name:
                return _thaw(v) if isinstance(v, tuple) and name in ("rope_settings", "hf_config") else v
        raise AttributeError(f"ModelConfig has no field {name!r}")

    # ---- validation -----------------------------------------------------------------------------
    def validate(self) -> None:
        """Refuse what the port cannot do as the official code does (messages carry the values)."""
        def check(cond, msg):
            if not cond:
                raise ValueError(f"invalid model config ({self.name or self.arch}): {msg}")

        check(self.n_embd % self.num_attention_heads == 0,
              f"n_embd {self.n_embd} is not divisible by num_attention_heads {self.num_attention_heads}")
        check(self.num_attention_heads % self.n_kv_heads == 0,
              f"num_key_value_heads {self.n_kv_heads} does not divide num_attention_heads "
              f"{self.num_attention_heads}")
        check(self.norm_class_name in NORM_CLASSES,
              f"norm_class_name {self.norm_class_name!r} is not one of {NORM_CLASSES}")
        check(self.mlp_class_name in MLP_CLASSES,
              f"mlp_class_name {self.mlp_class_name!r} is not one of {MLP_CLASSES}")
        check(self.block_class_name == "TransformerPreNormBlock",
              f"block_class_name {self.block_class_name!r}: only TransformerPreNormBlock exists")
        check(self.mup_model_scaling_factor == 1,
              f"mup_model_scaling_factor {self.mup_model_scaling_factor} is not supported (only 1)")
        check(not self.skip_initialization,
              "skip_initialization=True leaves PyTorch's default initialisation, which is not reproduced; "
              "set it to False")
        check(self.use_fused_head in FUSED_HEADS,
              f"use_fused_head {self.use_fused_head!r} is not one of {FUSED_HEADS}")
        check(self.compute_dtype in ("float32", "bfloat16", "float16"),
              f"compute_dtype {self.compute_dtype!r} is not float32, bfloat16 or float16")
        if self.randomize_positions_from is not None:
            check(self.randomize_positions_from >= self.block_size,
                  f"randomize_positions_from {self.randomize_positions_from} is smaller than block_size "
                  f"{self.block_size}; it must be at least block_size")
        if self.arch == "parcae":
            check(self.injection_type in INJECTION_TYPES,
                  f"injection_type {self.injection_type!r} is not one of {INJECTION_TYPES}")
            check(self.state_init in STATE_INITS,
                  f"state_init {self.state_init!r} is not one of {STATE_INITS}")
            check(self.rec_head_size == self.head_size,
                  f"core head dim {self.rec_head_size} must equal the main head dim {self.head_size}")
            if self.injection_type == "add":
                check(self.d_rec == self.n_embd,
                      f"injection_type='add' needs recurrent_embedding_dimension {self.d_rec} == n_embd "
                      f"{self.n_embd}")
            check(self.mean_recurrence >= 1, f"mean_recurrence {self.mean_recurrence} must be >= 1")
            check(any(s in self.sampling_scheme for s in SAMPLING_SCHEMES),
                  f"sampling_scheme {self.sampling_scheme!r} names none of {SAMPLING_SCHEMES} (the official "
                  "code would silently fall back to poisson-unbounded)")
            check(self.recurrent_iteration_method in ITERATION_METHODS,
                  f"recurrent_iteration_method {self.recurrent_iteration_method!r} is not one of "
                  f"{ITERATION_METHODS}")
            check(self.curriculum_target in CURRICULUM_TARGETS,
                  f"curriculum_target {self.curriculum_target!r} is not one of {CURRICULUM_TARGETS}")

    # ---- derived values (spec §3) -----------------------------------------------------------------
    @property
    def padded_vocab(self) -> int:
        if self.padded_vocab_size is not None:
            return int(self.padded_vocab_size)
        m = self.padding_multiple
        return int(math.ceil(self.vocab_size / m) * m)

    @property
    def head_size(self) -> int:
        return self.n_embd // self.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def mlp_hidden(self) -> int:
        return self.intermediate_size or 4 * self.n_embd

    @property
    def d_rec(self) -> int:
        return self.recurrent_embedding_dimension

    @property
    def rec_heads(self) -> int:
        return self.recurrent_num_attention_heads or self.num_attention_heads

    @property
    def rec_head_size(self) -> int:
        return self.d_rec // self.rec_heads

    @property
    def rec_mlp_hidden(self) -> int:
        return self.recurrent_intermediation_embedding_dimension

    @property
    def n_prelude(self) -> int:
        return self.n_layers_in_prelude

    @property
    def n_core(self) -> int:
        return self.n_layers_in_recurrent_block

    @property
    def n_coda(self) -> int:
        return self.n_layers_in_coda

    @property
    def derived_n_layer(self) -> int:
        """The official `n_layer`: GPT's layer count; for Parcae the derived `R * k̄` (VE-gate rule)."""
        if self.arch == "gpt":
            return self.n_layer
        return self.n_core * self.mean_backprop_depth

    @property
    def n_effective_layers(self) -> int:
        """`L_eff`, the number of unique blocks (value-embedding table rule, spec §2.6)."""
        if self.arch == "gpt":
            return self.n_layer
        return self.n_prelude + self.n_core + self.n_coda

    @property
    def rope_base(self) -> float:
        return self.rope_settings["rope_base"]

    @property
    def rope_condense_ratio(self) -> float:
        return self.rope_settings["rope_condense_ratio"]

    @property
    def use_rope(self) -> bool:
        return bool(self.rope_settings["use_rope"])

    @property
    def rope_table_length(self) -> int:
        return self.randomize_positions_from or self.block_size

    @property
    def embedding_std(self) -> float:
        """Init std of the token embedding under the main config (scaled-zero: sqrt(2/(5d)))."""
        return math.sqrt(2.0 / (5.0 * self.n_embd))

    @property
    def embedding_scale(self) -> float:
        # Only the `takase*` init strategies scale embeddings (by sqrt(d)); released configs use 1.
        return math.sqrt(self.n_embd) if self.init_strategy.startswith("takase") else 1.0

    # ---- value-embedding rules (spec §2.6: two independent rules, implemented literally) ---------
    def has_ve_table(self, effective_index: int) -> bool:
        return effective_index % 2 == (self.n_effective_layers - 1) % 2

    def has_ve_gate(self, layer_id: int) -> bool:
        return layer_id % 2 == (self.derived_n_layer - 1) % 2

    def layer_ids(self) -> dict[str, list[int]]:
        """Attention layer ids (VE-gate rule) per stage. Coda ids follow the official `P + R*r̄ + i`."""
        if self.arch == "gpt":
            return {"h": list(range(self.n_layer))}
        P, R = self.n_prelude, self.n_core
        return {
            "prelude": list(range(P)),
            "core_block": [P + j for j in range(R)],
            "coda": [P + R * self.mean_recurrence + i for i in range(self.n_coda)],
        }

    def ve_tables(self) -> dict[str, list[int]]:
        """Index of the value-embedding table each stage's layers read (spec §2.6)."""
        if self.arch == "gpt":
            return {"h": list(range(self.n_layer))}
        P, R = self.n_prelude, self.n_core
        return {
            "prelude": list(range(P)),
            "core_block": [P + j for j in range(R)],
            "coda": [P + R + i for i in range(self.n_coda)],
        }

    def ve_table_indices(self) -> list[int]:
        return [i for i in range(self.n_effective_layers) if self.has_ve_table(i)]


def _freeze(v):
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, list):
        return ("__list__", *(_freeze(x) for x in v))
    return v


def _thaw(v):
    if isinstance(v, tuple) and v and v[0] == "__list__":
        return [_thaw(x) for x in v[1:]]
    if isinstance(v, tuple) and all(isinstance(x, tuple) and len(x) == 2 for x in v):
        return {k: _thaw(x) for k, x in v}
    return v
