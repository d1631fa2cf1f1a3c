"""Generation throughput: prefill and decode tokens/s with the KV cache, at several recurrence depths.

    python -m parcae_jax.bench.generate --config configs/tiny.py [--config.a.b=v ...] [--batch 1]
        [--prompt-len 64] [--new-tokens 64] [--depths 1,4,8] [--repeats 3] [--stream]
        [--exit-eps EPS] [--cache-budget K | --lookup compress-...]

Random weights (the config's init), random prompts, no stop tokens. One cache sized for the largest
depth serves every depth, so everything compiles once (the first, untimed call); each depth then
runs `--repeats` times and the median is reported. Prefill: batch × prompt-len tokens in one call.
Decode: batch × (new-tokens − 1) tokens in one `lax.while_loop` (or, with `--stream`, one jitted call
per token driven from Python, as the CLI streams). GPT configs run once (no depth).
With `--exit-eps` the depth is adaptive; on random weights that only measures the exit's overhead.
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np

from parcae_jax import errors, flops
from parcae_jax.cli_config import load_config, split_config_args
from parcae_jax.config import ModelConfig
from parcae_jax.engine import generate
from parcae_jax.kv_cache import cache_bytes, init_cache
from parcae_jax.model import build_model
from parcae_jax.sampling import Sampling


def bench(model, *, batch: int, prompt_len: int, new_tokens: int, depths: list[int], repeats: int,
          stream: bool = False, **kwargs) -> list[dict]:
    """One row per depth: prefill and decode tokens/s (medians over `repeats`) and the mean depth used."""
    cfg = model.config
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, (batch, prompt_len)).tolist()
    parcae = cfg.arch == "parcae"
    depths = depths if parcae else [None]
    common = dict(max_new_tokens=new_tokens, sampling=Sampling(temperature=1.0), key=0,
                  max_depth=max(depths) if parcae else None, **kwargs)
    if stream:
        common["on_token"] = lambda *_: None
    generate(model, prompts, num_steps=depths[0], **common)  # compile
    rows = []
    for depth in depths:
        runs = [generate(model, prompts, num_steps=depth, **common) for _ in range(repeats)]
        prefill_s = float(np.median([r.prefill_s for r in runs]))
        decode_s = float(np.median([r.decode_s for r in runs]))
        decoded = batch * (new_tokens - 1)
        rows.append({
            "depth": depth,
            "prefill_tok_s": batch * prompt_len / prefill_s,
            "decode_tok_s": decoded / decode_s if decoded else float("nan"),
            "decode_ms_per_step": 1e3 * decode_s / max(new_tokens - 1, 1),
            "mean_depth": runs[-1].mean_depth if parcae else None,
            "plan": runs[-1].plan,
        })
    return rows


def _print(model, rows, args) -> None:
    cfg = model.config
    plan = rows[0]["plan"]
    cache_mib = cache_bytes(init_cache(cfg, args.batch, plan)) / 2**20
    mode = "stream (one call per token)" if args.stream else "while_loop"
    exit_ = f", exit eps {args.exit_eps:g}" if args.exit_eps is not None else ""
    print(f"== {cfg.name or cfg.arch} ({flops.param_counts(cfg).unique / 1e6:.1f}M params) on "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}")
    print(f"   batch {args.batch}, prompt {args.prompt_len}, new {args.new_tokens}, decode {mode}, "
          f"cache {cache_mib:.1f} MiB ({plan.lookup}, max depth {plan.max_depth}){exit_}")
    print("| depth | prefill tok/s | decode tok/s | decode ms/step | mean depth used |")
    print("|---|---|---|---|---|")
    for r in rows:
        depth = "-" if r["depth"] is None else r["depth"]
        used = "-" if r["mean_depth"] is None else f"{r['mean_depth']:.2f}"
        print(f"| {depth} | {r['prefill_tok_s']:,.0f} | {r['decode_tok_s']:,.0f} | "
              f"{r['decode_ms_per_step']:.2f} | {used} |")


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config_path, overrides, rest = split_config_args(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--depths", default="1,4,8", help="comma list of recurrence counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stream", action="store_true", help="time the per-token (streaming) decode")
    parser.add_argument("--exit-eps", type=float, default=None)
    parser.add_argument("--exit-criterion", default="residual", choices=("residual", "kl"))
    parser.add_argument("--cache-budget", type=int, default=None)
    parser.add_argument("--lookup", default="full")
    args = parser.parse_args(rest)
    if config_path is None:
        parser.error("--config FILE is required")
    run_cfg = load_config(config_path, overrides)
    cfg = ModelConfig.from_dict(run_cfg.model.to_dict())
    if args.prompt_len + args.new_tokens > cfg.rope_table_length:
        parser.error(f"prompt-len + new-tokens must be <= block_size {cfg.rope_table_length}")
    model = build_model(cfg, seed=int(run_cfg.train.seed))
    rows = bench(model, batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                 depths=[int(d) for d in args.depths.split(",")], repeats=args.repeats, stream=args.stream,
                 exit_eps=args.exit_eps, exit_criterion=args.exit_criterion, lookup=args.lookup,
                 cache_budget=args.cache_budget)
    _print(model, rows, args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default sys.argv[1:]) in the error boundary; its exit status."""
    return errors.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
