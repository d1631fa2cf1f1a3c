"""Document sources and shard preparation: contents, splits, dtypes, resume, errors, Shakespeare cache."""

import json
import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from parcae_jax.data import prepare as prep
from parcae_jax.data import shards, sources
from parcae_jax.data.prepare import PrepareError, ensure_shakespeare_dataset, prepare
from parcae_jax.data.tokenizer import load_tokenizer, train_tokenizer

SHARD_TOKENS = 20_000
QUIET = {"show_progress": False, "log": lambda *_: None, "workers": 1}
METADATA_KEYS = {"format", "tokenizer", "dtype", "splits", "source", "val_fraction", "command", "created",
                 "parcae_jax_version"}


def _documents() -> list[str]:
    scenes = sources.shakespeare_documents()
    extra = ["", "naïve café — 東京 😀\n\ttabs  and  runs", "", "x", scenes[3]]  # empties, a duplicate
    return scenes[:40] + extra + [f"Document {i}: {' '.join(['word'] * i)}\n" for i in range(20)]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return _documents()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, docs) -> str:
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text("\n".join(docs[:40]), encoding="utf-8")
    out = str(tmp_path_factory.mktemp("tok") / "tokenizer")
    train_tokenizer([str(corpus)], 400, out, log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, docs) -> dict[str, str]:
    """The same documents as jsonl, as one text file each, and as parquet in small row groups."""
    root = tmp_path_factory.mktemp("inputs")
    with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
        for d in docs[:30]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
        f.write("\n")  # a blank line is skipped, not a document
    with open(root / "docs2.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs[30:])
    (root / "text").mkdir()
    for i, d in enumerate(docs):
        if d:  # an empty text file is an error; the jsonl/parquet empties are dropped anyway
            (root / "text" / f"doc_{i:03d}.txt").write_text(d, encoding="utf-8")
    (root / "pq").mkdir()
    table = pa.table({"id": list(range(len(docs))), "text": docs})
    pq.write_table(table.slice(0, 50), root / "pq" / "a.parquet", row_group_size=7)
    pq.write_table(table.slice(50), root / "pq" / "b.parquet", row_group_size=7)
    return {"jsonl": f"jsonl:{root}/*.jsonl", "text": f"text:{root}/text/*.txt",
            "parquet": f"parquet:{root}/pq", "root": str(root)}


@pytest.fixture(scope="module")
def clean(tmp_path_factory, inputs, tok_dir) -> str:
    """An uninterrupted preparation of the jsonl input: the reference for the other tests."""
    out = str(tmp_path_factory.mktemp("clean") / "data")
    prepare(inputs["jsonl"], tok_dir, out, val_fraction=0.2, shard_tokens=SHARD_TOKENS, **QUIET)
    return out


def _files(folder: str) -> dict[str, bytes]:
    """Every file's bytes except metadata.json (which holds a timestamp and the command line)."""
    found = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            if name != "metadata.json":
                found[os.path.relpath(path, folder)] = open(path, "rb").read()
    return found


def _stable_metadata(folder: str) -> dict:
    meta = shards.load_metadata(folder)
    return {k: v for k, v in meta.items() if k not in ("created", "command")}


def _split_documents(folder: str, split: str) -> list[np.ndarray]:
    return [r.document(i) for r in shards.open_split(folder, split) for i in range(r.num_documents)]


# ---------------------------------------------------------------------------------------------------
# Contents
# ---------------------------------------------------------------------------------------------------


def test_shards_hold_the_documents(clean, tok_dir, docs):
    tokenizer = load_tokenizer(tok_dir)
    meta = shards.load_metadata(clean)
    assert set(meta) == METADATA_KEYS
    assert meta["format"] == shards.FORMAT and meta["dtype"] == "uint16" and meta["val_fraction"] == 0.2
    assert meta["tokenizer"] == {"fingerprint": tokenizer.fingerprint, "kind": "sentencepiece",
                                 "vocab_size": 400, "bos_id": 1, "eos_id": 2, "pad_id": 0,
                                 "declared_pad_id": 0, "path": tok_dir}
    decoded = {}
    for split in ("train", "val"):
        expected = [d for d in docs if d and prep.split_of(d, 0.2) == split]
        stored = _split_documents(clean, split)
        decoded[split] = [tokenizer.decode(ids) for ids in stored]
        assert decoded[split] == expected  # same documents, same order, empties dropped
        assert [ids.tolist() for ids in stored] == tokenizer.encode_batch(expected)  # no BOS/EOS added
        info = meta["splits"][split]
        assert info["documents"] == len(expected)
        assert info["tokens"] == sum(len(ids) for ids in stored)
        readers = shards.open_split(clean, split)
        assert len(readers) == info["shards"]
        assert all(r.num_tokens >= SHARD_TOKENS for r in readers[:-1])  # only the last one is short
        assert all(r.dtype == np.dtype("<u2") for r in readers)
    assert meta["splits"]["train"]["shards"] > 2
    assert 0 < meta["splits"]["val"]["documents"] < meta["splits"]["train"]["documents"]
    assert not set(decoded["train"]) & set(decoded["val"])  # the duplicated scene is on one side only
    assert decoded["train"].count(docs[3]) + decoded["val"].count(docs[3]) == 2


def test_text_and_parquet_inputs_give_the_same_shards(tmp_path, inputs, tok_dir, clean):
    for kind in ("text", "parquet"):
        out = str(tmp_path / kind)
        prepare(inputs[kind], tok_dir, out, val_fraction=0.2, shard_tokens=SHARD_TOKENS, **QUIET)
        # progress.json names the source, so compare the shard files and the per-split totals
        got, want = _files(out), _files(clean)
        assert got.pop("progress.json") != want.pop("progress.json")
        for key in got:  # shard records carry a hash of the arguments (source included)
            if key.endswith(".json"):
                got[key], want[key] = (json.loads(x) for x in (got[key], want[key]))
                for field in ("plan", "source_documents"):  # text input has no empty documents
                    got[key].pop(field), want[key].pop(field)
        assert got == want
        assert shards.load_metadata(out)["splits"] == shards.load_metadata(clean)["splits"]


def test_workers_do_not_change_the_result(tmp_path, inputs, tok_dir, clean):
    out = str(tmp_path / "pool")
    opts = {**QUIET, "workers": 2}
    prepare(inputs["jsonl"], tok_dir, out, val_fraction=0.2, shard_tokens=SHARD_TOKENS, **opts)
    assert _files(out) == _files(clean)
    assert _stable_metadata(out) == _stable_metadata(clean)


def test_remote_url_output(tmp_path, inputs, tok_dir, clean):
    url = f"file://{tmp_path}/remote"
    prepare(inputs["jsonl"], tok_dir, url, val_fraction=0.2, shard_tokens=SHARD_TOKENS, **QUIET)
    assert _files(str(tmp_path / "remote")) == _files(clean)
    assert [d.tolist() for d in _split_documents(url, "val")] == [
        d.tolist() for d in _split_documents(clean, "val")]


# ---------------------------------------------------------------------------------------------------
# Token dtype
# ---------------------------------------------------------------------------------------------------


def test_uint32_on_request(tmp_path, inputs, tok_dir, clean):
    out = str(tmp_path / "u32")
    prepare(inputs["jsonl"], tok_dir, out, val_fraction=0.2, shard_tokens=SHARD_TOKENS, dtype="uint32",
            **QUIET)
    assert shards.load_metadata(out)["dtype"] == "uint32"
    wide, narrow = shards.open_split(out, "train"), shards.open_split(clean, "train")
    assert wide[0].dtype == np.dtype("<u4")
    assert [r.num_documents for r in wide] == [r.num_documents for r in narrow]
    np.testing.assert_array_equal(wide[0].read(0, wide[0].num_tokens),
                                  narrow[0].read(0, narrow[0].num_tokens))


@pytest.fixture(scope="module")
def big_vocab_tokenizer(tmp_path_factory) -> str:
    """A word-level tokenizer.json with 70,000 ids: more than uint16 holds."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(70_000 - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path_factory.mktemp("big") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def test_large_vocabulary_needs_uint32(tmp_path, big_vocab_tokenizer, capsys):
    (tmp_path / "a.txt").write_text("w69990 w5 w69996")
    out = str(tmp_path / "big")
    meta = prepare(f"text:{tmp_path}/a.txt", big_vocab_tokenizer, out, val_fraction=0.0, **QUIET)
    assert meta["dtype"] == "uint32"
    assert _split_documents(out, "train")[0].tolist() == [69993, 8, 69999]
    assert meta["splits"]["val"] == {"shards": 0, "tokens": 0, "documents": 0}
    code = prep.main(["--source", f"text:{tmp_path}/a.txt", "--tokenizer", big_vocab_tokenizer,
                      "--output", str(tmp_path / "u16"), "--dtype", "uint16", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "does not fit uint16" in err and "uint32" in err
    assert not os.path.exists(tmp_path / "u16")


# ---------------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def count_tokenized(monkeypatch) -> list[int]:
    """Counts the documents sent to the tokenizer (in-process path, workers=1)."""
    counted = [0]
    original = prep.tokenize_chunk

    def counting(texts):
        counted[0] += len(texts)
        return original(texts)

    monkeypatch.setattr(prep, "tokenize_chunk", counting)
    return counted


def test_resume_after_a_crash_redoes_only_missing_shards(tmp_path, inputs, tok_dir, clean, monkeypatch,
                                                         count_tokenized, docs):
    out = str(tmp_path / "crash")
    original = shards.write_shard
    written = []

    def crash_after_two(*args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated interruption")
        written.append(args[1:3])
        return original(*args, **kwargs)

    monkeypatch.setattr(shards, "write_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        prepare(inputs["jsonl"], tok_dir, out, val_fraction=0.2, shard_tokens=SHARD_TOKENS, **QUIET)
    assert not os.path.exists(os.path.join(out, "metadata.json"))
    with pytest.raises(shards.ShardError, match="not found"):
        shards.load_metadata(out)
    monkeypatch.setattr(shards, "write_shard", original)

    kept_docs = sum(json.load(open(shards.shard_paths(out, s, i)[2]))["source_documents"] for s, i in written)
    count_tokenized[0] = 0
    prepare(inputs["jsonl"], tok_dir, out, val_fraction=0.2, shard_tokens=SHARD_TOKENS, **QUIET)
    assert count_tokenized[0] == len(docs) - kept_docs  # the kept shards' documents were not re-tokenised
    assert _files(out) == _files(clean)
    assert _stable_metadata(out) == _stable_metadata(clean)


def test_resume_rebuilds_a_deleted_last_shard(tmp_path, inputs, tok_dir, clean, count_tokenized):
    out = str(tmp_path / "partial")
    opts = {"val_fraction": 0.2, "shard_tokens": SHARD_TOKENS, **QUIET}
    prepare(inputs["jsonl"], tok_dir, out, **opts)
    last = shards.load_metadata(out)["splits"]["train"]["shards"] - 1
    record_path = shards.shard_paths(out, "train", last)[2]
    redo = json.load(open(record_path))["source_documents"]
    os.remove(record_path)
    os.remove(os.path.join(out, "metadata.json"))
    count_tokenized[0] = 0
    prepare(inputs["jsonl"], tok_dir, out, **opts)
    assert count_tokenized[0] == redo
    assert _files(out) == _files(clean)

    count_tokenized[0] = 0  # complete and same arguments: nothing to do
    prepare(inputs["jsonl"], tok_dir, out, **opts)
    os.remove(os.path.join(out, "progress.json"))  # e.g. a copied dataset: its metadata is trusted
    prepare(inputs["jsonl"], tok_dir, out, **opts)
    assert count_tokenized[0] == 0
    with pytest.raises(PrepareError, match="complete dataset made with other arguments"):
        prepare(inputs["jsonl"], tok_dir, out, **{**opts, "val_fraction": 0.3})


def test_argument_mismatch(tmp_path, inputs, tok_dir, monkeypatch):
    out = str(tmp_path / "mismatch")
    original = shards.write_shard

    def crash(*args, **kwargs):
        original(*args, **kwargs)
        raise RuntimeError("disk full")

    monkeypatch.setattr(shards, "write_shard", crash)
    with pytest.raises(RuntimeError):
        prepare(inputs["jsonl"], tok_dir, out, val_fraction=0.2, shard_tokens=SHARD_TOKENS, **QUIET)
    monkeypatch.setattr(shards, "write_shard", original)
    with pytest.raises(PrepareError, match="interrupted preparation used other arguments.*shard_tokens"):
        prepare(inputs["jsonl"], tok_dir, out, val_fraction=0.2, shard_tokens=5000, **QUIET)
    prepare(inputs["jsonl"], tok_dir, out, val_fraction=0.2, shard_tokens=5000, overwrite=True, **QUIET)
    reference = str(tmp_path / "reference")
    prepare(inputs["jsonl"], tok_dir, reference, val_fraction=0.2, shard_tokens=5000, **QUIET)
    assert _files(out) == _files(reference)  # the stale shard of the old plan was rewritten
    assert _stable_metadata(out) == _stable_metadata(reference)

    with pytest.raises(PrepareError, match="complete dataset made with other arguments"):
        prepare(inputs["jsonl"], tok_dir, out, val_fraction=0.1, shard_tokens=5000, **QUIET)


def test_refuses_a_foreign_folder(tmp_path, inputs, tok_dir):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(PrepareError, match="not a dataset folder"):
        prepare(inputs["jsonl"], tok_dir, str(tmp_path), **QUIET)
    with pytest.raises(PrepareError, match="val-fraction"):
        prepare(inputs["jsonl"], tok_dir, str(tmp_path / "x"), val_fraction=1.0, **QUIET)


# ---------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------


def test_bad_inputs(tmp_path, tok_dir):
    out = str(tmp_path / "out")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(sources.SourceError, match="empty.txt: file is empty"):
        prepare(f"text:{tmp_path}/empty.txt", tok_dir, out, **QUIET)
    with pytest.raises(sources.SourceError, match="no file matches"):
        prepare(f"jsonl:{tmp_path}/missing*.jsonl", tok_dir, str(tmp_path / "never"), **QUIET)
    assert not os.path.exists(tmp_path / "never")  # checked before anything is written
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "notext.parquet")
    with pytest.raises(sources.SourceError, match="notext.parquet: parquet file has no 'text' column.*ren"):
        prepare(str(tmp_path / "notext.parquet"), tok_dir, out, **QUIET)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "cut\n')
    with pytest.raises(sources.SourceError, match="bad.jsonl:2: not valid JSON"):
        prepare(f"jsonl:{tmp_path}/bad.jsonl", tok_dir, out, **QUIET)
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(sources.SourceError, match="nofield.jsonl:1: expected an object with a string 'text'"):
        list(sources.iter_documents(f"{tmp_path}/nofield.jsonl"))
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(sources.SourceError, match="junk.parquet: not a readable parquet file"):
        list(sources.iter_documents(f"parquet:{tmp_path}/junk.parquet"))
    with pytest.raises(sources.SourceError, match="no file pattern"):
        sources.parse_spec("parquet:")
    assert not os.path.exists(os.path.join(out, "metadata.json"))


def test_truncated_shard_is_detected(tmp_path, inputs, tok_dir):
    out = str(tmp_path / "trunc")
    prepare(inputs["jsonl"], tok_dir, out, val_fraction=0.2, shard_tokens=SHARD_TOKENS, **QUIET)
    tokens_path = shards.shard_paths(out, "train", 1)[0]
    with open(tokens_path, "r+b") as f:
        f.truncate(os.path.getsize(tokens_path) - 2)
    with pytest.raises(shards.ShardError, match="truncated"):
        shards.open_split(out, "train")
    assert not shards.shard_is_complete(out, "train", 1)


def test_cli(tmp_path, inputs, tok_dir, clean, capsys):
    out = str(tmp_path / "cli")
    args = ["--source", inputs["jsonl"], "--tokenizer", tok_dir, "--output", out, "--val-fraction", "0.2",
            "--shard-tokens", str(SHARD_TOKENS), "--workers", "1", "--no-progress"]
    assert prep.main(args) == 0
    assert _files(out) == _files(clean)
    assert shards.load_metadata(out)["command"].startswith("python -m parcae_jax.data.prepare --source")
    assert prep.main([*args, "--val-fraction", "0.3"]) == 2  # complete, made with other arguments
    assert "error:" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# Sources and the Shakespeare corpus
# ---------------------------------------------------------------------------------------------------


def test_spec_parsing_and_count_hint(inputs, docs):
    assert sources.parse_spec("shakespeare") == ("shakespeare", "")
    assert sources.parse_spec("a/b.parquet") == ("parquet", "a/b.parquet")
    assert sources.parse_spec("x/*.jsonl") == ("jsonl", "x/*.jsonl")
    assert sources.parse_spec("notes.md") == ("text", "notes.md")
    assert sources.count_hint(inputs["parquet"]) == len(docs)
    assert sources.count_hint(inputs["text"]) == sum(1 for d in docs if d)
    assert sources.count_hint(inputs["jsonl"]) is None
    assert list(sources.iter_documents(inputs["parquet"])) == docs


def test_play_markup_is_stripped():
    markdown = ("# A Play\n\n## ACT I\n\n_Enter GOWER_\n\n### PROLOGUE\n\n**GOWER**  \nTo sing a song  \n"
                "that old was sung\\--\n\n_\\[Aside]_  \n\n### SCENE I. A room.\n\n*[Drawing.]*\n\n\n\n"
                "**FIRST LORD & SECOND**  \nAy.\n\n## ACT II\n\n### SCENE I. Elsewhere.\n\n**A**  \nNo.\n")
    scenes = sources.play_scenes(markdown, "fallback")
    assert scenes == [
        "A Play\nACT I\nPROLOGUE\n\nEnter GOWER\n\nGOWER:\nTo sing a song\nthat old was sung--\n\n[Aside]\n",
        "A Play\nACT I\nSCENE I. A room.\n\n[Drawing.]\n\nFIRST LORD & SECOND:\nAy.\n",
        "A Play\nACT II\nSCENE I. Elsewhere.\n\nA:\nNo.\n",
    ]
    assert sources.play_scenes("## ACT I\n\n### SCENE I. X.\n\nHi\n", "Measure for Measure")[0].startswith(
        "Measure for Measure\nACT I\nSCENE I. X.")


def test_shakespeare_corpus():
    docs = sources.shakespeare_documents()
    assert len(sources.shakespeare_play_files()) == 38
    assert 700 < len(docs) < 900 and 4_500_000 < sum(map(len, docs)) < 5_500_000
    text = "".join(docs)
    for markup in ("**", "_", "#", "\\", "  \n"):
        assert markup not in text
    assert any(d.startswith("Hamlet\nACT III\nSCENE I.") and "To be, or not to be" in d for d in docs)
    assert list(sources.iter_documents("shakespeare")) == docs


def test_ensure_shakespeare_dataset(tmp_path):
    logs = []
    results = [None, None]

    def build(slot):
        results[slot] = ensure_shakespeare_dataset(str(tmp_path), 512, log=logs.append)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == results[1]
    data_dir, tokenizer_dir = results[0]
    assert data_dir == str(tmp_path / "shakespeare-v512" / "data")
    assert sum("tokenizer: wrote" in m for m in logs) == 1  # the lock made the second caller reuse it
    assert sum("prepare: wrote" in m for m in logs) == 1
    meta = shards.load_metadata(data_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    shards.check_tokenizer(meta, tokenizer.fingerprint, data_dir, tokenizer.describe())
    assert meta["source"] == "shakespeare" and meta["tokenizer"]["vocab_size"] == 512
    assert meta["splits"]["val"]["tokens"] >= 100_000 and meta["splits"]["val"]["documents"] >= 30
    assert meta["splits"]["train"]["tokens"] > 10 * meta["splits"]["val"]["tokens"]
    stamp = os.path.getmtime(os.path.join(data_dir, "metadata.json"))
    assert ensure_shakespeare_dataset(str(tmp_path), 512, log=logs.append) == (data_dir, tokenizer_dir)
    assert os.path.getmtime(os.path.join(data_dir, "metadata.json")) == stamp
