"""Train a Parcae (or GPT baseline) model: `python -m parcae_jax.train` (or the repository's `train.py`).

    python -m parcae_jax.train --config configs/tiny.py --workdir runs/tiny
    python -m parcae_jax.train --config configs/parcae_140m.py --workdir gs://bucket/runs/p140m \\
        --config.train.max_steps=100 --config.data.source=dir --config.data.dataset_dir=gs://bucket/fwe

A workdir holding a checkpoint resumes automatically. Exit status: 2 for a config error (one line on
stderr; --debug shows the traceback), 3 when the loss guardrail stops the run. Multi-process runs
(TPU pods, Slurm, several GPU hosts) call `jax.distributed.initialize()`: automatically when the
environment shows more than one host, or explicitly with --coordinator_address/--num_processes/--process_id.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags

from parcae_jax.launch import check_config_argv, define_config_flag, multi_host_environment

define_config_flag()
flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics.jsonl, TensorBoard events.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "Index of this process in a multi-process run.")
flags.DEFINE_integer("heartbeat_timeout_seconds", 100,
                     "Multi-process: a process missing heartbeats this long stops the whole run.")
flags.DEFINE_integer("stop_after_steps", None, "Exit after this many steps (schedule unchanged).")
flags.DEFINE_bool("debug", False, "Show the traceback of a config error instead of one line.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _init_distributed() -> None:
    import jax

    multi = bool(FLAGS.coordinator_address or FLAGS.num_processes) or multi_host_environment()
    if multi and os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        # CPU-only multi-process runs (tests, debugging) need a cross-process collectives backend.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if FLAGS.coordinator_address or FLAGS.num_processes:
        if None in (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id):
            raise app.UsageError("--coordinator_address, --num_processes and --process_id go together")
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
            heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds,
        )
    elif multi:
        jax.distributed.initialize(heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds)


def _preparse(argv: list[str]) -> tuple[list[str], list[str]]:
    """Check every `--config.x=y` against the config first, so a misspelt key fails with the valid keys
    (config_flags alone only suggests one), and take out `=None` overrides, which config_flags cannot
    parse for typed fields (switching stop criterion: --config.train.max_steps=None); main sets them."""
    overrides = check_config_argv(argv)
    none_keys = [o.partition("=")[0] for o in overrides if o.partition("=")[2] == "None"]
    kept = [a for a in argv if not (a.startswith("--config.") and a.endswith("=None"))]
    return kept, none_keys


_NONE_OVERRIDES: list[str] = []


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for key in _NONE_OVERRIDES:
        *parents, leaf = key.split(".")
        section = FLAGS.config
        for name in parents:
            section = section[name]
        setattr(section, leaf, None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    logging.getLogger("absl").setLevel(logging.WARNING)
    _init_distributed()
    import jax

    from parcae_jax import trainer  # after distributed init: nothing may touch devices before it

    if jax.process_index() != 0:
        logging.getLogger("parcae_jax").setLevel(logging.WARNING)
    try:
        trainer.train(FLAGS.config, FLAGS.workdir, stop_after_steps=FLAGS.stop_after_steps)
    except trainer.ConfigError as e:
        if FLAGS.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except trainer.TrainingStopped as e:
        logging.error("%s", e)
        sys.exit(3)


def main(argv: list[str]) -> None:
    """Run training with the command line `argv` (argv[0] is the program name); exits with its status."""
    argv, _NONE_OVERRIDES[:] = _preparse(list(argv))
    app.run(_main, argv=argv)


if __name__ == "__main__":
    main(sys.argv)
