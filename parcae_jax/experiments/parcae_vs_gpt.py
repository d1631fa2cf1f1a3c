"""parcae-vs-gpt: a Parcae and its parameter-matched GPT on the same tokens.

The paper's claim: at equal parameters and data, the looped Parcae reaches a lower validation loss
than the GPT (it spends more FLOPs per token on the same weights); the comparison at equal FLOPs is
the harder one. The pair keeps the released pairs' shape ratio (Parcae P = R = C layers, GPT 3× as
many layers, same width, heads, MLP and vocabulary), so both have the same unique parameters up to
the injection.

Three runs, one seed, the same data order and recipe:
* `parcae`: the Parcae for N steps (its FLOPs per token at the expected depth split);
* `gpt_tokens`: the GPT for the same N steps (equal tokens);
* `gpt_flops`: the GPT for as many steps as the Parcae's training FLOPs buy it (equal FLOPs).
Validation runs along the way, so the curves against tokens and against FLOPs are drawn from the
same runs. With `--bundle DIR` (a DCLM-layout eval bundle), each final model is also scored on its CORE
tasks (`eval.py`'s core task at the training depth, `--max-per-task` examples per task).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from parcae_jax.experiments import common
from parcae_jax.scaling import sweep

SCALES = {
    "micro": {"steps": 4, "batch": 8, "evals": 2},
    "cpu": {"steps": 400, "batch": 16, "evals": 8},
    "gpu": {"tokens": 1_000_000_000, "batch": 128, "evals": 10},
    "tpu": {"tokens": 4_000_000_000, "batch": 256, "evals": 10},
}
CPU_GPT = (
    "model.n_embd=64",
    "model.num_attention_heads=2",
    "model.num_key_value_heads=2",
    "model.intermediate_size=256",
    "model.n_layer=3",
    "model.block_size=128",
)
MICRO_GPT = (
    "model.n_embd=32",
    "model.num_attention_heads=2",
    "model.num_key_value_heads=2",
    "model.intermediate_size=64",
    "model.n_layer=3",
    "model.block_size=32",
)
GPT_BASE = {
    "micro": "configs/tiny.py:gpt",
    "cpu": "configs/tiny.py:gpt",
    "gpu": "configs/gpt_140m.py",
    "tpu": "configs/gpt_140m.py",
}


def runs(scale: str, data_dir: str | None) -> list[common.Run]:
    spec = SCALES[scale]
    setup = common.scale_setup(scale, spec)
    data = common.data_overrides(data_dir, common.dataset_vocab(data_dir))
    evals = _eval_every(spec)
    parcae = common.Run("parcae", (*setup.shape, *setup.train, *data, *setup.stop, *evals), base=setup.base)
    gpt_base = GPT_BASE[scale]
    gpt = (*{"micro": MICRO_GPT, "cpu": CPU_GPT}.get(scale, ()), *setup.train, *data)
    p = sweep.make_point("parcae", setup.base, list(parcae.overrides), "/nonexistent")
    g = sweep.make_point("gpt", gpt_base, [*gpt, *setup.stop], "/nonexistent")
    # Equal FLOPs: the GPT's steps that cost what the Parcae's training cost (official FLOP formula).
    flops_steps = max(1, round(p.total_flops / (g.flops_per_token * g.tokens_per_step)))
    flops_stop = (
        (f"train.max_tokens={flops_steps * g.tokens_per_step}",)
        if setup.stop[0].startswith("train.max_tokens")
        else (f"train.max_steps={flops_steps}",)
    )
    flops_cadence = (f"train.checkpoint_every={max(1, flops_steps // 3)}",)
    return [
        parcae,
        common.Run("gpt_tokens", (*gpt, *setup.stop, *evals), base=gpt_base),
        common.Run("gpt_flops", (*gpt, *flops_stop, *flops_cadence, *evals), base=gpt_base),
    ]


CORE_FILE = "core.json"


def score_bundle(points, root, bundle: str, max_per_task: int, say) -> dict:
    """CORE accuracies of each run's final model; `ROOT/<run>/core.json` keeps a finished score, so a
    re-run only scores what is missing. In process: the runs are small (a GPU/TPU-scale run can score
    with `python -m parcae_jax.eval --config configs/eval.py:core` on its workdir instead)."""
    from parcae_jax.cli_config import load_config
    from parcae_jax.evaluation import config as eval_config
    from parcae_jax.evaluation import runner

    out = {}
    for p in points:
        path = pathlib.Path(root) / p.name / CORE_FILE
        if not path.exists():
            say(f"{p.name}: CORE on {bundle} ({max_per_task} examples per task)")
            overrides = [f"checkpoint={p.workdir}", f"bundle_dir={bundle}", f"max_per_task={max_per_task}",
                         f"output={path}"]  # fmt: skip
            runner.run(load_config(f"{eval_config.__file__}:core", overrides), log=lambda *a, **k: None)
        core = json.loads(path.read_text())["tasks"]["core"]
        (depth,) = core["depths"].values()  # the model's training depth
        out[p.name] = {"core_metric": depth["core_metric"], "core_tasks": depth["core_tasks"],
                       "accuracy": {t: v["accuracy"] for t, v in depth["tasks"].items()},
                       "max_per_task": max_per_task}  # fmt: skip
    return out


def _eval_every(spec: dict) -> tuple[str, ...]:
    """Validation `evals` times over the Parcae's length (so the GPT runs share the same token grid)."""
    steps = spec["steps"] if "steps" in spec else spec["tokens"] // (spec["batch"] * 2048)
    return (f"train.eval_every={max(1, steps // spec['evals'])}",)


def curve(rows: list[dict], depth: int) -> dict:
    """Validation loss against tokens and FLOPs: a Parcae's at its training depth (`val_loss_<depth>`),
    a GPT's single `val_loss`."""
    out = {"tokens": [], "flops": [], "val_loss": []}
    for r in rows:
        value = r.get(f"val_loss_{depth}", r.get("val_loss"))
        if value is not None:
            out["tokens"].append(r["tokens"])
            out["flops"].append(r["flops"])
            out["val_loss"].append(value)
    return out


def analyze(points, outcomes: dict[str, dict], scale: str) -> dict:
    runs = {}
    for p in points:
        o = outcomes[p.name]
        runs[p.name] = {
            "state": o["state"],
            "steps": p.steps,
            "tokens": p.trained_tokens,
            "params": p.params,
            "flops_per_token": p.flops_per_token,
            "training_flops": p.total_flops,
            "final_val_loss": o["result"]["val_loss"] if o["result"] else None,
            "curve": curve(o["rows"], p.mean_recurrence),
        }
    parcae, gpt_t, gpt_f = (runs[n]["final_val_loss"] for n in ("parcae", "gpt_tokens", "gpt_flops"))
    verdict = {}
    if None not in (parcae, gpt_t, gpt_f):
        verdict = {
            "equal_tokens": {"parcae": parcae, "gpt": gpt_t, "parcae_minus_gpt": parcae - gpt_t},
            "equal_flops": {"parcae": parcae, "gpt": gpt_f, "parcae_minus_gpt": parcae - gpt_f},
            "parcae_better_at_equal_tokens": parcae < gpt_t,
            "parcae_better_at_equal_flops": parcae < gpt_f,
        }
    return {"runs": runs, "verdict": verdict}


def draw(results: dict, out) -> list[str]:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {
        "parcae": ("C0", "-", "Parcae"),
        "gpt_tokens": ("C1", "--", "GPT, equal tokens"),
        "gpt_flops": ("C3", ":", "GPT, equal FLOPs"),
    }
    for name, run in results["runs"].items():
        color, ls, label = styles[name]
        c = run["curve"]
        axes[0].plot(
            np.array(c["tokens"]) / 1e6, c["val_loss"], color=color, ls=ls, marker="o", ms=3, label=label
        )
        axes[1].plot(np.array(c["flops"]), c["val_loss"], color=color, ls=ls, marker="o", ms=3, label=label)
    axes[0].set_xlabel("training tokens (M)")
    axes[1].set_xlabel("training FLOPs (official formula)")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_title("at equal tokens")
    axes[1].set_title("at equal FLOPs")
    return [common.save(fig, out / "val_loss_tokens_flops.png")]


def summary(results: dict) -> list[str]:
    lines = [f"{'run':<12} {'steps':>6} {'tokens':>11} {'FLOPs':>10} {'val loss':>9}"]
    for name, r in results["runs"].items():
        loss = f"{r['final_val_loss']:.4f}" if r["final_val_loss"] is not None else "-"
        lines.append(f"{name:<12} {r['steps']:>6} {r['tokens']:>11,} {r['training_flops']:>10.3g} {loss:>9}")
    for name, core in results.get("core", {}).items():
        value = core["core_metric"]
        lines.append(f"{name}: CORE {value:.4f} over {core['core_tasks']} tasks" if value is not None
                     else f"{name}: no CORE task in the bundle")  # fmt: skip
    v = results["verdict"]
    if v:
        lines.append(
            f"equal tokens: Parcae {v['equal_tokens']['parcae_minus_gpt']:+.4f} vs GPT; "
            f"equal FLOPs: Parcae {v['equal_flops']['parcae_minus_gpt']:+.4f} vs GPT"
        )
    return lines
