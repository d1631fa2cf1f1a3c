"""The official recipe (docs/official_recipe.md): the data stream, loss normalisation, depth sampling
and fields of the released configs, each checked against the spec's semantics written out here."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flax import nnx

from parcae_jax import losses, sharding, train_step
from parcae_jax.cli_config import load_config
from parcae_jax.config import ModelConfig
from parcae_jax.data import pipeline
from parcae_jax.data.prepare import prepare
from parcae_jax.data.tokenizer import load_tokenizer
from tests.helpers import tiny_parcae

T = 32


# ---------------------------------------------------------------------------------------------------
# Best-fit rows on a parquet corpus against the official collator
# ---------------------------------------------------------------------------------------------------


def official_style_tokenizer(folder, texts):
    """A byte-level BPE with <|bos|>, <|eos|>, <|pad|> = 0, 1, 2 and no tokenizer_config.json (as the
    official `tok_train.py` writes it): it declares no PAD, so the official pad / ignore id is 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    return tok


class OfficialCollator:
    """The official BestFitPackingCollator, re-written plainly from spec §7.10: a persistent buffer that
    each call extends with one micro-batch of documents; per row, the longest buffered document that
    fits, else the shortest one cut to the space left (its rest discarded), else `pad_id or 0`."""

    def __init__(self, capacity, pad_id):
        self.capacity, self.pad_id, self.buffer = capacity, pad_id or 0, []

    def __call__(self, documents):
        self.buffer.extend(list(d) for d in documents)
        rows = []
        for _ in documents:
            row = []
            while len(row) < self.capacity and self.buffer:
                space = self.capacity - len(row)
                fits = [d for d in self.buffer if len(d) <= space]
                doc = max(fits, key=len) if fits else min(self.buffer, key=len)
                self.buffer.remove(doc)
                row += doc[:space]
            rows.append(row + [self.pad_id] * (self.capacity - len(row)))
        return np.array(rows)


@pytest.fixture(scope="module")
def parquet_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("pq")
    rng = np.random.default_rng(3)
    words = "the of river stone light winter green quiet market north".split()
    texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(2, 40, size=90)]
    tok = official_style_tokenizer(root / "tok", texts)
    (root / "src").mkdir()
    pq.write_table(pa.table({"text": texts}), root / "src" / "a.parquet", row_group_size=16)
    prepare(f"parquet:{root}/src", str(root / "tok"), str(root / "data"), val_fraction=0.0, workers=1,
            show_progress=False, log=lambda *a: None)
    docs = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    return str(root / "data"), [d for d in docs if d]


def test_released_best_fit_rows_equal_the_official_collator(parquet_corpus):
    dataset, docs = parquet_corpus
    cfg = load_config("configs/parcae_140m.py")
    assert cfg.data.packing == "best-fit"
    # World 8 rows, 2 devices of 2 rows, accumulation 2: each device packs its own 2 documents.
    it = pipeline.train_iterator(dataset, block_size=T, world_batch=8, accum=2, seed=5, packing="best-fit",
                                 process_index=0, process_count=1, pack_rows=2)
    n, capacity = len(docs), T + 1
    collator = OfficialCollator(capacity, load_tokenizer(f"{dataset}/../tok").declared_pad_id)
    assert collator.pad_id == 0
    padded = 0
    for step in range(it.steps_per_epoch + 1):
        batch = next(it)
        epoch, k = divmod(step, it.steps_per_epoch)
        order = pipeline.shuffled(np.arange(n), n, pipeline.epoch_seed(5, epoch))
        for a in range(2):
            for rank in range(2):
                group = (k * 2 + a) * 2 + rank
                rows = collator([docs[order[i]] for i in range(group * 2, group * 2 + 2)])
                got = batch["inputs"][a, rank * 2:rank * 2 + 2]
                np.testing.assert_array_equal(got, rows[:, :-1])
                want_labels = np.where(rows[:, 1:] == 0, losses.IGNORE_INDEX, rows[:, 1:])
                np.testing.assert_array_equal(batch["labels"][a, rank * 2:rank * 2 + 2], want_labels)
                padded += int(np.sum(rows[:, 1:] == 0))
        assert collator.buffer == []  # the buffer drains at every call, so groups are independent
    assert padded > 0 and it.padding_fraction == pytest.approx(padded / (it.step * 8 * T))


def test_validation_reads_rows_through_the_training_collator(parquet_corpus):
    dataset, docs = parquet_corpus
    batches = list(pipeline.eval_batches(dataset, split="train", block_size=T, batch_size=4, max_batches=3,
                                         packing="best-fit", pack_rows=2, process_index=0, process_count=1))
    collator = OfficialCollator(T + 1, 0)
    for b, batch in enumerate(batches):  # stored order, from the start, two documents per device
        rows = np.concatenate([collator(docs[(2 * b + j) * 2:(2 * b + j) * 2 + 2]) for j in range(2)])
        np.testing.assert_array_equal(batch["inputs"], rows[:, :-1])


# ---------------------------------------------------------------------------------------------------
# Loss normalisation
# ---------------------------------------------------------------------------------------------------


def test_micro_batch_weights_are_the_official_normalisation():
    rng = np.random.default_rng(0)
    A, ranks, rows, T_ = 3, 2, 2, 5
    valid = rng.random((A, ranks * rows, T_)) < 0.6
    valid[1, :rows] = False  # a device micro-batch with no real token contributes nothing
    nll = rng.random(valid.shape)
    official = 0.0
    for a in range(A):
        for r in range(ranks):
            v, x = valid[a, r * rows:(r + 1) * rows], nll[a, r * rows:(r + 1) * rows]
            if v.any():  # backward(loss / accumulation), then DDP averages the ranks' gradients
                official += x[v].mean() / A / ranks
    w = train_step.token_weights(jnp.asarray(valid), rows, "micro_batch")
    assert float(jnp.sum(w * nll)) == pytest.approx(official, rel=1e-6)
    g = train_step.token_weights(jnp.asarray(valid), rows, "global")
    assert float(jnp.sum(g * nll)) == pytest.approx(nll[valid].mean(), rel=1e-6)


def run_one_step(normalization, batch, mesh_shape=(2, 1, 4)):
    """Loss of one train step of a fixed-depth, zero-state tiny Parcae (so its forward is exactly
    the model's plain forward at t + s recurrences)."""
    cfg = tiny_parcae(sampling_scheme="fixed", state_init="zero", block_size=8)
    run = ml_collections.ConfigDict({"model": cfg.to_dict()})
    run.train = load_config("configs/tiny.py").train.copy_and_resolve_references()
    run.train.unlock()
    run.train.update(world_batch_size=8, micro_batch_size=2, loss_normalization=normalization,
                     optimizer="adamw")
    mesh = sharding.make_mesh(*mesh_shape)
    setup, state = train_step.create_train_state(run, mesh, max_steps=10)
    params = jax.device_get(state["params"])
    step = train_step.make_train_step(setup, run.train)
    _, metrics = step(state, pipeline.global_batch(batch, setup.batch_sharding), jax.random.key(0))
    model = nnx.merge(setup.graphdef, params)
    inputs = jnp.asarray(batch["inputs"])
    logits = model(inputs.reshape(-1, inputs.shape[-1]), num_steps=cfg.mean_recurrence)
    nll, _ = losses.token_losses(logits, jnp.asarray(batch["labels"]).reshape(-1, inputs.shape[-1]))
    return float(metrics["loss"]), np.asarray(nll).reshape(inputs.shape), setup


@pytest.mark.slow
def test_padded_step_loss_equals_the_official_normalisation():
    rng = np.random.default_rng(1)
    inputs = rng.integers(3, 64, size=(2, 4, 8)).astype(np.int32)  # accumulation 2 x (2 devices x 2 rows)
    labels = rng.integers(3, 64, size=(2, 4, 8)).astype(np.int32)
    real = np.array([[8, 3, 1, 6], [2, 8, 5, 4]])  # real tokens per row; the rest is padding
    labels = np.where(np.arange(8) < real[..., None], labels, losses.IGNORE_INDEX).astype(np.int32)
    batch = {"inputs": inputs, "labels": labels}
    loss, nll, setup = run_one_step("micro_batch", batch)
    assert train_step.rank_rows(setup) == 2
    official = sum(nll[a, r * 2:r * 2 + 2][labels[a, r * 2:r * 2 + 2] >= 0].mean() / 4
                   for a in range(2) for r in range(2))
    assert loss == pytest.approx(official, rel=1e-5)
    global_loss, _, _ = run_one_step("global", batch)
    assert global_loss == pytest.approx(nll[labels >= 0].mean(), rel=1e-5)
    assert abs(global_loss - loss) > 1e-3  # with padding the two normalisations differ


# ---------------------------------------------------------------------------------------------------
# Depth sampling: curriculum counter and lockstep
# ---------------------------------------------------------------------------------------------------


def test_curriculum_advances_on_the_micro_batch_counter():
    cfg = tiny_parcae(sampling_scheme="fixed-curriculum-8", mean_recurrence=6, mean_backprop_depth=2)
    n, k = train_step.draw_depths(cfg, jax.random.key(0), jnp.int32(1), 4, 2, 2, 8)
    # Optimiser step 1 with 4 micro-batches: official model.step = 5, 6, 7, 8 -> t = ceil(p * 4).
    assert np.asarray(n)[:, 0].tolist() == [int(np.ceil(m / 8 * 4)) for m in (5, 6, 7, 8)]
    assert np.all(np.asarray(k) == 2)


@pytest.mark.parametrize("method", ["per-sequence", "per-batch"])
def test_lockstep_shares_depths_across_devices(method):
    base = dict(recurrent_iteration_method=method, mean_recurrence=8, mean_backprop_depth=4)
    free = tiny_parcae(**base)
    locked = tiny_parcae(**base, lockstep_n=True, lockstep_k=True)
    draw = lambda cfg: [np.asarray(x).reshape(3, 4, 8) for x in  # noqa: E731
                        train_step.draw_depths(cfg, jax.random.key(2), jnp.int32(0), 3, 32, 8, 16)]
    n_free, _ = draw(free)
    n_lock, k_lock = draw(locked)
    assert np.array_equal(n_lock[:, 0], n_lock[:, 1]) and np.array_equal(k_lock[:, 0], k_lock[:, 3])
    assert not np.array_equal(n_free[:, 0], n_free[:, 1])  # each device draws its own depths
    if method == "per-batch":  # one pair per device micro-batch
        assert np.all(n_free == n_free[..., :1])


def test_unknown_sampling_scheme_and_skip_initialization_are_refused():
    with pytest.raises(ValueError, match="sampling_scheme 'geometric'"):
        tiny_parcae(sampling_scheme="geometric")
    with pytest.raises(ValueError, match="skip_initialization"):
        tiny_parcae(skip_initialization=True)
    with pytest.raises(ValueError, match="randomize_positions_from 8 is smaller"):
        tiny_parcae(randomize_positions_from=8)


def test_simple_ops_forces_rmsnorm():
    a = tiny_parcae(norm_class_name="LayerNorm", simple_ops=True)
    b = tiny_parcae(norm_class_name="RMSNorm")
    from parcae_jax.model import build_model

    ids = jnp.arange(16).reshape(2, 8) % 60
    h0 = jnp.zeros((2, 8, 32))
    np.testing.assert_allclose(build_model(a, seed=1)(ids, initial_state=h0),
                               build_model(b, seed=1)(ids, initial_state=h0), atol=1e-6)


def test_randomized_positions_are_sorted_distinct_and_per_device():
    cfg = tiny_parcae(randomize_positions_from=64, block_size=16)
    pos = np.asarray(train_step.random_positions(cfg, jax.random.key(0), 6, 3, 16))
    assert pos.shape == (6, 16) and pos.max() < 64
    assert all(np.all(np.diff(p) > 0) for p in pos)  # sorted, no repeats
    assert np.array_equal(pos[0], pos[2]) and not np.array_equal(pos[0], pos[3])


def test_released_configs_are_official_by_default():
    for name in ("parcae_140m", "parcae_370m", "parcae_770m", "parcae_1_3b",
                 "gpt_140m", "gpt_370m", "gpt_770m", "gpt_1_3b"):
        cfg = load_config(f"configs/{name}.py")
        assert cfg.data.packing == "best-fit", name
        assert cfg.train.loss_normalization == "micro_batch", name
        assert cfg.train.skip_first_step and cfg.train.stop_before_last_step, name
        assert cfg.train.tokens_per_param_counts == "unique", name
        model = ModelConfig.from_dict(cfg.model.to_dict())
        assert model.compute_dtype == "bfloat16"  # bf16-mixed, as the official launch
    assert json.dumps(load_config("configs/tiny.py").data.packing) == '"bos"'
