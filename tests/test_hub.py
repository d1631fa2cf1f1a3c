"""Hub interop, offline: a Hugging Face cache built here from the parity fixtures stands in for the Hub.

No test reaches the network: offline mode is on, and the one upload test replaces `HfApi`.
"""

from __future__ import annotations

import shutil

import huggingface_hub
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import case_dir, load_npy
from huggingface_hub import constants as hub_constants

from parcae_jax import convert, hub, loading
from parcae_jax.errors import UserError
from parcae_jax.pretrained import load_pretrained

REPO = "SandyResearch/parcae-tiny-diag"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hub cache holding REPO (the official-format `parcae_diag` fixture) at revision main, offline."""
    cache = tmp_path / "hf_cache"
    repo = cache / f"models--{REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.pt"):
        shutil.copy(case_dir("parcae_diag") / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snapshot


def _logits(model):
    ids = jnp.asarray(load_npy("parcae_diag", "input_ids.npy"))
    h0 = jnp.asarray(load_npy("parcae_diag", "init_state.npy"))
    return np.asarray(model(ids, num_steps=4, initial_state=h0))


def test_official_model_loads_by_name_from_the_offline_cache(hub_cache):
    expected = load_npy("parcae_diag", "logits_R04.npy")
    by_name = load_pretrained(REPO, compute_dtype="float32")
    by_url = loading.load_model(f"hf://{REPO}", compute_dtype="float32")
    folder = load_pretrained(case_dir("parcae_diag"), compute_dtype="float32")
    assert by_url.kind == "official"
    assert by_name.config == folder.config == by_url.model.config
    for model in (by_name, by_url.model):
        got = _logits(model)
        assert np.abs(got - expected).max() <= 1e-4
        np.testing.assert_array_equal(got, _logits(folder))


def test_a_revision_and_a_missing_repository_are_one_line_errors(hub_cache):
    assert load_pretrained(f"{REPO}@{COMMIT}", compute_dtype="float32").config.n_embd == 64
    with pytest.raises(UserError, match="not in the Hub cache"):
        loading.load_model("hf://SandyResearch/not-there")
    with pytest.raises(UserError, match="not a Hub model name"):
        loading.load_model("hf://no-slash")


def test_convert_from_the_hub_and_push_to_the_hub(hub_cache, tmp_path, monkeypatch, capsys):
    assert convert.main(["from-torch", f"hf://{REPO}", str(tmp_path / "jax")]) == 0
    expected = load_npy("parcae_diag", "logits_R04.npy")
    converted = load_pretrained(tmp_path / "jax", compute_dtype="float32")
    assert np.abs(_logits(converted) - expected).max() <= 1e-4

    pushed = {}

    class FakeApi:
        def create_repo(self, repo_id, private=False, exist_ok=False):
            pushed["repo"] = (repo_id, private, exist_ok)
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, commit_message):
            pushed["files"] = sorted(p.name for p in __import__("pathlib").Path(folder_path).iterdir())

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    code = convert.main(["to-torch", str(tmp_path / "jax"), str(tmp_path / "pt"), "--push-to-hub", "me/tiny"])
    assert code == 0, capsys.readouterr().err
    assert pushed["repo"] == ("me/tiny", False, True)
    assert pushed["files"] == sorted(p.name for p in (tmp_path / "pt").iterdir())
    assert "config.json" in pushed["files"]


def test_hub_names_are_parsed_strictly():
    assert hub.parse("hf://a/b@v1") == ("a/b", "v1")
    assert hub.parse("hf://a/b") == ("a/b", None)
    assert not hub.looks_like_repo_id("./a")
    with pytest.raises(UserError):
        hub.parse("hf://a/b/c")


def test_an_official_hub_model_without_tokenizer_files_uses_the_official_tokenizer(hub_cache):
    tokenizer_repo = hub_cache.parents[2] / f"models--{hub.OFFICIAL_TOKENIZER_REPO.replace('/', '--')}"
    (tokenizer_repo / "snapshots" / COMMIT).mkdir(parents=True)
    (tokenizer_repo / "snapshots" / COMMIT / "tokenizer.json").write_text("{}")
    (tokenizer_repo / "refs").mkdir()
    (tokenizer_repo / "refs" / "main").write_text(COMMIT)
    loaded = loading.load_model(f"hf://{REPO}", compute_dtype="float32")
    assert loading.find_tokenizer(loaded) == str(tokenizer_repo / "snapshots" / COMMIT)
    assert loading.find_tokenizer(loaded, "mine") == "mine"
