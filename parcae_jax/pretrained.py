"""Pretrained model folders: our native format and the official PyTorch format.

Native parcae-jax folder (written by `save_pretrained`, read by `load_pretrained`):

    config.json    every model field (official names + JAX fields), "_class_name", "format": "parcae-jax"
    params/        Orbax checkpoint of a flat {"prelude/0/attn/c_q/kernel": fp32 array, ...} dict
    extra.npz      (optional) official tensors the model does not use (e.g. GPT's unused `lm_head`),
                   kept only so that `convert to-torch` reproduces the original file bit for bit

Official folder: `config.json` (with or without `_class_name`) plus one of `model.pt`,
`pytorch_model.bin`, `model.safetensors`, `model.bin`. Reading `.pt`/`.bin` needs the `torch` extra.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import orbax.checkpoint as ocp

from parcae_jax import fileio, hub, weights
from parcae_jax.config import read_folder_config, write_folder_config
from parcae_jax.errors import ExistsError, NotFoundError
from parcae_jax.model import GPT, Parcae, build_model

OFFICIAL_WEIGHT_FILES = ("model.pt", "pytorch_model.bin", "model.safetensors", "model.bin")


def read_official_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The official state dict of a folder as {key: numpy array} (tied tensors appear twice)."""
    path = pathlib.Path(path)
    for name in OFFICIAL_WEIGHT_FILES:
        f = path / name
        if not f.is_file():
            continue
        if name.endswith(".safetensors"):
            from safetensors.numpy import load_file

            return dict(load_file(str(f)))
        torch = _import_torch()
        state = torch.load(str(f), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]  # a training checkpoint: {"model": state_dict, "optimizer": ...}
        return {
            k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()
        }
    raise NotFoundError(f"no weights in {path}: expected one of {OFFICIAL_WEIGHT_FILES} (or params/)")


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "reading or writing PyTorch weights needs torch: pip install 'parcae-jax[torch]'"
        ) from e
    return torch


def is_native(path: str | os.PathLike) -> bool:
    return (pathlib.Path(path) / "params").is_dir()


def load_pretrained(path: str | os.PathLike, *, return_extra: bool = False, **overrides) -> Parcae | GPT:
    """Load a native or official folder, or a Hub repository by name (`ORG/NAME`, `hf://ORG/NAME`,
    optionally `@REVISION`) as the official package does. `overrides` replace model fields."""
    if hub.is_hub_path(path) or hub.looks_like_repo_id(path):
        path = hub.snapshot(str(path))
    path = pathlib.Path(path).expanduser().resolve()
    if not path.exists():
        raise NotFoundError(f"model folder {path} does not exist")
    cfg = read_folder_config(path)
    if not is_native(path) and not any((path / n).is_file() for n in OFFICIAL_WEIGHT_FILES):
        raise NotFoundError(f"no weights in {path}: expected params/ or one of {OFFICIAL_WEIGHT_FILES}")
    if overrides:
        cfg = cfg.replace(**overrides)
    model = build_model(cfg)
    if is_native(path):
        arrays = ocp.StandardCheckpointer().restore(path / "params")
        expected = weights.model_arrays(model)
        _check_native(arrays, expected, path)
        weights.set_arrays(model, {_split_path(k): v for k, v in arrays.items()})
        extra_file = path / "extra.npz"
        extra = dict(np.load(extra_file)) if extra_file.is_file() else {}
    else:
        extra = weights.load_official(model, read_official_weights(path))
    return (model, extra) if return_extra else model


def _split_path(key: str) -> tuple:
    """Inverse of `_join_path`: list indices (prelude/0) are ints in NNX paths, while
    value-embedding table names (value_embeds/1) are dict keys and stay strings."""
    parts = key.split("/")
    if parts[0] == "value_embeds":
        return tuple(parts)
    return tuple(int(p) if p.isdigit() else p for p in parts)


def _join_path(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _check_native(arrays: dict, expected: dict, path) -> None:
    exp = {_join_path(k): v.shape for k, v in expected.items()}
    got = {k: tuple(v.shape) for k, v in arrays.items()}
    missing, extra = sorted(set(exp) - set(got)), sorted(set(got) - set(exp))
    if missing or extra:
        raise weights.WeightsError(
            f"{path}: parameters do not match the config: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for k, shape in exp.items():
        if tuple(shape) != got[k]:
            raise weights.WeightsError(
                f"{path}: shape mismatch for {k!r}: stored {got[k]}, config expects {shape}"
            )


def save_pretrained(model: Parcae | GPT, path: str | os.PathLike, *, extra=None, overwrite: bool = False):
    """Write a native folder atomically: everything goes to a temporary sibling, renamed at the end."""
    path = pathlib.Path(path).expanduser().resolve()
    if path.exists() and not overwrite:
        raise ExistsError(f"{path} already exists; choose another destination or pass overwrite=True")
    with fileio.replacing_folder(path) as tmp:
        write_folder_config(model.config, tmp, native=True)
        arrays = {_join_path(k): v for k, v in weights.model_arrays(model).items()}
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(tmp / "params", arrays)
        ckpt.wait_until_finished()
        if extra:
            np.savez(tmp / "extra.npz", **extra)
    return path
