"""Validation loss of a trained checkpoint at several test-time recurrences (one compiled program).

    python -m parcae_jax.scaling.depth_sweep --workdir W --output FILE.json --depths 1,2,4,8 \\
        [--batches 16] [--batch-size 32]

Used by `scaling run` when `eval.py` (the evaluation issue's `depth_sweep` task) is not available.
The model comes from the workdir's latest checkpoint, the data from the run's own `config.json` (same
dataset, same validation rows as the trainer's in-training evaluation), and the initial state from
the trainer's evaluation key (seed + 1), so with the trainer's batch geometry the loss at the
training recurrence equals the final `val_loss_<r̄>` of `metrics.jsonl`. The number of recurrences is
a traced argument: every depth runs the same compiled program.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def depth_sweep(workdir: str, depths: list[int], *, batches: int | None, batch_size: int) -> dict:
    """{"depths", "losses", "tokens", ...}: mean token NLL on the validation split per depth."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    from etils import epath
    from flax import nnx

    from parcae_jax import loading, losses
    from parcae_jax.data import pipeline
    from parcae_jax.trainer import resolve_data

    run_cfg = ml_collections.ConfigDict(json.loads((epath.Path(workdir) / "config.json").read_text()))
    if run_cfg.model.arch != "parcae":
        raise ValueError(f"{workdir}: a depth sweep needs a Parcae model, got arch={run_cfg.model.arch!r}")
    data = resolve_data(run_cfg)
    model = loading.load_model(workdir).model
    graphdef, params = nnx.split(model)
    key = jax.random.key(int(run_cfg.train.seed) + 1)  # the trainer's evaluation key

    @jax.jit
    def nll(params, batch, depth):
        logits = nnx.merge(graphdef, params)(batch["inputs"], num_steps=depth, rng=key)
        _, aux = losses.cross_entropy(logits, batch["labels"], mask=batch.get("mask"))
        return aux["nll_sum"], aux["tokens"]

    totals = {d: [0.0, 0.0] for d in depths}
    t0 = time.perf_counter()
    rows = pipeline.eval_batches(
        data.dataset_dir,
        split="val",
        block_size=int(run_cfg.model.block_size),
        batch_size=batch_size,
        max_batches=batches,
    )
    for local in rows:
        batch = {k: jnp.asarray(v) for k, v in local.items()}
        for d in depths:
            s, n = nll(params, batch, jnp.int32(d))
            totals[d][0] += float(s)
            totals[d][1] += float(n)
    tokens = int(totals[depths[0]][1])
    if tokens == 0:
        raise ValueError(f"{data.dataset_dir}: the validation split is empty")
    return {
        "depths": list(depths),
        "losses": [totals[d][0] / totals[d][1] for d in depths],
        "tokens": tokens,
        "batches": batches,
        "batch_size": batch_size,
        "seconds": time.perf_counter() - t0,
        "source": "parcae_jax.scaling.depth_sweep",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m parcae_jax.scaling.depth_sweep", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--workdir", required=True, help="training workdir (latest checkpoint)")
    parser.add_argument("--output", required=True, help="JSON file to write")
    parser.add_argument("--depths", required=True, help="comma list of recurrences, e.g. 1,2,4,8")
    parser.add_argument("--batches", type=int, default=None, help="validation batches (default: whole split)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per batch")
    args = parser.parse_args(argv)
    depths = sorted({int(d) for d in args.depths.split(",") if d.strip()})
    if not depths or depths[0] < 1:
        parser.error("--depths needs positive integers")
    result = depth_sweep(args.workdir, depths, batches=args.batches, batch_size=args.batch_size)
    tmp = args.output + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, args.output)
    for d, loss in zip(result["depths"], result["losses"], strict=True):
        print(f"depth {d:>3}  val loss {loss:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
