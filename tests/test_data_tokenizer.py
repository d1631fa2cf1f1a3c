"""Tokenizers: lossless round trips, special ids, batch == single, byte lengths, loading, errors."""

import hashlib
import json
import os
import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from parcae_jax.data import sources
from parcae_jax.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    load_tokenizer,
    main,
    train_tokenizer,
)

VOCAB = 400
_SETTINGS = settings(max_examples=200, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])

# Text that exercises what SentencePiece tends to rewrite: whitespace runs, newlines, control characters,
# its own space mark U+2581, combining marks, emoji and CJK outside the learned vocabulary.
_TRICKY = ["  ", "\n", "\n\n", "\t", "\r\n", "\x00", "\x1b", "\u2581", "\u2581\u2581 ", "e\u0301", "😀",
           "日本語", "👩‍👩‍👧", "\ufeff", " x", "x ", "12345", "'s", "\u00a0", "\U0010ffff"]
tricky_text = st.lists(st.one_of(st.sampled_from(_TRICKY), st.text(max_size=8)), max_size=12).map("".join)


def _corpus_lines() -> list[str]:
    scenes = sources.shakespeare_documents()[:25]
    return scenes + ["numbers 1234567890 and code:\n    for i in range(10):\n\tpass\n"] * 5


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for doc in _corpus_lines():
            f.write(json.dumps({"text": doc}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_file) -> tuple[SentencePieceTokenizer, str]:
    out = str(tmp_path_factory.mktemp("tok") / "tokenizer")
    tokenizer = train_tokenizer([corpus_file], VOCAB, out, log=lambda *_: None)
    return tokenizer, out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    """A tiny byte-level BPE tokenizer.json made with `tokenizers`, laid out like the official one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus_lines(), trainer)
    folder = tmp_path_factory.mktemp("hf")
    tok.save(str(folder / "tokenizer.json"))
    return str(folder)


# ---------------------------------------------------------------------------------------------------
# The trained SentencePiece tokenizer
# ---------------------------------------------------------------------------------------------------


@_SETTINGS
@given(text=st.one_of(st.text(), tricky_text))
@example(text="")
@example(text="Hello\u2581world  \n\n\tend")
@example(text="🙂 中文 한국어 العربية \x07\x7f")
def test_round_trip_any_unicode(trained, text):
    tokenizer, _ = trained
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids  # encode adds no specials


@_SETTINGS
@given(texts=st.lists(st.one_of(st.text(max_size=40), tricky_text), max_size=8))
def test_encode_batch_equals_single(trained, texts):
    tokenizer, _ = trained
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]


@_SETTINGS
@given(text=st.one_of(st.text(), tricky_text))
def test_token_byte_lengths_add_up_to_utf8_length(trained, text):
    tokenizer, _ = trained
    lengths = trained[0].token_byte_lengths()
    assert int(lengths[tokenizer.encode(text)].sum()) == len(text.encode())


def test_token_byte_lengths_table(trained):
    tokenizer, _ = trained
    lengths = tokenizer.token_byte_lengths()
    assert lengths.dtype == np.int32 and lengths.shape == (tokenizer.vocab_size,)
    assert lengths[[0, 1, 2, 3]].tolist() == [0, 0, 0, 0]  # pad, bos, eos, unk
    assert lengths[4] == 1  # "\n"
    the = tokenizer.encode(" the")
    assert len(the) == 1 and lengths[the[0]] == 4  # a learned piece with its leading space
    assert lengths.min() >= 0 and lengths[4:].min() >= 1


def test_special_ids_and_metadata(trained):
    tokenizer, out = trained
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert tokenizer.vocab_size == VOCAB
    with open(os.path.join(out, "tokenizer.json")) as f:
        meta = json.load(f)
    assert meta["kind"] == "sentencepiece"
    assert (meta["pad_id"], meta["bos_id"], meta["eos_id"], meta["unk_id"]) == (0, 1, 2, 3)
    assert meta["vocab_size"] == VOCAB
    with open(os.path.join(out, "tokenizer.model"), "rb") as f:
        assert meta["fingerprint"] == tokenizer.fingerprint == hashlib.sha256(f.read()).hexdigest()[:16]
    assert sorted(os.listdir(out)) == ["tokenizer.json", "tokenizer.model"]
    assert tokenizer.fingerprint in tokenizer.describe() and out in tokenizer.describe()
    # Newlines are a single learned token, not a byte-fallback token.
    assert tokenizer.encode("a\nb") == [tokenizer.encode("a")[0], 4, tokenizer.encode("b")[0]]


def test_training_is_deterministic(trained, corpus_file, tmp_path):
    tokenizer, _ = trained
    again = train_tokenizer([corpus_file], VOCAB, str(tmp_path / "again"), log=lambda *_: None)
    assert again.fingerprint == tokenizer.fingerprint


def test_load_tokenizer_accepts_folder_and_files(trained):
    tokenizer, out = trained
    for path in (out, os.path.join(out, "tokenizer.model"), os.path.join(out, "tokenizer.json")):
        loaded = load_tokenizer(path)
        assert isinstance(loaded, SentencePieceTokenizer)
        assert loaded.fingerprint == tokenizer.fingerprint
        assert loaded.encode("To be, or not") == tokenizer.encode("To be, or not")


def test_tokenizer_pickles_by_path(trained):
    tokenizer, _ = trained
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.encode("a \u2581 b") == tokenizer.encode("a \u2581 b")
    assert len(pickle.dumps(tokenizer)) < 1000  # the path, not the model


def test_sample_respects_max_chars(corpus_file, tmp_path):
    from parcae_jax.data.tokenizer import sample_documents

    docs, seen = sample_documents([corpus_file], max_chars=60_000)
    assert seen == len(_corpus_lines())
    assert 0 < sum(map(len, docs)) <= 60_000
    assert len(docs) < seen
    order = {d: i for i, d in reversed(list(enumerate(_corpus_lines())))}
    assert [order[d] for d in docs] == sorted(order[d] for d in docs)  # kept in input order
    assert sample_documents([corpus_file], max_chars=60_000) == (docs, seen)


# ---------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json
# ---------------------------------------------------------------------------------------------------


def test_hf_tokenizer_through_load_tokenizer(hf_dir):
    for path in (hf_dir, os.path.join(hf_dir, "tokenizer.json")):
        tok = load_tokenizer(path)
        assert isinstance(tok, HFTokenizer)
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
        text = "Thou art 日本 😀\n\n  x"
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.encode_batch([text, "", "b"]) == [ids, tok.encode(""), tok.encode("b")]
        lengths = tok.token_byte_lengths()
        assert lengths.shape == (tok.vocab_size,) and lengths[:3].tolist() == [0, 0, 0]
        assert int(lengths[ids].sum()) == len(text.encode())
        assert "huggingface" in tok.describe()
    assert pickle.loads(pickle.dumps(tok)).encode("abc") == tok.encode("abc")


def _save_hf(folder, special_tokens) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world"] * 10, trainer)
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    return str(folder / "tokenizer.json")


def test_hf_special_token_discovery(tmp_path):
    gpt2_style = load_tokenizer(_save_hf(tmp_path / "gpt2", ["<|endoftext|>"]))
    assert gpt2_style.bos_id == gpt2_style.eos_id == gpt2_style.pad_id == 0
    llama_style = load_tokenizer(_save_hf(tmp_path / "llama", ["<unk>", "<s>", "</s>"]))
    assert (llama_style.bos_id, llama_style.eos_id, llama_style.pad_id) == (1, 2, 2)
    # tokenizer_config.json next to the file names the specials explicitly.
    path = _save_hf(tmp_path / "configured", ["<a>", "<b>", "<c>"])
    with open(tmp_path / "configured" / "tokenizer_config.json", "w") as f:
        json.dump({"bos_token": {"content": "<b>"}, "eos_token": "<c>", "pad_token": "<a>"}, f)
    configured = load_tokenizer(path)
    assert (configured.bos_id, configured.eos_id, configured.pad_id) == (1, 2, 0)


def test_hf_without_specials_needs_explicit_ids(tmp_path):
    path = _save_hf(tmp_path / "bare", [])
    with pytest.raises(TokenizerError, match="bos_id"):
        load_tokenizer(path)
    tok = HFTokenizer(path, bos_id=5, eos_id=6)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (5, 6, 6)
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        HFTokenizer(path, bos_id=10**6, eos_id=6)


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------


def test_load_errors_name_the_path(tmp_path, trained):
    missing = tmp_path / "nope"
    with pytest.raises(TokenizerError, match=f"{missing}.*no such file"):
        load_tokenizer(str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerError, match=f"{empty}.*tokenizer.model"):
        load_tokenizer(str(empty))
    meta_only = tmp_path / "meta_only"
    meta_only.mkdir()
    with open(os.path.join(trained[1], "tokenizer.json")) as f:
        (meta_only / "tokenizer.json").write_text(f.read())
    with pytest.raises(TokenizerError, match="folder holds no usable tokenizer"):
        load_tokenizer(str(meta_only))
    garbage = tmp_path / "bad.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        load_tokenizer(str(garbage))
    other = tmp_path / "vocab.txt"
    other.write_text("a")
    with pytest.raises(TokenizerError, match="unknown tokenizer file type"):
        load_tokenizer(str(other))


def test_training_input_errors(tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(sources.SourceError, match="no file matches"):
        train_tokenizer([str(tmp_path / "missing.txt")], VOCAB, out)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(sources.SourceError, match="empty.txt: file is empty"):
        train_tokenizer([str(tmp_path / "empty.txt")], VOCAB, out)
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"text": ""}\n')
    with pytest.raises(TokenizerError, match="contain no text"):
        train_tokenizer([str(tmp_path / "blank.jsonl")], VOCAB, out, log=lambda *_: None)
    with pytest.raises(TokenizerError, match="too small"):
        train_tokenizer([str(tmp_path / "blank.jsonl")], 100, out)
    with pytest.raises(TokenizerError, match="no training input"):
        train_tokenizer([], VOCAB, out)
    assert not os.path.exists(out)


def test_failed_training_leaves_no_folder(tmp_path):
    (tmp_path / "tiny.txt").write_text("abc abc abc")
    out = tmp_path / "out"
    with pytest.raises(TokenizerError, match="SentencePiece training failed"):
        train_tokenizer([str(tmp_path / "tiny.txt")], 5000, str(out), log=lambda *_: None)
    assert os.listdir(tmp_path) == ["tiny.txt"]  # neither the output nor a temporary folder


def test_cli_trains_and_refuses_to_clobber(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("\n".join(sources.shakespeare_documents()[:3]))
    out = str(tmp_path / "cli")
    args = ["train", "--input", f"text:{tmp_path}/*.txt", "--vocab-size", "400", "--output", out]
    assert main(args) == 0
    assert isinstance(load_tokenizer(out), SentencePieceTokenizer)
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
