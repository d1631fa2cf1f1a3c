"""KV-cached generation: cache vs no-cache equality, sampling, stop tokens, streaming, adaptive depth,
compressed (fixed-budget) caches and the official lookup rules, the depth report and the CLI."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import perturbed, tiny_gpt_model, tiny_parcae, tiny_parcae_model, write_token_dataset

from parcae_jax import depth_report, engine, kv_cache, loading, losses
from parcae_jax import generate as cli
from parcae_jax.model import build_model, init_state
from parcae_jax.sampling import Sampling, sample_tokens

PROMPTS = [[1, 5, 9, 3, 22, 40, 7], [1, 17, 2]]  # different lengths: right-padded, per-row positions
NEW = 8
MAX_DEPTH = 6


parcae_model = tiny_parcae_model  # shared with test_model (seed 1, perturbed)
gpt_model = tiny_gpt_model


_full_forward = nnx.jit(lambda m, ids, h0, n: m(ids, num_steps=n, initial_state=h0))


def recompute_greedy(model, prompts, h0_all, num_steps, max_len):
    """Greedy decoding without a cache: the whole prefix through `model(...)` for every new token.
    The prefix is right-padded to max_len (causal: padding after it changes nothing before it) so one
    compiled program serves every length; position p gets initial state h0_all[b, p]."""
    out = []
    for b, prompt in enumerate(prompts):
        seq = list(prompt)
        h0 = None if h0_all is None else h0_all[b : b + 1]
        for _ in range(NEW):
            ids = np.zeros((1, max_len), np.int32)
            ids[0, : len(seq)] = seq
            logits = _full_forward(model, jnp.asarray(ids), h0, num_steps)
            seq.append(int(jnp.argmax(logits[0, len(seq) - 1, : model.config.vocab_size])))
        out.append(seq[len(prompt) :])
    return out


@functools.partial(nnx.jit, static_argnames="plan")
def _chunk(model, cache, ids, positions, h0, num_steps, eps, plan):
    return kv_cache.forward_chunk(model, cache, ids, positions, h0, num_steps, eps, plan)


def chunk_then_decode(model, ids, h0, num_steps, eps, plan, prefix):
    """The first `prefix` tokens in one chunk, then the rest one token per call (teacher-forced)."""
    cache = kv_cache.init_cache(model.config, ids.shape[0], plan)
    pos = jnp.arange(ids.shape[1])[None]
    head = slice(0, prefix)
    logits, cache, depth = _chunk(model, cache, ids[:, head], pos[:, head], h0[:, head], num_steps, eps, plan)
    outs, depths = [logits], [depth]
    for p in range(prefix, ids.shape[1]):
        logits, cache, depth = _chunk(model, cache, ids[:, p : p + 1], pos[:, p : p + 1], h0[:, p : p + 1],
                                      num_steps, eps, plan)
        outs.append(logits)
        depths.append(depth)
    return jnp.concatenate(outs, 1), jnp.concatenate(depths, 1), cache


def random_sequence(model, T=12, seed=0):
    cfg = model.config
    ids = jax.random.randint(jax.random.key(seed), (1, T), 0, cfg.vocab_size)
    return ids, init_state(jax.random.key(seed + 1), cfg, (1, T, cfg.d_rec))


# ---------------------------------------------------------------------------------------------------
# Cache vs no cache
# ---------------------------------------------------------------------------------------------------


def test_greedy_parcae_with_cache_equals_no_cache_recomputation():
    model = parcae_model()
    compiled = []
    for depth in (1, 3, MAX_DEPTH):
        result = engine.generate(model, PROMPTS, max_new_tokens=NEW, num_steps=depth, max_depth=MAX_DEPTH,
                              sampling=Sampling(temperature=0.0), key=3)
        compiled.append((engine._prefill._cache_size(), engine._decode_loop._cache_size()))
        expected = recompute_greedy(model, PROMPTS, result.initial_state, depth, result.plan.max_len)
        assert result.tokens == expected, depth
        assert result.depths == [[depth] * NEW] * 2
    assert compiled[0] == compiled[-1]  # the depth is a runtime value: no recompilation
    assert result.tokens != engine.generate(model, PROMPTS, max_new_tokens=NEW, num_steps=1,
                                            max_depth=MAX_DEPTH, sampling=Sampling(0.0), key=3).tokens


def test_greedy_gpt_with_cache_equals_no_cache_recomputation():
    model = gpt_model()  # GQA (1 kv head) on this one
    result = engine.generate(model, PROMPTS, max_new_tokens=NEW, sampling=Sampling(temperature=0.0))
    assert result.initial_state is None
    assert result.tokens == recompute_greedy(model, PROMPTS, None, None, result.plan.max_len)


# ---------------------------------------------------------------------------------------------------
# Sampling, stop tokens, streaming
# ---------------------------------------------------------------------------------------------------


def test_sampling_rules():
    logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
    greedy = jnp.argmax(logits, -1)
    key = jax.random.key(1)
    np.testing.assert_array_equal(sample_tokens(logits, key, Sampling(temperature=0.0)), greedy)
    np.testing.assert_array_equal(sample_tokens(logits, key, Sampling(top_k=1)), greedy)
    np.testing.assert_array_equal(sample_tokens(logits, key, Sampling(top_p=1e-6)), greedy)
    keys = jax.random.split(key, 400)
    draws = jax.vmap(lambda k: sample_tokens(logits, k, Sampling(top_k=3)))(keys)
    top3 = jax.lax.top_k(logits, 3)[1]
    assert all(set(np.asarray(draws[:, b])) == set(np.asarray(top3[b])) for b in range(4))
    # Nucleus: the smallest set of most likely tokens whose mass reaches top_p.
    probs = np.asarray(jax.nn.softmax(logits, -1))
    draws = jax.vmap(lambda k: sample_tokens(logits, k, Sampling(top_p=0.7)))(keys)
    for b in range(4):
        order = np.argsort(-probs[b])
        n = int(np.searchsorted(np.cumsum(probs[b][order]), 0.7)) + 1
        assert set(np.asarray(draws[:, b])) <= set(order[:n].tolist())


def test_streaming_equals_single_loop_and_stop_tokens_are_per_row():
    model = parcae_model()
    kw = dict(max_new_tokens=NEW, num_steps=3, max_depth=MAX_DEPTH, key=5,
              sampling=Sampling(temperature=0.9, top_k=20, top_p=0.95))
    free = engine.generate(model, PROMPTS, **kw)
    assert all(len(t) == NEW and all(0 <= x < model.config.vocab_size for x in t) for t in free.tokens)
    stop = free.tokens[0][2]
    cut = free.tokens[0].index(stop) + 1
    seen = []

    def on_token(t, tok, done):
        seen.append((t, tok.tolist(), done.tolist()))

    stopped = engine.generate(model, PROMPTS, stop_tokens=[[stop], []], on_token=on_token, **kw)
    assert stopped.tokens == [free.tokens[0][:cut], free.tokens[1]]
    assert stopped.tokens == engine.generate(model, PROMPTS, stop_tokens=[[stop], []], **kw).tokens
    assert [t for t, _, _ in seen] == list(range(NEW))
    assert [tok[1] for _, tok, _ in seen] == free.tokens[1]
    assert [tok[0] for _, tok, _ in seen] == free.tokens[0][:cut] + [-1] * (NEW - cut)
    assert seen[cut - 1][2] == [True, False]


# ---------------------------------------------------------------------------------------------------
# Adaptive depth
# ---------------------------------------------------------------------------------------------------


def test_adaptive_chunk_equals_token_by_token_decoding():
    """Residual exit: the same depths and logits whether a text is run as one chunk or token by token
    (exited tokens' later core steps are served from their last K/V in both)."""
    model = parcae_model()
    ids, h0 = random_sequence(model)
    plan = kv_cache.CachePlan(max_len=12, max_depth=8, exit_criterion="residual")
    depth_sets = []
    for eps in (0.01, 0.05):
        cache = kv_cache.init_cache(model.config, 1, plan)
        full, _, depth = _chunk(model, cache, ids, jnp.arange(12)[None], h0, 8, eps, plan)
        step, step_depth, _ = chunk_then_decode(model, ids, h0, 8, eps, plan, prefix=4)
        np.testing.assert_array_equal(step_depth, depth)
        np.testing.assert_allclose(step, full, atol=1e-5)
        depth_sets.append(set(np.asarray(depth).ravel().tolist()))
    assert any(len(s) > 1 for s in depth_sets)  # some tokens exited earlier than others
    assert max(depth_sets[0]) < 8  # and every token exited before the cap at eps=0.05


def test_frozen_exited_tokens_serve_kv_recomputed_from_their_frozen_state():
    """exited_kv="frozen" (per-token training semantics): still chunking-independent, and tokens after
    an early exiter see other K/V than with "last"."""
    model = parcae_model()
    ids, h0 = random_sequence(model)
    frozen = kv_cache.CachePlan(max_len=12, max_depth=8, exit_criterion="residual", exited_kv="frozen")
    last = dataclasses.replace(frozen, exited_kv="last")
    out = {}
    for plan in (frozen, last):
        cache = kv_cache.init_cache(model.config, 1, plan)
        out[plan.exited_kv] = _chunk(model, cache, ids, jnp.arange(12)[None], h0, 8, 0.05, plan)
    step, step_depth, _ = chunk_then_decode(model, ids, h0, 8, 0.05, frozen, prefix=4)
    logits, cache, depth = out["frozen"]
    np.testing.assert_array_equal(step_depth, depth)
    np.testing.assert_allclose(step, logits, atol=1e-5)
    depth = np.asarray(depth)[0]
    first_early = int(np.argmax(depth < depth.max()))
    assert depth[first_early] < depth.max() and first_early < 11
    np.testing.assert_allclose(out["last"][0][:, : first_early + 1], logits[:, : first_early + 1], atol=1e-6)
    assert np.abs(out["last"][0][:, first_early + 1 :] - logits[:, first_early + 1 :]).max() > 1e-5
    K = np.asarray(cache["core"][0])
    d, R = depth[first_early], model.config.n_core
    assert not np.allclose(K[d * R, 0, first_early], K[(d - 1) * R, 0, first_early])


@pytest.mark.parametrize("eps", [0.01, 1e9])
def test_exited_tokens_serve_their_last_kv_for_later_steps(eps):
    model = parcae_model()
    ids, h0 = random_sequence(model)
    plan = kv_cache.CachePlan(max_len=12, max_depth=8, exit_criterion="residual")
    cache = kv_cache.init_cache(model.config, 1, plan)
    _, cache, depth = _chunk(model, cache, ids, jnp.arange(12)[None], h0, 8, eps, plan)
    depth = np.asarray(depth)[0]
    K, V = (np.asarray(x) for x in cache["core"])
    R = model.config.n_core
    checked = 0
    for p, d in enumerate(depth):
        for r in range(d, 8):
            for j in range(R):
                np.testing.assert_array_equal(K[r * R + j, 0, p], K[(d - 1) * R + j, 0, p])
                np.testing.assert_array_equal(V[r * R + j, 0, p], V[(d - 1) * R + j, 0, p])
                checked += 1
        assert not np.array_equal(K[0, 0, p], K[R, 0, p]) or d == 1  # steps differ while iterating
    assert checked > 0
    if eps > 1:
        assert (depth == 1).all()


def test_depth_report_eps_zero_is_fixed_depth_and_huge_eps_is_depth_one():
    model = parcae_model()
    cfg = model.config
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(2):
        tokens = rng.integers(0, cfg.vocab_size, (2, 13)).astype(np.int32)
        labels = tokens[:, 1:].copy()
        labels[1, 8:] = losses.IGNORE_INDEX  # a padded row tail
        batches.append({"inputs": tokens[:, :-1], "labels": labels})
    rows = depth_report.adaptive_depth_report(model, batches, [0.0, 0.05, 1e9], num_steps=MAX_DEPTH, key=4)
    fixed, zero, mid, huge = rows
    assert fixed["criterion"] == "fixed" and fixed["mean_depth"] == MAX_DEPTH
    assert fixed["tokens"] == 2 * (2 * 12 - 4)
    # Fixed depth through the cache equals the model's own forward with the same initial states.
    nll = 0.0
    for i, b in enumerate(batches):
        h0 = init_state(jax.random.fold_in(jax.random.key(4), i), cfg, (2, 12, cfg.d_rec))
        logits = _full_forward(model, jnp.asarray(b["inputs"]), h0, MAX_DEPTH)
        nll += float(losses.cross_entropy(logits, jnp.asarray(b["labels"]))[1]["nll_sum"])
    assert fixed["loss"] == pytest.approx(nll / fixed["tokens"], rel=1e-5)
    assert zero["mean_depth"] == MAX_DEPTH
    assert (zero["loss"], zero["accuracy"]) == (fixed["loss"], fixed["accuracy"])  # bit-identical
    assert 1 < mid["mean_depth"] < MAX_DEPTH
    assert huge["mean_depth"] == 1.0
    depth_one = depth_report.adaptive_depth_report(model, batches, [], num_steps=1, key=4)[0]
    assert huge["loss"] == pytest.approx(depth_one["loss"], abs=1e-6)
    assert huge["delta_loss"] == pytest.approx(huge["loss"] - fixed["loss"])
    kl_rows = depth_report.adaptive_depth_report(model, batches, [0.0, 1e9], num_steps=MAX_DEPTH, key=4,
                                        criterion="kl")
    assert kl_rows[1]["loss"] == fixed["loss"] and kl_rows[1]["mean_depth"] == MAX_DEPTH
    assert kl_rows[2]["mean_depth"] == 1.0
    table = depth_report.format_report(rows)
    assert table.count("\n") == 5 and "| residual | 0.05 |" in table


def test_generation_with_exit_eps_zero_equals_fixed_depth():
    model = parcae_model()
    kw = dict(max_new_tokens=NEW, num_steps=MAX_DEPTH, max_depth=MAX_DEPTH, sampling=Sampling(0.0), key=3)
    fixed = engine.generate(model, PROMPTS, **kw)
    adaptive = engine.generate(model, PROMPTS, exit_eps=0.0, **kw)
    assert adaptive.tokens == fixed.tokens and adaptive.depths == fixed.depths
    early = engine.generate(model, PROMPTS, exit_eps=1e9, **kw)
    assert early.mean_depth == 1.0 and early.prompt_depths == [[1] * len(p) for p in PROMPTS]


# ---------------------------------------------------------------------------------------------------
# Fixed-budget caches (official compress-* lookups)
# ---------------------------------------------------------------------------------------------------


def test_lookup_rules_match_the_official_mapping_on_examples():
    # P=2 prelude layers, R=2 core layers, N=8 recurrences: core steps are virtual indices 2..17,
    # (recurrence r, layer j) -> 2 + 2r + j; coda layers 18, 19.
    def idx(lookup, r, j, N=8, P=2, R=2):
        return kv_cache.official_step_index(lookup, P + r * R + j, P, R, N)

    assert [idx("full", r, 1) for r in range(8)] == [3, 5, 7, 9, 11, 13, 15, 17]
    assert [idx("compress-first2", r, 1) for r in range(8)] == [3, 5, 7, 7, 7, 7, 7, 7]
    assert [idx("compress-last2", r, 0) for r in range(8)] == [2, 2, 2, 2, 2, 2, 4, 6]
    assert [idx("compress-stride3", r, 1) for r in range(8)] == [3, 3, 3, 5, 5, 5, 7, 7]
    assert [idx("compress-boundaries", r, 0) for r in range(8)] == [2] * 7 + [4]
    assert [idx("compress-s3", r, 0) for r in range(8)] == [2, 4, 6, 2, 4, 6, 2, 4]
    assert [idx("compress-r3", r, j) for r in range(3) for j in range(2)] == [2, 2, 2, 3, 3, 3]
    for lookup in ("full", "compress-s3", "compress-anchor"):  # prelude and coda never move
        assert [kv_cache.official_step_index(lookup, i, 2, 2, 8) for i in (0, 1, 18, 19)] == [0, 1, 18, 19]
    # compress-anchor as written for P=2, R=4: keep indices < 2 + 32, then 34 + (i - 34) % 4.
    for i in range(2, 2 + 4 * 12):
        literal = i if i - 2 < 32 else 34 + (i - 34) % 4
        assert kv_cache.official_step_index("compress-anchor", i, 2, 4, 12) == literal
    assert kv_cache.num_core_slots("full", 8, 2) == 16
    assert kv_cache.num_core_slots("compress-s3", 8, 2) == 6
    assert kv_cache.num_core_slots("compress-first2", 8, 2) == 6
    assert kv_cache.num_core_slots("compress-last2", 8, 2) == 6
    assert kv_cache.num_core_slots("compress-boundaries", 8, 2) == 4
    assert kv_cache.num_core_slots("compress-anchor", 12, 4) == 36
    assert kv_cache.budget_lookup(4) == "compress-s4"
    for bad in ("compress-x2", "compress-s", "compress-s0", "partial"):
        with pytest.raises(ValueError):
            kv_cache.parse_lookup(bad)


def test_cache_budget_at_least_the_depth_equals_the_full_cache():
    model = parcae_model()
    ids, h0 = random_sequence(model)
    results = {}
    for lookup in ("full", "compress-s6", "compress-s2"):
        plan = kv_cache.CachePlan(max_len=12, max_depth=MAX_DEPTH, lookup=lookup)
        logits, _, _ = chunk_then_decode(model, ids, h0, MAX_DEPTH, 0.0, plan, prefix=1)
        results[lookup] = np.asarray(logits)
    np.testing.assert_array_equal(results["compress-s6"], results["full"])
    # Shared slots: later tokens read the last step written to a slot instead of their own step's.
    np.testing.assert_array_equal(results["compress-s2"][:, 0], results["full"][:, 0])
    assert np.all(np.isfinite(results["compress-s2"]))
    assert np.abs(results["compress-s2"][:, 1:] - results["full"][:, 1:]).max() > 1e-4


def test_generation_with_a_cache_budget_runs_and_bounds_the_core_cache():
    model = parcae_model()
    result = engine.generate(model, PROMPTS, max_new_tokens=NEW, num_steps=MAX_DEPTH, cache_budget=2,
                          sampling=Sampling(0.0), key=3)
    assert result.plan.lookup == "compress-s2"
    core = kv_cache.init_cache(model.config, 2, result.plan)["core"][0]
    assert core.shape[0] == 2 * model.config.n_core  # instead of MAX_DEPTH * n_core
    assert all(len(t) == NEW and all(0 <= x < model.config.vocab_size for x in t) for t in result.tokens)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_generates_from_a_saved_model_and_prints_the_depth_report(tmp_path, capsys):
    from parcae_jax.data.tokenizer import train_tokenizer
    from parcae_jax.pretrained import save_pretrained

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog {i % 7}"
                                for i in range(300)))
    model_dir = tmp_path / "model"
    save_pretrained(perturbed(build_model(tiny_parcae(vocab_size=320), seed=1)), model_dir)
    train_tokenizer([str(corpus)], 320, str(model_dir / "tokenizer"), log=lambda *_: None)
    assert loading.find_tokenizer(loading.load_model(model_dir)) == str(model_dir / "tokenizer")

    assert cli.main(["--model", str(model_dir), "--prompt", "the quick", "--temperature", "0",
                     "--max-new-tokens", "5", "--num-steps", "2", "--exit-eps", "1e-3"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("the quick") and len(out) > len("the quick\n")
    assert "mean depth" in err
    # A prompt the model cannot serve is refused in one line before anything is echoed.
    assert cli.main(["--model", str(model_dir), "--prompt", "the quick " * 40, "--max-new-tokens", "5"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "exceeds the model's block_size 32" in err

    data = write_token_dataset(tmp_path / "data", vocab_size=320, docs=20, val_docs=6)
    args = "--eps 0,1e9 --num-steps 3 --block-size 16 --batch-size 2 --max-batches 1".split()
    assert cli.main(["report", "--model", str(model_dir), "--data", data, *args]) == 0
    out, _ = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(lines) == 4  # header + fixed + two eps
    assert lines[1].startswith("| fixed | - | 3.00 |") and lines[3].startswith("| residual | 1e+09 | 1.00 |")
