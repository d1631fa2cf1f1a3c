"""Evaluate a checkpoint: held-out loss/BPB, test-time depth sweep, CORE, LAMBADA, samples.

    python eval.py --config configs/eval.py:loss,depth_sweep,core --config.checkpoint=runs/tiny \\
        --config.bundle_dir=PATH/eval_bundle --config.max_per_task=100 --config.output=runs/tiny/eval.json

`--config.checkpoint` is a training workdir (latest step, or --config.step=N), a step folder
WORKDIR/checkpoints/N, a parcae-jax pretrained folder or an official PyTorch folder (converted on the
fly). Results are printed as tables and, with --config.output, written as one JSON document (the depth
sweep's PNG goes next to it). Multi-process runs initialise `jax.distributed` as train.py does.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Eval config: configs/eval.py:TASK[,TASK...]",
                                lock_config=True)
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def _check_keys(argv: list[str]) -> None:
    """Fail on a misspelt --config.key with the list of valid keys (config_flags only guesses one)."""
    from parcae_jax.cli_config import UnknownConfigKeyError, load_config, split_config_args

    try:
        path, overrides, _ = split_config_args(argv[1:])
        if path is not None:
            load_config(path, overrides)
    except (UnknownConfigKeyError, ValueError) as e:
        sys.exit(f"error: {e}")


def _multi_host_environment() -> bool:
    """True on a multi-host TPU slice or a multi-task Slurm job (as in train.py)."""
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    return len(hosts) > 1 or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("absl").setLevel(logging.WARNING)
    # Restoring a training checkpoint onto one device for evaluation is intended, not a topology mistake.
    warnings.filterwarnings("ignore", message="Sharding info not provided when restoring")
    import jax

    if _multi_host_environment():
        jax.distributed.initialize()  # before anything touches a device
    from parcae_jax.evaluation import runner
    from parcae_jax.evaluation.bundle import BundleError

    log = print if jax.process_index() == 0 else (lambda *a, **k: None)
    try:
        runner.run(FLAGS.config, log=log)
    except (runner.CheckpointPathError, BundleError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    _check_keys(sys.argv)
    app.run(main)
