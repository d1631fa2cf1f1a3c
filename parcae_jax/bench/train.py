"""Training throughput of any config: tokens/s, MFU, step time and peak device memory.

    python -m parcae_jax.bench.train --config configs/parcae_140m.py [--config.a.b=v ...]
        [--batch 8] [--seq-len 1024] [--steps 10] [--warmup 2] [--gpt-baseline]
        [--attention auto|xla|cudnn|splash] [--loss-chunk-len 512] [--depth-groups 8] [--compile-only]

Runs the real jitted train step (sharded over all local devices, AOT-compiled, donated state) on
random tokens. `--batch` overrides the world batch (one micro-batch per step unless
`--config.train.micro_batch_size` says otherwise) and `--seq-len` the block size, so a big config fits
a small machine. `--gpt-baseline` also benchmarks the GPT of the same size (configs/gpt_*.py naming).

FLOPs per token for MFU are the *hardware* FLOPs (`flops.hardware_flops_per_token`: causal attention
halved, head matmul counted, remat recompute counted) at the expected recurrence split; the official
budget formula is printed next to them. On CPU the peak is unknown and MFU is reported as n/a.
For a looped model it also prints the recurrences executed per sequence against those sampled (the
price of looping a group of sequences to its largest sampled depth; `--depth-groups` sorts and groups
them). This script is the only source of the performance figures in the README.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

from parcae_jax import errors, flops, sharding, train_step
from parcae_jax.cli_config import load_config, split_config_args
from parcae_jax.config import ATTENTION_IMPLS


def _peak_memory_bytes() -> int | None:
    stats = [d.memory_stats() for d in jax.local_devices()]
    if not stats or stats[0] is None:
        return None
    return max(s.get("peak_bytes_in_use", 0) for s in stats)


def bench(run_cfg, *, steps: int, warmup: int, compile_only: bool = False) -> dict:
    mesh = sharding.make_mesh(run_cfg.mesh.data, run_cfg.mesh.fsdp, run_cfg.mesh.tensor)
    setup, state = train_step.create_train_state(run_cfg, mesh, max_steps=max(steps + warmup, 2))
    cfg = setup.model_cfg
    step_fn = train_step.make_train_step(setup, run_cfg.train)
    t0 = time.perf_counter()
    compiled, memory = train_step.compile_train_step(step_fn, state, setup, cfg.block_size)
    compile_s = time.perf_counter() - t0
    if compile_only:
        print(f"== {cfg.name or cfg.arch}: batch {run_cfg.train.world_batch_size} x {cfg.block_size} "
              f"(accum {setup.accum}), compile {compile_s:.1f} s, compiled temporaries "
              f"{getattr(memory, 'temp_size_in_bytes', 0) / 2**30:.2f} GiB, arguments "
              f"{getattr(memory, 'argument_size_in_bytes', 0) / 2**30:.2f} GiB per device")
        return {}
    rng = np.random.default_rng(0)
    shape = (setup.accum, setup.global_micro_batch, cfg.block_size + 1)
    tokens = rng.integers(0, cfg.vocab_size, size=shape, dtype=np.int32)
    batch = jax.device_put({"inputs": tokens[..., :-1], "labels": tokens[..., 1:]}, setup.batch_sharding)
    key = jax.random.key(0)
    for _ in range(warmup):
        state, metrics = compiled(state, batch, key)
    jax.block_until_ready(metrics)
    times, executed, sampled = [], [], []
    for _ in range(steps):  # the step counter advances, so every step draws fresh depths as training does
        t = time.perf_counter()
        state, metrics = compiled(state, batch, key)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
        if "executed_recurrences" in metrics:
            executed.append(float(metrics["executed_recurrences"]))
            sampled.append(float(metrics["sampled_recurrences"]))
    step_s = float(np.median(times))
    tokens_per_step = int(run_cfg.train.world_batch_size) * cfg.block_size
    if cfg.arch == "parcae":
        t_exp, s_exp = flops.expected_split(cfg)
        hw = flops.hardware_flops_per_token(cfg, f=t_exp + s_exp, b=s_exp)
    else:
        hw = flops.hardware_flops_per_token(cfg)
    peak = flops.peak_flops_per_device()
    tokens_per_s = tokens_per_step / step_s
    return {
        "model": cfg.name or cfg.arch,
        "params": flops.param_counts(cfg).unique,
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "batch": f"{run_cfg.train.world_batch_size} x {cfg.block_size} (accum {setup.accum})",
        "compile_s": compile_s,
        "step_s": step_s,
        "tokens_per_s": tokens_per_s,
        "hardware_flops_per_token": hw,
        "official_flops_per_token": flops.flops_per_token(cfg),
        "mfu": tokens_per_s * hw / (peak * jax.device_count()) if peak else None,
        "peak_memory_gib": (_peak_memory_bytes() or 0) / 2**30 or None,
        "compiled_temp_gib": getattr(memory, "temp_size_in_bytes", 0) / 2**30 if memory else None,
        "loss": float(metrics["loss"]),
        "executed_recurrences": float(np.mean(executed)) if executed else None,
        "sampled_recurrences": float(np.mean(sampled)) if sampled else None,
    }


def _print(result: dict) -> None:
    mfu = f"{result['mfu'] * 100:.1f}%" if result["mfu"] is not None else "n/a (no peak for this device)"
    mem = f"{result['peak_memory_gib']:.2f} GiB" if result["peak_memory_gib"] else "n/a"
    temp = f"{result['compiled_temp_gib']:.2f} GiB" if result["compiled_temp_gib"] is not None else "n/a"
    print(f"== {result['model']} ({result['params'] / 1e6:.1f}M params) on {result['devices']}")
    print(f"   batch {result['batch']}, compile {result['compile_s']:.1f} s")
    print(f"   step time   {result['step_s'] * 1e3:.1f} ms (median)")
    print(f"   tokens/s    {result['tokens_per_s']:,.0f}")
    print(f"   MFU         {mfu}  ({result['hardware_flops_per_token'] / 1e6:.1f} MFLOP/token hardware, "
          f"{result['official_flops_per_token'] / 1e6:.1f} official)")
    print(f"   memory      peak {mem}, compiled temporaries {temp} per device")
    if result["executed_recurrences"] is not None:
        ratio = result["executed_recurrences"] / result["sampled_recurrences"]
        print(f"   recurrences executed {result['executed_recurrences']:.2f} / sampled "
              f"{result['sampled_recurrences']:.2f} per sequence: executed/sampled recurrences {ratio:.2f}")


def _gpt_path(config_path: str) -> str | None:
    base = os.path.basename(config_path.split(":")[0])
    if not base.startswith("parcae_"):
        return None
    candidate = os.path.join(os.path.dirname(config_path), "gpt_" + base[len("parcae_"):])
    return candidate if os.path.exists(candidate) else None


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config_path, overrides, rest = split_config_args(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=None, help="world batch (sequences per step)")
    parser.add_argument("--seq-len", type=int, default=None, help="block size")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gpt-baseline", action="store_true")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile the train step and print its memory analysis, run nothing")
    parser.add_argument("--attention", default=None, choices=ATTENTION_IMPLS,
                        help="model.attention_impl: auto (splash on TPU, cudnn on GPU, else xla), xla (the "
                             "parity path), cudnn (GPU flash attention, bf16), splash (TPU Pallas kernel), "
                             "splash-interpret (that kernel in the Pallas interpreter, any platform)")
    parser.add_argument("--loss-chunk-len", type=int, default=None,
                        help="train.loss_chunk_len: head + loss over sequence chunks of this many "
                             "tokens (0: off)")
    parser.add_argument("--depth-groups", type=int, default=None,
                        help="train.depth_groups: sort sequences by depth, loop each group to its own bound "
                             "(0: off)")
    args = parser.parse_args(rest)
    if config_path is None:
        parser.error("--config FILE is required")
    extra = []
    if args.batch is not None:
        extra += [f"train.world_batch_size={args.batch}", f"train.micro_batch_size={args.batch}"]
    if args.seq_len is not None:
        extra.append(f"model.block_size={args.seq_len}")
    switches = (("model.attention_impl", args.attention), ("train.loss_chunk_len", args.loss_chunk_len),
                ("train.depth_groups", args.depth_groups))
    for key, value in switches:
        if value is not None:
            extra.append(f"{key}={value}")
    paths = [config_path] + ([_gpt_path(config_path)] if args.gpt_baseline and _gpt_path(config_path) else [])
    for path in paths:
        run_cfg = load_config(path, [*extra, *overrides])
        result = bench(run_cfg, steps=args.steps, warmup=args.warmup, compile_only=args.compile_only)
        if result:
            _print(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default sys.argv[1:]) in the error boundary; its exit status."""
    return errors.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
