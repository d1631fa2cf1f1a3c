"""CORE and Core-Extended in-context-learning accuracy, by the DCLM protocol (PARCAE_SPEC §9.2).

Per task: the jsonl is shuffled with `Random(1337)` and cut to `max_per_task`; example `idx` gets
`num_fewshot` other examples drawn with `Random(seed + idx).sample` from the (cut) task data. Prompts:

* multiple_choice: few-shot blocks `query + delim + choices[gold]` each followed by a blank line, then
  one prompt per choice `query + delim + choice`; scored span: the tokens after the choices' common
  token prefix; prediction: the choice with the lowest *mean* cross-entropy over its span.
* schema: few-shot blocks `context_options[gold] + delim + continuation`, then one prompt per context
  option `option + delim + continuation`; scored span: the common token suffix; lowest mean CE wins.
* language_modeling: few-shot blocks `strip(context) + delim + continuation`, then the prompt without
  the continuation (whitespace-stripped) and with it; correct iff greedy argmax reproduces every
  continuation token.

Every prompt starts with BOS (`bos_id`: for an official folder the id the tokenizer declares, else 1,
as the official harness; see `runner.core_bos_id`); a prompt longer than `max_seq_len` keeps
its last `max_seq_len` tokens (the span shifts with it). Accuracy is centred on the bundle's random
baseline b (percent): `(acc - b/100) / (1 - b/100)`; CORE = mean centred accuracy over the tasks.

Departures from the official code, all where it would crash: a task whose data file is absent is
reported in `missing`, and one with no more examples than shots in `skipped`; when a cut task holds
fewer than `num_fewshot + 1` examples, few-shot examples come from the whole shuffled task
(`fewshot_pool: "full"`); when the LM prompt without continuation does not tokenise to a prefix of
the prompt with it, the span starts at their common prefix (counted in `prefix_mismatches`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
import zlib
from collections.abc import Callable, Sequence

import jax
import numpy as np

from parcae_jax.errors import ConfigError
from parcae_jax.evaluation.bundle import CORE_LABELS, Bundle, TaskSpec, file_sha256
from parcae_jax.evaluation.scoring import TokenScorer, next_token_rows

SHUFFLE_SEED = 1337
DEFAULT_FEWSHOT_SEED = 1234
FALLBACK_BOS_ID = 1


# ---------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------


def _blocks(examples: Sequence[str]) -> str:
    return "".join(example + "\n\n" for example in examples)


def render_multiple_choice(item: dict, delim: str, fewshot: Sequence[dict]) -> list[str]:
    """One prompt per choice."""
    prefix = _blocks([f"{ex['query']}{delim}{ex['choices'][ex['gold']]}" for ex in fewshot])
    return [f"{prefix}{item['query']}{delim}{choice}" for choice in item["choices"]]


def render_schema(item: dict, delim: str, fewshot: Sequence[dict]) -> list[str]:
    """One prompt per context option, all ending with the same continuation."""
    prefix = _blocks([f"{ex['context_options'][ex['gold']]}{delim}{ex['continuation']}" for ex in fewshot])
    return [f"{prefix}{option}{delim}{item['continuation']}" for option in item["context_options"]]


def render_language_modeling(item: dict, delim: str, fewshot: Sequence[dict]) -> list[str]:
    """[prompt without the continuation (stripped), prompt with it]."""
    prefix = _blocks([f"{str(ex['context']).strip()}{delim}{ex['continuation']}" for ex in fewshot])
    head = f"{prefix}{str(item['context']).strip()}{delim}"
    return [head.strip(), f"{head}{item['continuation']}"]


RENDERERS = {
    "multiple_choice": render_multiple_choice,
    "schema": render_schema,
    "language_modeling": render_language_modeling,
}


# ---------------------------------------------------------------------------------------------------
# Token spans
# ---------------------------------------------------------------------------------------------------


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def common_suffix_length(seqs: Sequence[Sequence[int]]) -> int:
    return common_prefix_length([list(reversed(s)) for s in seqs])


@dataclasses.dataclass
class Example:
    """One scored example: its token sequences and, per sequence, the scored span [start, end)."""

    tokens: list[list[int]]
    starts: list[int]
    ends: list[int]
    gold: int | None  # None for language_modeling
    prefix_mismatch: bool = False
    truncated: bool = False


def with_bos(encode: Callable[[str], list[int]], bos_id: int, text: str) -> list[int]:
    ids = list(encode(text))
    return ids if ids and ids[0] == bos_id else [bos_id, *ids]


def build_example(item: dict, spec: TaskSpec, fewshot: Sequence[dict], encode, bos_id: int,
                  max_seq_len: int) -> Example:
    prompts = RENDERERS[spec.task_type](item, spec.delimiter, fewshot)
    tokens = [with_bos(encode, bos_id, p) for p in prompts]
    mismatch = False
    if spec.task_type == "multiple_choice":
        start = common_prefix_length(tokens)
        starts, ends = [start] * len(tokens), [len(t) for t in tokens]
    elif spec.task_type == "schema":
        suffix = common_suffix_length(tokens)
        ends = [len(t) for t in tokens]
        starts = [e - suffix for e in ends]
    else:
        without, full = tokens
        start = len(without)
        if full[:start] != without:
            mismatch, start = True, common_prefix_length([without, full])
        tokens, starts, ends = [full], [start], [len(full)]
    truncated = False
    for i, seq in enumerate(tokens):
        if len(seq) > max_seq_len:
            crop = len(seq) - max_seq_len
            tokens[i] = seq[crop:]
            starts[i], ends[i] = starts[i] - crop, ends[i] - crop
            truncated = True
        starts[i] = max(starts[i], 1)  # position 0 (BOS, or the first kept token) is never predicted
    gold = None if spec.task_type == "language_modeling" else int(item["gold"])
    return Example(tokens, starts, ends, gold, mismatch, truncated)


def judge(example: Example, scores: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict:
    """{"correct", and "choice_losses" (mean CE per choice) or "n_match"/"n_tokens" (LM)}.

    scores[i] = (ce, pred) of next_token_rows(example.tokens)[i]: position t predicts token t+1, so
    span tokens [s, e) are scored at positions [s-1, e-1)."""
    if example.gold is None:
        (_, pred), s, e, seq = scores[0], example.starts[0], example.ends[0], example.tokens[0]
        match = pred[s - 1:e - 1] == np.asarray(seq[s:e])
        return {"correct": bool(match.all()), "n_match": int(match.sum()), "n_tokens": int(e - s)}
    means = []
    for (ce, _), s, e in zip(scores, example.starts, example.ends, strict=True):
        span = ce[s - 1:e - 1].astype(np.float64)
        means.append(float(span.mean()) if span.size else math.nan)
    # min() over Python floats, as the official code: an empty (NaN) span never wins unless first.
    return {"correct": means.index(min(means)) == example.gold, "choice_losses": means, "gold": example.gold}


def is_correct(example: Example, scores: Sequence[tuple[np.ndarray, np.ndarray]]) -> bool:
    return judge(example, scores)["correct"]


# ---------------------------------------------------------------------------------------------------
# One task
# ---------------------------------------------------------------------------------------------------


def load_task_lines(path) -> list[tuple[int, dict]]:
    """(0-based line in the file, example) for every non-blank line."""
    with open(path, encoding="utf-8") as f:
        return [(i, json.loads(line)) for i, line in enumerate(f) if line.strip()]


def shuffled(data: list) -> list:
    """The task in the official evaluation order (a `Random(1337)` shuffle)."""
    data = list(data)
    random.Random(SHUFFLE_SEED).shuffle(data)
    return data


@dataclasses.dataclass
class PreparedTask:
    spec: TaskSpec
    examples: list[Example]
    fewshot_pool: str  # "task" (official) or "full" (the cut task was too small)

    def rows(self):
        return next_token_rows([seq for ex in self.examples for seq in ex.tokens])


def prepare_task(spec: TaskSpec, full_data: list[dict], cut_data: list[dict], tokenizer, *,
                 fewshot_seed: int, max_seq_len: int, bos_id: int | None = None) -> PreparedTask:
    """Render and tokenise every example of the cut task (few-shot drawn by `Random(seed + idx)`).
    BOS is `bos_id`, else the tokenizer's, else 1."""
    k = spec.num_fewshot
    pool, pool_name = (cut_data, "task") if len(cut_data) > k else (full_data, "full")
    if len(pool) <= k and k > 0:
        raise ConfigError(f"task {spec.label} has {len(full_data)} examples, too few for {k}-shot prompts")
    bos = bos_id if bos_id is not None else getattr(tokenizer, "bos_id", None)
    bos = FALLBACK_BOS_ID if bos is None else bos
    examples = []
    for idx, item in enumerate(cut_data):
        fewshot = []
        if k > 0:
            others = [*range(idx), *range(idx + 1, len(pool))]
            fewshot = [pool[i] for i in random.Random(fewshot_seed + idx).sample(others, k)]
        examples.append(build_example(item, spec, fewshot, tokenizer.encode, bos, max_seq_len))
    return PreparedTask(spec, examples, pool_name)


def task_key(key: jax.Array, label: str) -> jax.Array:
    """A per-task initial-state key, so tasks never share noise streams."""
    return jax.random.fold_in(key, zlib.crc32(label.encode()) & 0x7FFFFFFF)


def score_task(prepared: PreparedTask, scorer: TokenScorer, *, depth: int, key: jax.Array) -> list[dict]:
    """`judge` of each example (all sequences of the task scored in shared batches)."""
    scores = scorer.score(prepared.rows(), depth=depth, key=task_key(key, prepared.spec.label))
    out, i = [], 0
    for ex in prepared.examples:
        out.append(judge(ex, scores[i:i + len(ex.tokens)]))
        i += len(ex.tokens)
    return out


def accuracy(judged: Sequence[dict]) -> float:
    """The fraction correct as a float32 mean, as the official harness computes it."""
    return float(np.mean(np.asarray([j["correct"] for j in judged], np.float32), dtype=np.float32))


# ---------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------


def centered_accuracy(accuracy: float, baseline_percent: float) -> float:
    """(acc - b/100) / (1 - b/100): 0 at chance, 1 when perfect."""
    b = baseline_percent / 100.0
    return (accuracy - b) / (1.0 - b)


def mean_and_pstd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (the official multi-seed report)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std())


def run_suite(suite: str, scorer: TokenScorer, tokenizer, bundle: Bundle, *, depths: Sequence[int],
              keys: Sequence[jax.Array], fewshot_seeds: Sequence[int] = (DEFAULT_FEWSHOT_SEED,),
              max_per_task: int = -1, max_seq_len: int, bos_id: int | None = None,
              on_sample: Callable[[dict], None] | None = None, log=print) -> dict:
    """Evaluate `core` or `core_extended` at every depth, for every (few-shot seed, state key) run.

    `on_sample` receives one record per scored example (task, source_line, depth, fewshot_seed,
    state_seed, correct and the per-choice mean losses or the LM match count), as lm-eval's
    `--log_samples`.

    Returns {"suite", "tasks": {label: settings and data facts}, "missing": [labels], "skipped":
    {label: why (too few examples for the shots)},
    "depths": {depth: {"tasks": {label: accuracy/centered mean, std and runs}, "core_metric",
    "core_metric_std", ["core_extended_metric", ...], "num_tasks", "complete"}}, "bundle": {...}}.
    """
    specs = bundle.suite(suite)
    info, missing, skipped, used_files = {}, [], {}, []
    correct: dict[str, dict[int, list[float]]] = {}  # label -> depth -> accuracy per run
    for spec in specs:
        path = bundle.data_path(spec)
        if path is None:
            missing.append(spec.label)
            log(f"  {spec.label}: missing from the bundle ({spec.dataset_uri})")
            continue
        used_files.append(path)
        t0 = time.perf_counter()
        lines = shuffled(load_task_lines(path))
        full, source_lines = [item for _, item in lines], [line for line, _ in lines]
        cut = full[:max_per_task] if max_per_task > 0 else full
        if spec.num_fewshot >= len(full):  # the official code crashes here; report and go on
            skipped[spec.label] = f"{len(full)} examples, too few for {spec.num_fewshot}-shot prompts"
            log(f"  {spec.label}: skipped ({skipped[spec.label]})")
            continue
        baseline, source = bundle.baseline(spec.label)
        runs: dict[int, list[float]] = {d: [] for d in depths}
        pools, mismatches, truncated = set(), 0, 0
        for seed in fewshot_seeds:
            prepared = prepare_task(spec, full, cut, tokenizer, fewshot_seed=seed, max_seq_len=max_seq_len,
                                    bos_id=bos_id)
            pools.add(prepared.fewshot_pool)
            mismatches = max(mismatches, sum(ex.prefix_mismatch for ex in prepared.examples))
            truncated = max(truncated, sum(ex.truncated for ex in prepared.examples))
            for depth in depths:
                for state_seed, key in enumerate(keys):
                    judged = score_task(prepared, scorer, depth=depth, key=key)
                    runs[depth].append(accuracy(judged))
                    if on_sample is None:
                        continue
                    for idx, record in enumerate(judged):
                        on_sample({"task": spec.label, "source_line": source_lines[idx], "example": idx,
                                   "depth": depth, "fewshot_seed": seed, "state_seed": state_seed, **record})
        correct[spec.label] = runs
        info[spec.label] = {
            **spec.to_dict(),
            "num_examples": len(cut),
            "baseline": baseline,
            "baseline_source": source,
            "fewshot_pool": "full" if "full" in pools else "task",
            "prefix_mismatches": mismatches,
            "truncated_examples": truncated,
            "file": str(path.relative_to(bundle.root)),
            "file_sha256": file_sha256(path)[:16],
            "seconds": round(time.perf_counter() - t0, 2),
        }
        last = runs[depths[-1]]
        log(f"  {spec.label}: acc {np.mean(last):.4f} over {len(cut)} examples "
            f"({spec.num_fewshot}-shot {spec.task_type}, {info[spec.label]['seconds']:.1f}s)")
    by_depth = {str(d): _aggregate(suite, correct, info, d) for d in depths}
    return {
        "suite": suite,
        "fewshot_seeds": list(fewshot_seeds),
        "max_per_task": max_per_task,
        "max_seq_len": max_seq_len,
        "tasks": info,
        "missing": missing,
        "skipped": skipped,
        "depths": by_depth,
        "bundle": {"dir": str(bundle.root), "fingerprint": bundle.fingerprint(used_files)},
    }


def _aggregate(suite: str, correct: dict, info: dict, depth: int) -> dict:
    tasks, runs_centered = {}, {}
    for label, runs in correct.items():
        accs = runs[depth]
        cents = [centered_accuracy(a, info[label]["baseline"]) for a in accs]
        acc_mean, acc_std = mean_and_pstd(accs)
        cen_mean, cen_std = mean_and_pstd(cents)
        tasks[label] = {"accuracy": acc_mean, "accuracy_std": acc_std, "centered": cen_mean,
                        "centered_std": cen_std, "runs": accs}
        runs_centered[label] = cents
    out = {"tasks": tasks, "num_tasks": len(tasks)}
    num_runs = len(next(iter(correct.values()))[depth]) if correct else 0
    core = [label for label in runs_centered if label in CORE_LABELS]
    per_run_core = [float(np.mean([runs_centered[lbl][r] for lbl in core])) for r in range(num_runs)]
    out["core_metric"], out["core_metric_std"] = mean_and_pstd(per_run_core) if core else (None, None)
    out["core_tasks"] = len(core)
    out["complete"] = len(core) == len(CORE_LABELS)
    if suite == "core_extended":
        per_run = [float(np.mean([c[r] for c in runs_centered.values()])) for r in range(num_runs)]
        out["core_extended_metric"], out["core_extended_metric_std"] = (
            mean_and_pstd(per_run) if per_run else (None, None))
    return out
