"""Shared start-up of the command-line entry points (`train.py`, `eval.py`)."""

from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags


def define_config_flag() -> None:
    """`--config FILE[:ARG]` (a locked ml_collections config). Training and evaluation both take it:
    defined once, so both entry points can live in one process (tests, notebooks)."""
    if "config" not in flags.FLAGS:
        config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:ARG]).", lock_config=True)


def check_config_argv(argv: list[str]) -> list[str]:
    """Check every `--config.x=y` of a command line against its config file before absl parses it, so a
    misspelt key fails with the list of valid keys (config_flags alone only suggests one). Exits with
    the error; returns the overrides (`a.b=value`)."""
    from parcae_jax.cli_config import UnknownConfigKeyError, load_config, split_config_args

    try:
        path, overrides, _ = split_config_args(argv[1:])
        if path is not None:
            load_config(path, overrides)
    except (UnknownConfigKeyError, ValueError) as e:
        sys.exit(f"error: {e}")
    return overrides


def multi_host_environment() -> bool:
    """True on a multi-host TPU slice or a multi-task Slurm job (where `jax.distributed.initialize()`
    finds its arguments by itself)."""
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    return len(hosts) > 1 or int(os.environ.get("SLURM_NTASKS", "1")) > 1
