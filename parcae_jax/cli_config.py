"""Load a run config file with `--config.a.b=value` overrides, for module command lines.

The trainer declares `config_flags.DEFINE_config_file` with absl; module CLIs (e.g.
`python -m parcae_jax.flops --config configs/parcae_140m.py --config.model.mean_recurrence=4`) call
`load_config` instead, which drives the same `ml_collections.config_flags` machinery on a private
`FlagValues`, so a file spec (`configs/x.py` or `configs/x.py:arg`) and an override string mean the
same thing in both places. On top of it:

* every override key is checked first; an unknown key fails with the valid keys at that level (plain
  config_flags only says "did you mean");
* `a.b=None` sets a field to None (config_flags cannot parse None for an int/float/str field, and
  e.g. switching the stop criterion from `train.max_tokens` to `train.max_flops` needs it);
* the returned config is locked, so a misspelt attribute access fails too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from parcae_jax.errors import ConfigError, UserError

_FLAG = "config"


class UnknownConfigKeyError(UserError, KeyError):
    """An override names a key the config does not have (the message lists the valid ones)."""

    def __str__(self) -> str:  # KeyError would print the message inside quotes
        return str(self.args[0])


def split_config_args(argv: Sequence[str]) -> tuple[str | None, list[str], list[str]]:
    """Split a command line into (config file spec, overrides `a.b=value`, remaining arguments).

    Accepts `--config path`, `--config=path`, `--config.a.b=value` and `--config.a.b value`.
    """
    path, overrides, rest = None, [], []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        name, has_eq, value = arg.lstrip("-").partition("=")
        if not arg.startswith("-") or not (name == _FLAG or name.startswith(_FLAG + ".")):
            rest.append(arg)
            i += 1
            continue
        if not has_eq:  # value in the next argument
            if i + 1 >= len(args):
                raise ConfigError(f"{arg} needs a value")
            value = args[i + 1]
            i += 1
        if name == _FLAG:
            path = value
        else:
            overrides.append(f"{name[len(_FLAG) + 1 :]}={value}")
        i += 1
    return path, overrides, rest


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The locked config of `path` (`file.py` or `file.py:arg`, arg passed to `get_config`), with
    overrides `a.b=value` (a leading `--config.` is accepted) parsed by the type of the field."""
    config = _load_file(path)
    last_value: dict[str, str] = {}  # the last override of a key wins, as with absl flags
    for override in overrides:
        key, value = _split_override(override)
        _check_key(config, key)
        last_value.pop(key, None)
        last_value[key] = value
    _check_no_parent_override(list(last_value))

    typed = [f"--{_FLAG}.{k}={v}" for k, v in last_value.items() if v != "None"]
    if typed:
        flag_values = flags.FlagValues()
        argv = ["load_config", *typed]
        config_flags.DEFINE_config_dict(_FLAG, config, flag_values=flag_values, sys_argv=argv)
        try:
            flag_values(argv)
        except flags.Error as e:  # e.g. "could not convert string to float"
            raise ConfigError(f"bad config override: {e}") from None
        config = flag_values[_FLAG].value
    for key, value in last_value.items():
        if value == "None":
            parent, _, leaf = key.rpartition(".")
            section = _get_section(config, parent)
            if isinstance(section[leaf], ml_collections.ConfigDict):
                raise ConfigError(f"cannot set the section {_FLAG}.{key} to None")
            setattr(section, leaf, None)
    config.lock()
    return config


def _load_file(path: str) -> ml_collections.ConfigDict:
    file = path.partition(":")[0]
    if not os.path.isfile(os.path.expanduser(file)):
        raise ConfigError(f"config file {file} does not exist; pass --config configs/NAME.py (see configs/)")
    flag_values = flags.FlagValues()
    argv = ["load_config", f"--{_FLAG}={path}"]
    holder = config_flags.DEFINE_config_file(_FLAG, flag_values=flag_values, sys_argv=argv, lock_config=True)
    try:
        flag_values(argv)
    except flags.Error as e:  # get_config(arg) refused its argument, or the file does not run
        raise ConfigError(f"config {path}: {e}") from None
    config = holder.value
    if not isinstance(config, ml_collections.ConfigDict):
        config.keys()  # config_flags' stand-in for a failed load raises the load error on any attribute
        raise TypeError(f"{path}: get_config() returned {type(config).__name__}, expected a ConfigDict")
    return config


def _split_override(override: str) -> tuple[str, str]:
    text = override.lstrip("-")
    if text.startswith(_FLAG + "."):
        text = text[len(_FLAG) + 1 :]
    key, has_eq, value = text.partition("=")
    if not has_eq or not key:
        raise ConfigError(f"override {override!r} must look like a.b=value")
    return key, value


def _get_section(config: ml_collections.ConfigDict, dotted: str) -> ml_collections.ConfigDict:
    section = config
    for part in dotted.split(".") if dotted else []:
        section = section[part]
    return section


def _check_key(config: ml_collections.ConfigDict, key: str) -> None:
    """Raise KeyError naming the valid keys where `key` leaves the config's tree."""
    section, where = config, _FLAG
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part not in section:
            raise UnknownConfigKeyError(
                f"unknown config key {_FLAG}.{key}: {where} has no field {part!r}. "
                f"Valid keys in {where}: {sorted(section.keys())}"
            )
        value = section[part]
        where = f"{where}.{part}"
        if i < len(parts) - 1 and not isinstance(value, ml_collections.ConfigDict):
            raise UnknownConfigKeyError(
                f"unknown config key {_FLAG}.{key}: {where} is a value, not a section"
            )
        section = value


def _check_no_parent_override(keys: list[str]) -> None:
    for a in keys:
        for b in keys:
            if b.startswith(a + "."):
                raise ConfigError(f"overrides of both {_FLAG}.{a} and {_FLAG}.{b}: set one or the other")
