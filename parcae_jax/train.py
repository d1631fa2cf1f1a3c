"""Train a Parcae (or GPT baseline) model: `python -m parcae_jax.train` (or the repository's `train.py`).

    python -m parcae_jax.train --config configs/tiny.py --workdir runs/tiny
    python -m parcae_jax.train --config configs/parcae_140m.py --workdir gs://bucket/runs/p140m \\
        --config.train.max_steps=100 --config.data.source=dir --config.data.dataset_dir=gs://bucket/fwe

A workdir holding a checkpoint resumes automatically. Exit status: 2 for a bad input (config, data,
checkpoint, disk: one line on stderr naming the problem and the fix; --debug shows the traceback), 3
when the loss guardrail stops the run, 4 when a peer process of a multi-process run is lost.
Multi-process runs (TPU pods, Slurm, several GPU hosts) call `jax.distributed.initialize()`:
automatically when the environment shows more than one host, or explicitly with
--coordinator_address/--num_processes/--process_id.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import flags

from parcae_jax import errors, peers
from parcae_jax.errors import ConfigError
from parcae_jax.launch import (
    check_config_argv,
    configure_logging,
    define_config_flag,
    multi_host_environment,
    parse_flags,
)

EXIT_STOPPED = 3  # the loss guardrail stopped the run

define_config_flag()
flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics.jsonl, TensorBoard events.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "Index of this process in a multi-process run.")
flags.DEFINE_integer("heartbeat_timeout_seconds", 100,
                     "Multi-process: a process missing heartbeats this long stops the whole run.")
flags.DEFINE_integer("stop_after_steps", None, "Exit after this many steps (schedule unchanged).")
FLAGS = flags.FLAGS


def _init_distributed() -> None:
    import jax

    multi = bool(FLAGS.coordinator_address or FLAGS.num_processes) or multi_host_environment()
    if multi and os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        # CPU-only multi-process runs (tests, debugging) need a cross-process collectives backend.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if FLAGS.coordinator_address or FLAGS.num_processes:
        if None in (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id):
            raise ConfigError("--coordinator_address, --num_processes and --process_id go together")
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
            heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds,
        )
    elif multi:
        jax.distributed.initialize(heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds)


def _set_none_overrides(config, keys: list[str]) -> None:
    """`--config.a.b=None`, which config_flags cannot parse for typed fields (switching the stop
    criterion: --config.train.max_steps=None), is taken out of the command line and set here."""
    for key in keys:
        *parents, leaf = key.split(".")
        section = config
        for name in parents:
            section = section[name]
        setattr(section, leaf, None)


def _run(argv: list[str]) -> int:
    # Every `--config.x=y` is checked against the config first, so a misspelt key fails with the
    # valid keys (config_flags alone only suggests one).
    overrides = check_config_argv(argv)
    none_keys = [o.partition("=")[0] for o in overrides if o.partition("=")[2] == "None"]
    parse_flags([a for a in argv if not (a.startswith("--config.") and a.endswith("=None"))])
    if not FLAGS.workdir:
        raise ConfigError("--workdir DIR is required (the run folder; an existing one resumes)")
    _set_none_overrides(FLAGS.config, none_keys)
    configure_logging()
    _init_distributed()
    import jax

    from parcae_jax import trainer  # after distributed init: nothing may touch devices before it

    if jax.process_index() != 0:
        logging.getLogger("parcae_jax").setLevel(logging.WARNING)
    watch = None
    if jax.process_count() > 1:
        watch = peers.PeerWatch(FLAGS.heartbeat_timeout_seconds / 2, FLAGS.workdir).start()
    try:
        trainer.train(FLAGS.config, FLAGS.workdir, stop_after_steps=FLAGS.stop_after_steps)
    except trainer.TrainingStopped as e:
        logging.error("%s", e)
        return EXIT_STOPPED
    except BaseException:
        if watch is not None:
            watch.settle()  # a collective failing because a peer died: the watchdog says so and exits
        raise
    finally:
        if watch is not None:
            watch.stop()
    return 0


def main(argv: list[str]) -> None:
    """Run training with the command line `argv` (argv[0] is the program name); exits with its status."""
    sys.exit(errors.run(lambda args: _run([argv[0], *args]), argv[1:]))


if __name__ == "__main__":
    main(sys.argv)
