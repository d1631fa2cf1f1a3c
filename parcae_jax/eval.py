"""Evaluate a checkpoint: held-out loss/BPB, test-time depth sweep, CORE, LAMBADA, samples.

    python -m parcae_jax.eval --config configs/eval.py:loss,depth_sweep,core --config.checkpoint=runs/tiny \\
        --config.bundle_dir=PATH/eval_bundle --config.max_per_task=100 --config.output=runs/tiny/eval.json

(the repository's `eval.py` is the same command). `--config.checkpoint` is a training workdir (latest
step, or --config.step=N), a step folder WORKDIR/checkpoints/N, a parcae-jax pretrained folder or an
official PyTorch folder (converted on the fly). Without a checkout, the config file is the package's
own `parcae_jax/evaluation/config.py`. Results are printed as tables and, with
--config.output, written as one JSON document (the depth sweep's PNG goes next to it). Multi-process
runs initialise `jax.distributed` as training does.
"""

from __future__ import annotations

import logging
import sys
import warnings

from absl import flags

from parcae_jax import errors
from parcae_jax.launch import check_config_argv, define_config_flag, multi_host_environment, parse_flags

define_config_flag()
FLAGS = flags.FLAGS


def _run(argv: list[str]) -> int:
    check_config_argv(argv)
    parse_flags(argv)
    logging.getLogger("absl").setLevel(logging.WARNING)
    # Restoring a training checkpoint onto one device for evaluation is intended, not a topology mistake.
    warnings.filterwarnings("ignore", message="Sharding info not provided when restoring")
    import jax

    if multi_host_environment():
        jax.distributed.initialize()  # before anything touches a device
    from parcae_jax.evaluation import runner

    log = print if jax.process_index() == 0 else (lambda *a, **k: None)
    runner.run(FLAGS.config, log=log)
    return 0


def main(argv: list[str]) -> None:
    """Run evaluation with the command line `argv` (argv[0] is the program name); exits with its status
    (2 with one line on stderr for a bad input; --debug shows the traceback)."""
    sys.exit(errors.run(lambda args: _run([argv[0], *args]), argv[1:]))


if __name__ == "__main__":
    main(sys.argv)
