"""Checkpoint conversion: official folder -> parcae-jax -> official reproduces model.pt exactly."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CASES, case_dir, load_npy

torch = pytest.importorskip("torch")

from parcae_jax import convert, load_pretrained, pretrained  # noqa: E402
from parcae_jax.weights import WeightsError  # noqa: E402


@pytest.mark.parametrize("case", CASES)
def test_round_trip_reproduces_official_files(case, tmp_path):
    src = case_dir(case)
    assert convert.main(["from-torch", str(src), str(tmp_path / "jax")]) == 0
    assert convert.main(["to-torch", str(tmp_path / "jax"), str(tmp_path / "pt")]) == 0
    original = torch.load(src / "model.pt", map_location="cpu", weights_only=True)
    exported = torch.load(tmp_path / "pt" / "model.pt", map_location="cpu", weights_only=True)
    assert list(exported) == list(original)  # same keys, same order
    for key, ref in original.items():
        got = exported[key]
        assert got.dtype == ref.dtype and got.shape == ref.shape, key
        assert torch.equal(got, ref), key
    # Tied tensors keep sharing storage, as torch.save stores the official model.
    ptr = lambda sd, k: sd[k].untyped_storage().data_ptr()  # noqa: E731
    for a, b in [("lm_head.weight", "transformer.wte.weight")]:
        assert (ptr(exported, a) == ptr(exported, b)) == (ptr(original, a) == ptr(original, b))
    with open(src / "config.json") as f:
        assert json.load(f) == json.load(open(tmp_path / "pt" / "config.json"))
    from safetensors.numpy import load_file

    st = load_file(str(tmp_path / "pt" / "model.safetensors"))
    assert set(st) == set(original)
    for key, ref in original.items():
        np.testing.assert_array_equal(st[key], ref.numpy())


def test_load_pretrained_accepts_both_formats(tmp_path):
    case = "parcae_diag"
    convert.from_torch(case_dir(case), tmp_path / "jax")
    ids = jnp.asarray(load_npy(case, "input_ids.npy"))
    h0 = jnp.asarray(load_npy(case, "init_state.npy"))
    expected = load_npy(case, "logits_R04.npy")
    for path in (case_dir(case), tmp_path / "jax"):
        model = load_pretrained(path, compute_dtype="float32")
        got = np.asarray(model(ids, num_steps=4, initial_state=h0))
        assert np.abs(got - expected).max() <= 1e-4


def test_official_safetensors_folder_loads(tmp_path):
    case = "gpt_baseline"
    convert.to_torch(convert.from_torch(case_dir(case), tmp_path / "jax"), tmp_path / "pt")
    only_st = tmp_path / "st"
    only_st.mkdir()
    shutil.copy(tmp_path / "pt" / "config.json", only_st)
    shutil.copy(tmp_path / "pt" / "model.safetensors", only_st)
    model = load_pretrained(only_st, compute_dtype="float32")
    ids = jnp.asarray(load_npy(case, "input_ids.npy"))
    assert np.abs(np.asarray(model(ids)) - load_npy(case, "logits.npy")).max() <= 1e-4


def _copy_case(case, dst):
    shutil.copytree(case_dir(case), dst)
    return dst


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    src = _copy_case("parcae_diag", tmp_path / "bad")
    cfg = json.load(open(src / "config.json"))
    cfg["intermediate_size"] = 96
    json.dump(cfg, open(src / "config.json", "w"))
    with pytest.raises(WeightsError, match=r"prelude\.0\.mlp\.fc\.weight.*\(128, 64\).*\(96, 64\)"):
        load_pretrained(src)
    assert convert.main(["from-torch", str(src), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()  # nothing partial written


def test_missing_and_extra_keys_are_named(tmp_path):
    src = _copy_case("parcae_diag", tmp_path / "bad")
    sd = torch.load(src / "model.pt", weights_only=True)
    sd.pop("transformer.adapter.B")
    torch.save(sd, src / "model.pt")
    with pytest.raises(WeightsError, match="transformer.adapter.B"):
        load_pretrained(src)
    sd = torch.load(case_dir("parcae_diag") / "model.pt", weights_only=True)
    sd["transformer.prelude.0.attn.extra.weight"] = torch.zeros(2)
    torch.save(sd, src / "model.pt")
    with pytest.raises(WeightsError, match="extra.weight"):
        load_pretrained(src)


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    assert convert.main(["from-torch", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    shutil.copy(case_dir("parcae_diag") / "config.json", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="model.pt"):
        load_pretrained(tmp_path / "empty")
    json.dump({"_class_name": "ParcaeConfig", "n_embdd": 3}, open(tmp_path / "empty" / "config.json", "w"))
    with pytest.raises(KeyError, match="n_embdd.*Valid fields"):
        load_pretrained(tmp_path / "empty")
    out = convert.from_torch(case_dir("gpt_baseline"), tmp_path / "exists")
    with pytest.raises(FileExistsError):
        convert.from_torch(case_dir("gpt_baseline"), out)
    assert pretrained.is_native(out)
