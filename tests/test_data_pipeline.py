"""The Grain input pipeline (`parcae_jax.data.pipeline`) on small shards written here."""

import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from parcae_jax import fileio, losses
from parcae_jax.data import pipeline, shards

BOS, PAD, VOCAB, T = 0, 2, 1000, 16


def write_dataset(root, shard_docs, *, split="train", bos_id=BOS):
    """shard_docs: list (shards) of lists (documents) of token arrays; writes metadata.json too."""
    for i, docs in enumerate(shard_docs):
        shards.write_shard(str(root), split, i, docs, np.uint16)
    meta = {
        "format": shards.FORMAT,
        "tokenizer": {
            "fingerprint": "test",
            "kind": "test",
            "vocab_size": VOCAB,
            "bos_id": bos_id,
            "eos_id": 1,
            "pad_id": PAD,
            "path": "",
        },
        "dtype": "uint16",
        "splits": {
            split: {
                "shards": len(shard_docs),
                "tokens": sum(sum(map(len, d)) for d in shard_docs),
                "documents": sum(map(len, shard_docs)),
            }
        },
        "source": "test",
    }
    fileio.write_json_atomic(os.path.join(str(root), "metadata.json"), meta, sort_keys=True)
    return str(root)


def random_docs(rng, count, max_len):
    # Tokens >= 3 so BOS/EOS/PAD never occur inside documents; one empty document per shard.
    docs = [rng.integers(3, VOCAB, size=int(n)) for n in rng.integers(1, max_len, size=count)]
    docs[count // 2] = np.zeros(0, np.int64)
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    shard_docs = [random_docs(rng, 30, 60), random_docs(rng, 25, 90), random_docs(rng, 40, 30)]
    shard_docs[1][3] = rng.integers(3, VOCAB, size=3 * T)  # a document longer than a row
    root = write_dataset(tmp_path_factory.mktemp("corpus"), shard_docs)
    return root, shard_docs


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory):
    """Documents mostly shorter than a row, so best-fit rows end in partial fills and padding."""
    rng = np.random.default_rng(2)
    shard_docs = [random_docs(rng, 50, 12), random_docs(rng, 30, 24)]
    return write_dataset(tmp_path_factory.mktemp("short"), shard_docs), shard_docs


def expected_windows(shard_docs, block_size=T):
    """All bos rows, shard by shard: [BOS] + doc for each document, windows of T+1 with stride T."""
    rows = []
    for docs in shard_docs:
        stream = np.concatenate([np.concatenate([[BOS], d]) for d in docs])
        starts = range(0, len(stream) - block_size, block_size)
        rows += [stream[start : start + block_size + 1] for start in starts]
    return np.array(rows, dtype=np.int32)


def full_rows(batch):
    """Rebuild the [.., T+1] rows from inputs and the last label (valid when nothing is padding)."""
    return np.concatenate([batch["inputs"], batch["labels"][..., -1:]], axis=-1)


def make(root, **kw):
    args = dict(block_size=T, world_batch=16, accum=2, seed=7, process_index=0, process_count=1)
    return pipeline.train_iterator(root, **{**args, **kw})


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        np.testing.assert_array_equal(a["labels"], b["labels"])


def reference_best_fit(lengths, num_rows, capacity):
    """Spec §7.10 written the plain way: scan the buffer (arrival order) with max/min each time."""
    buffer = list(range(len(lengths)))
    rows = []
    for _ in range(num_rows):
        row, remaining = [], capacity
        while remaining > 0 and buffer:
            fits = [d for d in buffer if lengths[d] <= remaining]
            if fits:
                doc = max(fits, key=lambda d: lengths[d])  # first longest in arrival order
                take = lengths[doc]
            else:
                doc = min(buffer, key=lambda d: lengths[d])
                take = remaining
            buffer.remove(doc)
            row.append((doc, int(take)))
            remaining -= take
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------


def test_bos_rows_are_the_stream_windows(corpus):
    root, shard_docs = corpus
    expected = expected_windows(shard_docs)
    readers = shards.open_split(root, "train")
    rows = pipeline.BosRows(readers, T, BOS, "test")
    assert rows.num_rows == len(expected)
    for r in range(rows.num_rows):
        np.testing.assert_array_equal(rows.row(r), expected[r])


def test_bos_batches_shapes_shift_no_padding_and_one_epoch(corpus):
    root, shard_docs = corpus
    expected = {row.tobytes(): i for i, row in enumerate(expected_windows(shard_docs))}
    it = make(root)
    seen = []
    for _ in range(it.steps_per_epoch):
        batch = next(it)
        assert batch["inputs"].shape == batch["labels"].shape == (2, 8, T)
        assert batch["inputs"].dtype == batch["labels"].dtype == np.int32
        np.testing.assert_array_equal(batch["labels"][..., :-1], batch["inputs"][..., 1:])
        assert not np.any(batch["labels"] == losses.IGNORE_INDEX)
        seen += [expected[row.tobytes()] for row in full_rows(batch).reshape(-1, T + 1)]
    assert len(seen) == len(set(seen)) == it.steps_per_epoch * 16  # each row at most once per epoch
    assert it.padding_fraction == 0.0 and it.epoch == 1
    assert it.tokens_per_epoch == it.steps_per_epoch * 16 * T
    next_epoch = [expected[row.tobytes()] for row in full_rows(next(it)).reshape(-1, T + 1)]
    assert next_epoch != seen[:16]  # a new shuffle per epoch


def test_shuffle_is_seeded(corpus):
    root, _ = corpus
    first = take(make(root, seed=3), 3)
    assert_same(first, take(make(root, seed=3), 3))
    other = take(make(root, seed=4), 3)
    assert not np.array_equal(first[0]["inputs"], other[0]["inputs"])


def test_best_fit_packer_by_hand():
    # capacity 10: row 0 takes 8 then 2; row 1 takes 6, 3, then the 12 cut to 1; rows 2-3 are padding.
    rows, unplaced = pipeline.pack_best_fit([6, 3, 8, 2, 12], 4, 10)
    assert rows == [[(2, 8), (3, 2)], [(0, 6), (1, 3), (4, 1)], [], []]
    assert unplaced == []


def test_best_fit_packer_matches_reference():
    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(1, 20))
        lengths = [int(x) for x in rng.integers(1, 40, size=n)]  # many ties, many too long
        rows, unplaced = pipeline.pack_best_fit(lengths, n, 17)
        assert rows == reference_best_fit(lengths, n, 17)
        assert unplaced == []


@pytest.mark.parametrize("dataset", ["corpus", "short_docs"])
def test_best_fit_batches_match_reference_packing(request, dataset):
    root, shard_docs = request.getfixturevalue(dataset)
    docs = [d for sd in shard_docs for d in sd if len(d)]  # the pipeline skips empty documents
    it = make(root, packing="best-fit")
    G, n = 8, len(docs)
    assert it.steps_per_epoch == -(-n // G) // 2
    padding = total = partial_rows = 0
    for step in range(it.steps_per_epoch + 1):  # into the second epoch
        batch = next(it)
        epoch, k = divmod(step, it.steps_per_epoch)
        seed = pipeline.epoch_seed(7, epoch)
        for a in range(2):
            group = k * 2 + a
            order = pipeline.shuffled(np.arange(group * G, min(group * G + G, n)), n, seed)
            packed = reference_best_fit([len(docs[d]) for d in order], G, T + 1)
            for b, row in enumerate(packed):
                tokens = np.concatenate([docs[order[d]][:take] for d, take in row] or [np.zeros(0, int)])
                real = len(tokens)
                want = np.full(T + 1, PAD, np.int32)
                want[:real] = tokens
                np.testing.assert_array_equal(batch["inputs"][a, b], want[:-1])
                labels = np.where(np.arange(T) + 1 < real, want[1:], losses.IGNORE_INDEX)
                np.testing.assert_array_equal(batch["labels"][a, b], labels)
                padding += T - max(real - 1, 0)
                partial_rows += 0 < real < T + 1
                total += T
    assert it.padding_fraction == pytest.approx(padding / total)
    assert 0.0 < it.padding_fraction < 1.0
    if dataset == "short_docs":
        assert partial_rows > 0  # rows that end in padding after some tokens (the label edge case)


@pytest.mark.parametrize("packing", ["bos", "best-fit"])
@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_partition_the_global_batch(corpus, packing, process_count):
    root, _ = corpus
    # Best-fit packs per device micro-batch: fix that group (2 rows) so it is the same for every split.
    group = {"pack_rows": 2} if packing == "best-fit" else {}
    single = make(root, packing=packing, **group)
    steps = single.steps_per_epoch + 2  # across an epoch boundary
    reference = take(single, steps)
    locals_ = [
        take(make(root, packing=packing, process_index=p, process_count=process_count, **group), steps)
        for p in range(process_count)
    ]
    for s in range(steps):
        for key in ("inputs", "labels"):
            parts = [locals_[p][s][key] for p in range(process_count)]
            assert parts[0].shape == (2, 8 // process_count, T)
            # Process blocks stacked along the micro-batch axis in process order = the global batch.
            np.testing.assert_array_equal(np.concatenate(parts, axis=1), reference[s][key])
        if packing == "bos":  # rows are distinct windows, so disjoint blocks have no row in common
            rows = [full_rows(locals_[p][s]).reshape(-1, T + 1) for p in range(process_count)]
            assert len({r.tobytes() for r in np.concatenate(rows)}) == 16


@pytest.mark.parametrize("packing", ["bos", "best-fit"])
def test_resume_from_state_threads(corpus, packing):
    root, _ = corpus
    it = make(root, packing=packing, prefetch=3)
    n = it.steps_per_epoch - 1  # the resumed part crosses an epoch boundary
    take(it, n)
    state = json.loads(json.dumps(it.get_state()))
    expected, fraction = take(it, 4), it.padding_fraction
    it.close()
    resumed = make(root, packing=packing, prefetch=1)
    resumed.set_state(state)
    assert_same(take(resumed, 4), expected)
    assert resumed.padding_fraction == fraction and resumed.step == n + 4


def test_resume_from_state_worker_processes(corpus):
    root, _ = corpus
    reference = take(make(root, packing="best-fit", prefetch=0), 7)
    with make(root, packing="best-fit", num_workers=2) as it:
        assert_same(take(it, 3), reference[:3])  # worker processes read exactly what threads read
        state = json.loads(json.dumps(it.get_state()))
    with make(root, packing="best-fit", num_workers=2) as resumed:
        resumed.set_state(state)
        assert_same(take(resumed, 4), reference[3:])


def test_state_from_other_settings_is_refused(corpus):
    root, _ = corpus
    state = make(root).get_state()
    with pytest.raises(ValueError, match="same data settings"):
        make(root, seed=8).set_state(state)


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_every_row_once(corpus, process_count):
    root, shard_docs = corpus
    # The corpus doubles as a validation split: same files under another split name.
    expected = expected_windows(shard_docs)
    per_process = [
        list(
            pipeline.eval_batches(
                root, split="train", block_size=T, batch_size=12, process_index=p, process_count=process_count
            )
        )
        for p in range(process_count)
    ]
    num_batches = -(-len(expected) // 12)
    assert all(len(b) == num_batches for b in per_process)
    rows = []
    for i in range(num_batches):
        batch = {k: np.concatenate([b[i][k] for b in per_process]) for k in ("inputs", "labels")}
        assert batch["inputs"].shape == batch["labels"].shape == (12, T)
        real = ~np.all(batch["labels"] == losses.IGNORE_INDEX, axis=1)
        assert np.all(real[:-1] >= real[1:])  # padding rows only at the end
        rows.append(full_rows(batch)[real])
    np.testing.assert_array_equal(np.concatenate(rows), expected)  # in order, each once
    short = list(
        pipeline.eval_batches(
            root, split="train", block_size=T, batch_size=12, max_batches=2, process_index=0, process_count=1
        )
    )
    assert len(short) == 2


def test_clear_errors(tmp_path, corpus):
    root, _ = corpus
    with pytest.raises(shards.ShardError, match="metadata.json"):
        make(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="block_size\\+1=1001"):
        make(root, block_size=1000)
    with pytest.raises(ValueError, match="not divisible by accum\\*process_count"):
        make(root, world_batch=16, accum=2, process_count=3)
    with pytest.raises(ValueError, match="not enough for one global batch"):
        make(root, world_batch=4096, accum=1)
    with pytest.raises(ValueError, match="packing"):
        make(root, packing="greedy")
    nobos = write_dataset(tmp_path / "nobos", [[np.arange(3, 100)]], bos_id=None)
    with pytest.raises(ValueError, match="best-fit"):
        make(nobos)


def test_global_batch_on_eight_devices():
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(8, 1, 1), ("data", "fsdp", "tensor"))
    train = {"inputs": np.arange(2 * 8 * T, dtype=np.int32).reshape(2, 8, T)}
    train["labels"] = train["inputs"] + 1
    sharding = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"), None))
    out = pipeline.global_batch(train, sharding)
    for key in train:
        assert out[key].shape == (2, 8, T) and out[key].sharding == sharding
        assert out[key].addressable_shards[0].data.shape == (2, 1, T)
        np.testing.assert_array_equal(np.asarray(out[key]), train[key])
    eval_sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
    out = pipeline.global_batch({"inputs": train["inputs"][0]}, eval_sharding, batch_axis=0)
    assert out["inputs"].shape == (8, T) and out["inputs"].sharding == eval_sharding
    np.testing.assert_array_equal(np.asarray(out["inputs"]), train["inputs"][0])
