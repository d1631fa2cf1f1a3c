"""Shared start-up of the command-line entry points (`train.py`, `eval.py`)."""

from __future__ import annotations

import logging
import os
import sys

from absl import flags
from ml_collections import config_flags

from parcae_jax.errors import ConfigError


def define_config_flag() -> None:
    """`--config FILE[:ARG]` (a locked ml_collections config). Training and evaluation both take it:
    defined once, so both entry points can live in one process (tests, notebooks)."""
    if "config" not in flags.FLAGS:
        config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:ARG]).", lock_config=True)


def check_config_argv(argv: list[str]) -> list[str]:
    """Check a command line's config file and every `--config.x=y` against it before absl parses them,
    so a missing file or a misspelt key fails with one line (and the valid keys: config_flags alone only
    suggests one). Raises ConfigError; returns the overrides (`a.b=value`)."""
    from parcae_jax.cli_config import load_config, split_config_args

    path, overrides, _ = split_config_args(argv[1:])
    if path is None:
        raise ConfigError("--config FILE is required (e.g. --config configs/tiny.py)")
    load_config(path, overrides)
    return overrides


def parse_flags(argv: list[str]) -> None:
    """Parse `argv` (program name first) into absl's flags; a bad flag is a ConfigError. absl's own
    `app.run` would print its usage and exit 1 instead."""
    from absl import app

    app.define_help_flags()  # --help / --helpfull, as app.run defines them
    flags.FLAGS.unparse_flags()  # a previous command line in this process must not leak its values
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        raise ConfigError(f"{e}; see --help") from None
    if len(rest) > 1:
        raise ConfigError(f"unexpected arguments {rest[1:]}; every option is a --flag (see --help)")


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever `sys.stdout` is when a record is emitted, so a caller that swaps stdout (a
    notebook, a test) never leaves the handler writing to a closed stream."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def configure_logging() -> None:
    """INFO records as `time LEVEL message` lines on stdout. Replaces the root handlers: importing
    Orbax leaves an implicit stderr handler there, which would swallow our format."""
    handler = _StdoutHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)


def multi_host_environment() -> bool:
    """True on a multi-host TPU slice or a multi-task Slurm job (where `jax.distributed.initialize()`
    finds its arguments by itself)."""
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    return len(hosts) > 1 or int(os.environ.get("SLURM_NTASKS", "1")) > 1
