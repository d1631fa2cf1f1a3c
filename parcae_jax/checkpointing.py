"""Training checkpoints with Orbax: asynchronous saves, retention, exact resume and re-sharding.

    WORKDIR/checkpoints/<step>/state   params + optimizer state + step (sharded arrays, OCDBT)
                               /data    the input pipeline's iterator state (JSON)
                               /meta    run config, model config, counters (tokens, FLOPs), RNG seed

`step` is the number of optimiser steps taken. Orbax writes each checkpoint to a temporary folder and
renames it when every host has finished, so a crash mid-save never leaves a checkpoint that looks
complete; `latest_step()` only sees finished ones. Restoring takes the *abstract* train state of the
current run (shapes, dtypes and shardings), so a checkpoint written on one mesh restores onto another.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from parcae_jax import fileio
from parcae_jax.config import ModelConfig

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
# Model fields that change parameter shapes: a checkpoint differing in any of them cannot be restored.
_SHAPE_FIELDS = (
    "arch",
    "vocab_size",
    "padded_vocab_size",
    "padding_multiple",
    "n_embd",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "recurrent_embedding_dimension",
    "recurrent_intermediation_embedding_dimension",
    "n_layer",
    "n_layers_in_prelude",
    "n_layers_in_recurrent_block",
    "n_layers_in_coda",
    "injection_type",
    "tie_embeddings",
    "bias",
    "qk_norm",
)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used by this run (message names the mismatch and the fix)."""


def checkpoint_dir(workdir: str | os.PathLike) -> str:
    """`WORKDIR/checkpoints`, absolute for local paths (Orbax's OCDBT writer rejects relative ones)."""
    workdir = os.fspath(workdir)
    if "://" not in workdir:
        workdir = os.path.abspath(os.path.expanduser(workdir))
    return os.path.join(workdir, CHECKPOINT_DIR)


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with the run's save/restore layout."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        keep_last: int = 3,
        keep_period: int | None = None,
        async_save: bool = True,
    ):
        self.directory = checkpoint_dir(workdir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep_last if keep_last and keep_last > 0 else None,
            keep_period=keep_period,  # steps divisible by it are never deleted
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict | None, meta: dict, *, force: bool = True) -> bool:
        """Start an (asynchronous) save of `state` at `step`; returns False if one exists already."""
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
            meta=ocp.args.JsonSave(fileio.to_jsonable(meta)),
        )
        return bool(self.manager.save(step, args=args, force=force))

    def read_meta(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def restore(self, step: int, abstract_state: Any, model_cfg: ModelConfig | None = None):
        """(state, data_state, meta) of `step`, placed with the shardings of `abstract_state`."""
        meta = self.read_meta(step)
        if model_cfg is not None:
            check_compatible(meta, model_cfg, os.path.join(self.directory, str(step)))
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except (ValueError, KeyError) as e:
            raise CheckpointError(
                f"{self.directory}/{step}: the stored train state does not fit this run ({e}); "
                "resume with the config the checkpoint was written with, or use another --workdir"
            ) from None
        return restored["state"], restored["data"], restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_compatible(meta: dict, model_cfg: ModelConfig, where: str) -> None:
    stored = meta.get("model", {})
    current = model_cfg.to_dict()
    diffs = [
        f"{k}: checkpoint {stored.get(k)!r} vs config {current.get(k)!r}"
        for k in _SHAPE_FIELDS
        if k in stored and k in current and stored.get(k) != current.get(k)
    ]
    if diffs:
        raise CheckpointError(
            f"{where} was written by an incompatible model config ({'; '.join(diffs)}); resume with "
            "the original config (see its meta/ folder) or start a new --workdir"
        )


# ---------------------------------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------------------------------


class PreemptionFlag:
    """Set by SIGTERM (TPU maintenance, spot reclaim, Slurm time limit) so the loop can save and exit.

    The handler only sets a flag: the loop saves at the end of the current step, which is the only
    point where the train state is consistent. Installing it from a non-main thread is a no-op.
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self._event = threading.Event()
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        log.warning("received signal %d: saving a checkpoint at the end of this step", signum)
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def any_process(flag: bool) -> bool:
    """True if the flag is set on any process (all processes must save together)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


# ---------------------------------------------------------------------------------------------------
# A model out of a training checkpoint (`parcae_jax.loading` finds the workdir and the step)
# ---------------------------------------------------------------------------------------------------


def restore_model(workdir: str | os.PathLike, step: int | None = None, **overrides):
    """(model, step, meta) of a training checkpoint: the latest finished step unless `step`, fp32
    parameters on the default device whatever mesh wrote them, `overrides` replacing model fields."""
    from flax import nnx

    from parcae_jax.model import build_model

    ckpt = Checkpointer(workdir, keep_last=0, async_save=False)  # keep_last=0: never deletes anything
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"{ckpt.directory} holds no finished checkpoint")
        step = max(steps) if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"{ckpt.directory} has no checkpoint at step {step}; "
                                    f"available: {sorted(steps)}")
        meta = ckpt.read_meta(step)
        model = build_model(ModelConfig.from_dict({**meta["model"], **overrides}), seed=0)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                nnx.state(model, nnx.Param))
        # Only the parameters: the optimizer state is never read.
        restored = ckpt.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item={"params": abstract}, partial_restore=True)))
    finally:
        ckpt.close()
    nnx.update(model, restored["state"]["params"])
    return model, step, meta
