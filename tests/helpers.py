"""Shared test utilities: fixture loading and tiny model configs."""

from __future__ import annotations

import functools
import json
import pathlib
import sys

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


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test subprocess faking `devices` CPU devices (compiling as fast as the suite does)."""
    from conftest import FAST_COMPILE_FLAGS

    return f"{FAST_COMPILE_FLAGS} --xla_force_host_platform_device_count={devices}"


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


def perturbed(model, scale: float = 0.05):
    """Randomise the zero-initialised output projections (in place) so every block changes its input."""
    import jax
    from flax import nnx

    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(7), 1000))
    nnx.update(model, jax.tree.map(lambda v: v + scale * jax.random.normal(next(keys), v.shape), state))
    return model


@functools.cache
def tiny_parcae_model(**overrides):
    """A built, perturbed `tiny_parcae(**overrides)` (seed 1), one per process: tests only read it."""
    from parcae_jax.model import build_model

    return perturbed(build_model(tiny_parcae(**overrides), seed=1))


@functools.cache
def tiny_gpt_model():
    """A built, perturbed tiny GPT baseline (GQA: 1 kv head, seed 2), one per process: tests only read it."""
    from parcae_jax.model import build_model

    d = presets.released("gpt-small-140m")
    d.update(block_size=32, vocab_size=64, padding_multiple=64, n_embd=32, num_attention_heads=2,
             num_key_value_heads=1, intermediate_size=64, n_layer=3, compute_dtype="float32")
    return perturbed(build_model(ModelConfig.from_dict(d), seed=2))


def write_token_dataset(path, *, vocab_size: int = 256, docs: int = 200, val_docs: int = 20, seed: int = 0):
    """A small prepared dataset (shards + metadata.json) of learnable synthetic documents.

    Each document follows a fixed random transition table with 10% noise, so a model can learn it
    (loss well below log(vocab)) while the unigram distribution stays nearly uniform.
    """
    from parcae_jax import fileio
    from parcae_jax.data import shards

    rng = np.random.default_rng(seed)
    table = rng.integers(3, vocab_size, size=vocab_size)
    dtype = shards.token_dtype(vocab_size)

    def document():
        n = int(rng.integers(20, 120))
        out = np.empty(n, np.int64)
        out[0] = rng.integers(3, vocab_size)
        for i in range(1, n):
            out[i] = table[out[i - 1]] if rng.random() > 0.1 else rng.integers(3, vocab_size)
        return out

    splits = {}
    for split, count in (("train", docs), ("val", val_docs)):
        documents = [document() for _ in range(count)]
        half = len(documents) // 2 if split == "train" else len(documents)
        groups = [documents[:half], documents[half:]] if split == "train" else [documents]
        for i, group in enumerate(groups):
            shards.write_shard(str(path), split, i, group, dtype)
        splits[split] = {
            "shards": len(groups),
            "tokens": int(sum(len(d) for d in documents)),
            "documents": len(documents),
        }
    meta = {
        "format": shards.FORMAT,
        "tokenizer": {"fingerprint": "synthetic", "kind": "synthetic", "vocab_size": vocab_size,
                      "bos_id": 1, "eos_id": 2, "pad_id": 0, "path": ""},
        "dtype": dtype.name,
        "splits": splits,
        "source": "synthetic",
        "val_fraction": val_docs / (docs + val_docs),
        "command": "tests/helpers.py",
        "created": "test",
    }
    fileio.write_json_atomic(shards.join(str(path), "metadata.json"), meta, sort_keys=True)
    return str(path)


def run_cli(main, argv: list[str], monkeypatch) -> int | str | None:
    """A command-line entry point `main(argv)` (absl app) run in process: its exit code, None for
    success (a str is what the process would print before exiting with status 1).

    sys.argv is set to `argv`: ml_collections' config flag reads its `--config.x=y` overrides from it.
    The override flags a previous run defined are removed first: config_flags defines them anew at each
    parse and refuses to define one twice."""
    from absl import flags

    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
        delattr(flags.FLAGS, name)
    monkeypatch.setattr(sys, "argv", list(argv))
    try:
        main(list(argv))
    except SystemExit as e:
        return e.code
    raise AssertionError(f"{argv[0]} returned without exiting")


def hf_tokenizer(folder):
    """A 300-piece byte-level BPE `tokenizer.json` in `folder` (fits a model of vocabulary >= 300)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat", "abc def ghi"] * 20, trainer)
    tok.save(str(pathlib.Path(folder) / "tokenizer.json"))
    return str(folder)
