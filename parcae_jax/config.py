"""Model configuration: every field of the official `Config`/`ParcaeConfig`/`GPTConfig`, same names,
types, defaults and meanings (PARCAE_SPEC §3, §11.3), plus a few JAX-only execution fields; and the
one mapping between these classes and a model folder's `config.json` (official or native).

The classes mirror the official hierarchy: `ModelConfig` declares the base `Config` fields (and the
JAX fields), `ParcaeConfig` and `GPTConfig` add their own. Each architecture therefore has exactly
its official fields, so a field of the other architecture is refused at construction (and a GPT
run config cannot carry a Parcae-only placeholder). Instances are frozen and hashable: they are
static arguments of jitted code and `functools.cache` keys. `ModelConfig.from_dict` builds the
right class from a plain dict (a run config's `model`, an official `config.json`), refusing unknown
keys with the list of valid ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import typing
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

from parcae_jax.errors import ConfigError, NotFoundError

INJECTION_TYPES = ("diagonal", "linear", "add")
STATE_INITS = ("normal", "embed", "like-init", "zero", "unit")
NORM_CLASSES = ("RMSNorm", "LayerNorm")
MLP_CLASSES = ("BaseMLP", "GatedMLP")
# `attention_impl` values (parcae_jax/attention.py runs them). What can be checked without knowing the
# platform is checked here: splash tiles T in multiples of 128 (the TPU lane width); cuDNN flash
# attention takes half-precision inputs and head dims that are multiples of 8, at most 256 (Hopper).
# `splash-interpret` runs the splash kernel through the Pallas interpreter on any platform (slow): for
# checking the kernel against `xla` off TPU.
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash", "splash-interpret")
SPLASH_BLOCK_MULTIPLE = 128
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 256
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
# `config.json` of a native parcae-jax folder carries "format": NATIVE_FORMAT; an official one does not.
NATIVE_FORMAT = "parcae-jax"


class FrozenDict(Mapping):
    """Read-only, hashable dict for the dict-valued official fields (`rope_settings`, `hf_config`),
    so a config holding them stays hashable while `cfg.rope_settings["rope_base"]` reads as before."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any] = ()):
        self._data = {k: _freeze(v) for k, v in dict(data).items()}

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        # Not cached: a cached string hash would be stale in a process that unpickles the config.
        return hash(frozenset(self._data.items()))

    def __repr__(self) -> str:
        return f"FrozenDict({self._data!r})"


def _freeze(v):
    if isinstance(v, Mapping):
        return FrozenDict(v)
    if isinstance(v, list | tuple):
        return tuple(_freeze(x) for x in v)
    return v


def _thaw(v):
    """Plain JSON-like values back (dicts and lists), as `to_dict` has always returned them."""
    if isinstance(v, FrozenDict):
        return {k: _thaw(x) for k, x in v.items()}
    if isinstance(v, tuple):
        return [_thaw(x) for x in v]
    return v


def _jax(default) -> Any:
    """A JAX-only execution field: part of `to_dict` (native folders, checkpoints), never written to
    an official `config.json`."""
    return dataclasses.field(default=default, metadata={"official": False})


DEFAULT_ROPE_SETTINGS = FrozenDict({"use_rope": True, "rope_condense_ratio": 1, "rope_base": 50000})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The official base `Config` fields (in `dataclasses.asdict` order) and the JAX fields.

    Abstract: build a `ParcaeConfig` or `GPTConfig` (directly or with `from_dict`)."""

    arch: ClassVar[str]  # "parcae" or "gpt"; `to_dict` stores it so a dict names its class

    name: str = ""
    hf_config: Mapping[str, Any] = FrozenDict()
    block_size: int = 4096
    n_embd: int = 4096
    intermediate_size: int | None = None
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    vocab_size: int = 50254
    padding_multiple: int = 512
    padded_vocab_size: int | None = None
    rope_settings: Mapping[str, Any] = DEFAULT_ROPE_SETTINGS
    use_abacus: bool = False
    randomize_positions_from: int | None = None
    block_class_name: str = "TransformerPreNormBlock"
    norm_class_name: str = "LayerNorm"
    attn_impl: str = "flash"
    norm_eps: float = 1e-5
    mlp_class_name: str = "BaseMLP"
    nonlin_name: str = "GELU"
    bias: bool = False
    qk_bias: bool = False
    init_strategy: str = "scaled"
    init_orthogonal: bool = False
    skip_initialization: bool = False
    mup_model_scaling_factor: int = 1
    use_fused_head: str | None = "pytorch"
    debias_attention: bool = False
    center_attention: bool = False
    clip_qkv: float | None = None
    qk_norm: bool = False
    logit_softcap: float | None = None
    activation_checkpoint_impl: str = "per-block"
    simple_ops: bool = False
    strategy: str = "single"

    compute_dtype: str = _jax("bfloat16")  # matmul/activation dtype; params stay in param_dtype
    param_dtype: str = _jax("float32")
    remat: bool = _jax(False)  # activation checkpointing, with the policy `activation_checkpoint_impl`
    attention_impl: str = _jax("auto")  # ATTENTION_IMPLS (parcae_jax/attention.py)

    def __post_init__(self):
        if type(self) is ModelConfig:
            raise TypeError("ModelConfig is abstract: build a ParcaeConfig or a GPTConfig, or use from_dict")
        # A partial `rope_settings` keeps the official defaults for the keys it omits.
        object.__setattr__(self, "rope_settings", FrozenDict({**DEFAULT_ROPE_SETTINGS, **self.rope_settings}))
        object.__setattr__(self, "hf_config", FrozenDict(self.hf_config))
        if self.attention_impl is None:  # the spelling of `auto` in configs written before it existed
            object.__setattr__(self, "attention_impl", "auto")
        self.validate()

    # ---- construction and serialisation -----------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """The config a dict describes; its class comes from `arch`, else `_class_name`, else `cls`
        (Parcae when called on `ModelConfig`)."""
        d = dict(d)
        class_name = d.pop("_class_name", None)
        arch = d.pop("arch", None)
        if arch is None:
            by_name = {c.__name__: a for a, c in ARCHS.items()}
            arch = by_name.get(class_name, "parcae" if cls is ModelConfig else cls.arch)
        config_cls = _config_class(arch)
        if class_name is not None and class_name != config_cls.__name__:
            raise ConfigError(f"config says _class_name={class_name!r} but arch={arch!r}")
        if cls is not ModelConfig and cls is not config_cls:
            raise ConfigError(f"{cls.__name__}.from_dict got a config of arch {arch!r}")
        valid = field_names(arch) + ["arch"]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise KeyError(
                f"unknown model config field(s) {unknown} for arch {arch!r}. Valid fields: {sorted(valid)}"
            )
        return config_cls(**d)

    @classmethod
    def from_json(cls, path) -> ModelConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def replace(self, **updates) -> ModelConfig:
        return type(self).from_dict({**self.to_dict(), **updates})

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain values: the official ones in order, then `arch` and the JAX ones."""
        official = {k: _thaw(getattr(self, k)) for k in official_fields(self.arch)}
        jax_fields = {f.name: getattr(self, f.name) for f in _jax_fields(type(self))}
        return {**official, "arch": self.arch, **jax_fields}

    def to_official_dict(self) -> dict[str, Any]:
        """The official `config.json` content: every official field in order, plus `_class_name`."""
        return {k: _thaw(getattr(self, k)) for k in official_fields(self.arch)} | {
            "_class_name": type(self).__name__
        }

    # ---- validation -----------------------------------------------------------------------------
    def _check(self, cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(f"invalid model config ({self.name or self.arch}): {msg}")

    def validate(self) -> None:
        """Refuse what the port cannot do as the official code does (messages carry the values)."""
        check = self._check
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
        self._validate_attention()
        if self.randomize_positions_from is not None:
            check(self.randomize_positions_from >= self.block_size,
                  f"randomize_positions_from {self.randomize_positions_from} is smaller than block_size "
                  f"{self.block_size}; it must be at least block_size")

    def _validate_attention(self) -> None:
        """The platform-independent limits of `attention_impl` (the platform is checked at trace time)."""
        check, impl = self._check, self.attention_impl
        check(impl in ATTENTION_IMPLS, f"attention_impl {impl!r} is not one of {ATTENTION_IMPLS}")
        other = "attention_impl='auto' (or 'xla')"
        if impl in ("splash", "splash-interpret"):
            check(self.block_size % SPLASH_BLOCK_MULTIPLE == 0,
                  f"attention_impl {impl!r} needs block_size a multiple of {SPLASH_BLOCK_MULTIPLE}, got "
                  f"{self.block_size}; change block_size or set {other}")
        if impl == "cudnn":
            check(self.compute_dtype in CUDNN_DTYPES,
                  f"attention_impl 'cudnn' needs compute_dtype bfloat16 or float16, got "
                  f"{self.compute_dtype!r}; set compute_dtype='bfloat16' or {other}")
            check(self.head_size % 8 == 0 and self.head_size <= CUDNN_MAX_HEAD_DIM,
                  f"attention_impl 'cudnn' needs a head dim that is a multiple of 8 and at most "
                  f"{CUDNN_MAX_HEAD_DIM}, got {self.head_size}; set {other}")

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

    def ve_table_indices(self) -> list[int]:
        return [i for i in range(self.n_effective_layers) if self.has_ve_table(i)]


@dataclasses.dataclass(frozen=True)
class ParcaeConfig(ModelConfig):
    """The official `ParcaeConfig`: the base fields (one default changed) plus the recurrence fields."""

    arch: ClassVar[str] = "parcae"

    # Redeclared for its Parcae default; a redeclared field keeps its base position (official order).
    activation_checkpoint_impl: str = "per-iteration"
    injection_type: str = "diagonal"
    n_layers_in_recurrent_block: int = 4
    n_layers_in_prelude: int = 1
    n_layers_in_coda: int = 1
    state_init: str = "like-init"
    recurrent_embedding_dimension: int = 1024
    recurrent_intermediation_embedding_dimension: int = 3520
    recurrent_num_attention_heads: int | None = None
    prelude_norm: bool = False
    sampling_scheme: str = "poisson-truncated-full"
    mean_recurrence: int = 32
    mean_backprop_depth: int = 8
    lockstep_n: bool = False
    lockstep_k: bool = False
    curriculum_target: str = "forward"
    recurrent_iteration_method: str = "per-batch"
    tie_embeddings: bool = False
    model_class_name: str = "Parcae"
    _is_recurrent_block_config: bool = False

    def validate(self) -> None:
        super().validate()
        check = self._check
        check(self.injection_type in INJECTION_TYPES,
              f"injection_type {self.injection_type!r} is not one of {INJECTION_TYPES}")
        check(self.state_init in STATE_INITS,
              f"state_init {self.state_init!r} is not one of {STATE_INITS}")
        check(self.rec_head_size == self.head_size,
              f"core head dim {self.rec_head_size} must equal the main head dim {self.head_size}")
        # The core has no GQA (its kv heads are its heads) but reads the main config's value-embedding
        # tables, sized n_kv_heads x head dim: the official code needs the two widths equal (spec §3.2).
        ve_core = [t for t, layer in zip(self.ve_tables()["core_block"], self.layer_ids()["core_block"],
                                         strict=True) if self.has_ve_table(t) and self.has_ve_gate(layer)]
        kv_width = self.n_kv_heads * self.head_size
        check(not ve_core or self.rec_heads * self.rec_head_size == kv_width,
              f"value embeddings reach core layers {ve_core}, whose kv width "
              f"{self.rec_heads * self.rec_head_size} (recurrent heads x head dim) differs from the value "
              f"embeddings' {kv_width} (num_key_value_heads x head dim); use num_key_value_heads = "
              f"{self.rec_heads}, or set recurrent_num_attention_heads so the widths match")
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
        """The official derived `n_layer = R * k̄` (VE-gate rule)."""
        return self.n_core * self.mean_backprop_depth

    @property
    def n_effective_layers(self) -> int:
        """`L_eff`, the number of unique blocks (value-embedding table rule, spec §2.6)."""
        return self.n_prelude + self.n_core + self.n_coda

    def layer_ids(self) -> dict[str, list[int]]:
        """Attention layer ids (VE-gate rule) per stage. Coda ids follow the official `P + R*r̄ + i`."""
        P, R = self.n_prelude, self.n_core
        return {
            "prelude": list(range(P)),
            "core_block": [P + j for j in range(R)],
            "coda": [P + R * self.mean_recurrence + i for i in range(self.n_coda)],
        }

    def ve_tables(self) -> dict[str, list[int]]:
        """Index of the value-embedding table each stage's layers read (spec §2.6)."""
        P, R = self.n_prelude, self.n_core
        return {
            "prelude": list(range(P)),
            "core_block": [P + j for j in range(R)],
            "coda": [P + R + i for i in range(self.n_coda)],
        }


@dataclasses.dataclass(frozen=True)
class GPTConfig(ModelConfig):
    """The official `GPTConfig`: the base fields plus a layer count."""

    arch: ClassVar[str] = "gpt"

    n_layer: int = 16
    tie_embeddings: bool = False

    @property
    def derived_n_layer(self) -> int:
        return self.n_layer

    @property
    def n_effective_layers(self) -> int:
        return self.n_layer

    def layer_ids(self) -> dict[str, list[int]]:
        return {"h": list(range(self.n_layer))}

    def ve_tables(self) -> dict[str, list[int]]:
        return {"h": list(range(self.n_layer))}


ARCHS: dict[str, type[ModelConfig]] = {"parcae": ParcaeConfig, "gpt": GPTConfig}
CLASS_NAMES = {arch: c.__name__ for arch, c in ARCHS.items()}


def _config_class(arch: str) -> type[ModelConfig]:
    if arch not in ARCHS:
        raise ConfigError(f"unknown model arch {arch!r}: expected 'parcae' or 'gpt'")
    return ARCHS[arch]


def _jax_fields(cls: type[ModelConfig]) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("official", True)]


def official_fields(arch: str) -> dict[str, Any]:
    """Official field names with their defaults, in the order `config.json` stores them."""
    fields = dataclasses.fields(_config_class(arch))
    return {f.name: f.default for f in fields if f.metadata.get("official", True)}


def field_names(arch: str) -> list[str]:
    """Every field of the arch (official and JAX), in declaration order."""
    return [f.name for f in dataclasses.fields(_config_class(arch))]


def field_types(arch: str) -> dict[str, Any]:
    """Each field's declared type (resolved: `int | None`, `Mapping[str, Any]`, ...)."""
    cls = _config_class(arch)
    hints = typing.get_type_hints(cls)
    return {name: hints[name] for name in field_names(arch)}


# ---- a model folder's config.json ------------------------------------------------------------------
def from_official_dict(d: Mapping[str, Any]) -> ModelConfig:
    """The config an official `config.json` describes (spec §11)."""
    d = dict(d)
    d.pop("init", None)  # written by the official evaluation wrapper, not a config field
    # An official folder computes in float32 unless asked otherwise, exactly as its converted copy.
    d.setdefault("compute_dtype", "float32")
    if "_class_name" not in d:
        # The official loader would default to GPTConfig here (spec §12.14); infer from the fields.
        d["_class_name"] = "ParcaeConfig" if "injection_type" in d else "GPTConfig"
    return ModelConfig.from_dict(d)


def read_folder_config(folder: str | os.PathLike) -> ModelConfig:
    """The config of a model folder: a native `config.json` (every field) or an official one."""
    cfg_file = pathlib.Path(folder) / "config.json"
    if not cfg_file.is_file():
        raise NotFoundError(f"{cfg_file} not found: a model folder needs a config.json")
    with open(cfg_file) as f:
        d = json.load(f)
    if d.pop("format", None) == NATIVE_FORMAT:
        return ModelConfig.from_dict(d)
    return from_official_dict(d)


def write_folder_config(cfg: ModelConfig, folder: str | os.PathLike, *, native: bool) -> None:
    """Write `folder/config.json`: native (every field, `format`, `_class_name`) or official."""
    if native:
        d = {"format": NATIVE_FORMAT, **cfg.to_dict(), "_class_name": type(cfg).__name__}
    else:
        d = cfg.to_official_dict()
    with open(pathlib.Path(folder) / "config.json", "w") as f:
        json.dump(d, f, indent=2)
