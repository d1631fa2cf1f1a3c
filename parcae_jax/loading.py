"""Every model path the command lines accept, and the tokenizer and dataset that go with it.

`load_model(path)` takes
  * a training workdir (WORKDIR/checkpoints/<step>/): the latest finished step, or `step`;
  * a step folder WORKDIR/checkpoints/STEP;
  * a parcae-jax pretrained ("native") folder: config.json + params/ (`pretrained.save_pretrained`);
  * an official PyTorch folder: config.json + model.pt, model.safetensors, ... (converted on the fly);
  * `hf://ORG/NAME[@REVISION]`: either kind of model folder on the Hugging Face Hub (`hub`).
Anything else raises `CheckpointPathError`, one line saying what was expected.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

from parcae_jax import checkpointing, hub, pretrained
from parcae_jax.data import shards
from parcae_jax.data.prepare import shakespeare_dirs
from parcae_jax.data.tokenizer import METADATA_FILE, MODEL_FILE
from parcae_jax.errors import UserError

_EXPECTED = ("a training workdir (with checkpoints/), a step folder WORKDIR/checkpoints/STEP, or a model "
             "folder with config.json (parcae-jax or official PyTorch)")


class CheckpointPathError(UserError, FileNotFoundError):
    """The path is not something `load_model` can load (the message says what it expected)."""


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A loaded model and where it came from (eval records kind, path and step in its JSON)."""

    model: Any
    kind: str  # "workdir" | "native" | "official"
    path: str  # absolute; the workdir when a step folder was given
    step: int | None = None  # the checkpoint step actually loaded (workdirs only)
    run_config: dict | None = None  # the training run's config (workdirs only)
    # The rows the trainer computed val_loss on (`lm_loss.ValidationSet.to_dict()`; workdirs only).
    validation: dict | None = None
    # Official tensors the model does not use (e.g. GPT's unused lm_head), for a bit-exact export.
    extra: dict = dataclasses.field(default_factory=dict)


def load_model(path: str | os.PathLike, step: int | None = None, **overrides) -> Loaded:
    """The model at `path` (see the module docstring); `overrides` replace model fields (compute_dtype)."""
    if hub.is_hub_path(path):
        path = hub.snapshot(str(path))
    p = pathlib.Path(path).expanduser().resolve()
    if not p.exists():
        raise CheckpointPathError(f"checkpoint {p} does not exist; expected {_EXPECTED}")
    if p.parent.name == checkpointing.CHECKPOINT_DIR and p.name.isdigit():
        if step is not None and step != int(p.name):
            raise CheckpointPathError(f"{p} is step {p.name} but step={step} was asked for")
        p, step = p.parent.parent, int(p.name)
    if (p / checkpointing.CHECKPOINT_DIR).is_dir():
        model, step, meta = checkpointing.restore_model(p, step, **overrides)
        return Loaded(model, "workdir", str(p), step, meta.get("config"), meta.get("validation"))
    if not (p / "config.json").is_file():
        raise CheckpointPathError(f"{p} is not a checkpoint: expected {_EXPECTED}")
    if step is not None:
        raise CheckpointPathError(f"{p} is a model folder: step={step} applies to training workdirs only")
    model, extra = pretrained.load_pretrained(p, return_extra=True, **overrides)
    return Loaded(model, "native" if pretrained.is_native(p) else "official", str(p), extra=extra)


def _data(run_config: dict | None) -> dict:
    return (run_config or {}).get("data") or {}


def find_dataset(run_config: dict | None) -> str | None:
    """The prepared dataset folder a training run read (None without a run config)."""
    data = _data(run_config)
    if data.get("source") == "shakespeare":
        return shakespeare_dirs(data["cache_dir"], int(data["vocab_size"]))[0]
    if data.get("source") == "dir":
        return data.get("dataset_dir") or None
    return None


def _holds_tokenizer(folder: str | os.PathLike) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in (MODEL_FILE, METADATA_FILE))


def find_tokenizer(loaded: Loaded, explicit: str | None = None) -> str | None:
    """The tokenizer's path, by one rule: `explicit`; else the training run's (data.tokenizer, the
    embedded Shakespeare corpus' own, or the one its dataset's metadata records); else one shipped
    inside or next to the model folder (tokenizer/, the folder itself, ../tokenizer); else, for an
    official model from the Hub, the official tokenizer repository. None: none."""
    if explicit:
        return explicit
    data = _data(loaded.run_config)
    if data.get("tokenizer"):
        return data["tokenizer"]
    if data.get("source") == "shakespeare":
        folder = shakespeare_dirs(data["cache_dir"], int(data["vocab_size"]))[1]
        if _holds_tokenizer(folder):
            return folder
    elif data.get("source") == "dir" and data.get("dataset_dir"):
        made_with = shards.load_metadata(data["dataset_dir"]).get("tokenizer", {}).get("path")
        if made_with and os.path.exists(made_with):
            return made_with
    path = pathlib.Path(loaded.path)
    for folder in (path / "tokenizer", path, path.parent / "tokenizer"):
        if _holds_tokenizer(folder):
            return str(folder)
    if loaded.kind == "official" and hub.in_cache(path):
        # An official Hub model without tokenizer files: the official harness's default tokenizer.
        try:
            return hub.snapshot(hub.SCHEME + hub.OFFICIAL_TOKENIZER_REPO)
        except hub.HubError:
            return None
    return None
