"""`ModelConfig`: declared typed fields per arch, refusal of the other arch's fields, the official
`config.json` round trip, hashability, and the run config's `model` section derived from the class."""

import dataclasses
import json
import pathlib

import ml_collections
import pytest

from parcae_jax import base_config, presets
from parcae_jax.config import (
    GPTConfig,
    ModelConfig,
    ParcaeConfig,
    field_types,
    from_official_dict,
    official_fields,
    read_folder_config,
    write_folder_config,
)
from parcae_jax.errors import ConfigError

REFERENCE = pathlib.Path(__file__).parent / "fixtures" / "reference"
FOLDERS = sorted(p.parent for p in REFERENCE.glob("*/config.json"))


def test_fields_are_declared_and_typed():
    parcae = {f.name: f for f in dataclasses.fields(ParcaeConfig)}
    gpt = {f.name: f for f in dataclasses.fields(GPTConfig)}
    assert {"n_embd", "rope_settings", "mean_recurrence", "compute_dtype"} <= set(parcae)
    assert "n_layer" in gpt and "mean_recurrence" not in gpt and "n_layer" not in parcae
    assert field_types("parcae")["recurrent_num_attention_heads"] == int | None
    assert field_types("gpt")["n_layer"] is int
    # The Parcae default of the redeclared base field, at its base position (official order).
    assert parcae["activation_checkpoint_impl"].default == "per-iteration"
    assert gpt["activation_checkpoint_impl"].default == "per-block"
    assert list(official_fields("parcae")).index("activation_checkpoint_impl") < list(
        official_fields("parcae")).index("injection_type")


def test_gpt_refuses_a_parcae_field():
    with pytest.raises(KeyError, match=r"\['mean_recurrence'\] for arch 'gpt'. Valid fields: .*'n_layer'"):
        ModelConfig.from_dict(dict(presets.released("gpt-small-140m"), mean_recurrence=4))
    with pytest.raises(KeyError, match=r"\['n_layer'\] for arch 'parcae'"):
        ModelConfig.from_dict(dict(presets.released("parcae-small-140m"), n_layer=4))
    with pytest.raises(TypeError):
        GPTConfig(mean_recurrence=4)


def test_run_config_model_section_has_only_the_arch_fields():
    gpt = base_config.base(presets.released("gpt-small-140m"))
    assert set(gpt.model) == set(ModelConfig.from_dict(presets.released("gpt-small-140m")).to_dict())
    assert "recurrent_num_attention_heads" not in gpt.model
    parcae = base_config.base(presets.released("parcae-small-140m"))
    parcae.model.recurrent_num_attention_heads = 6  # typed although None
    with pytest.raises(TypeError):
        parcae.model.recurrent_num_attention_heads = "six"
    assert ModelConfig.from_dict(parcae.model.to_dict()).rec_heads == 6


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_official_round_trip(folder, tmp_path):
    official = json.loads((folder / "config.json").read_text())
    cfg = from_official_dict(official)
    assert cfg.to_official_dict() == official
    assert list(cfg.to_official_dict()) == list(official)
    assert read_folder_config(folder) == cfg
    for native in (True, False):
        write_folder_config(cfg, tmp_path, native=native)
        assert read_folder_config(tmp_path) == cfg


def test_hashable_and_equal():
    a = ModelConfig.from_dict(presets.released("parcae-small-140m"))
    b = ModelConfig.from_dict(presets.released("parcae-small-140m"))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    c = a.replace(rope_settings={"rope_base": 10000})
    assert c != a and c.rope_base == 10000 and c.rope_settings["use_rope"]
    assert type(c.to_dict()["rope_settings"]) is dict and type(c.to_dict()["hf_config"]) is dict
    assert ModelConfig.from_dict(c.to_dict()) == c
    assert isinstance(ml_collections.ConfigDict(c.to_dict()).rope_settings, ml_collections.ConfigDict)


def test_value_embeddings_in_the_core_need_matching_kv_widths():
    """The core has no GQA but reads the main value-embedding tables: a GQA main config whose core
    layers get value embeddings is refused (the official code cannot build it either)."""
    from helpers import tiny_parcae

    with pytest.raises(ConfigError, match="value embeddings reach core layers"):
        tiny_parcae(num_attention_heads=4, num_key_value_heads=2)
