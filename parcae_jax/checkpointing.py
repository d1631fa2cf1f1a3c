"""Training checkpoints with Orbax: asynchronous saves, retention, exact resume and re-sharding.

    WORKDIR/checkpoints/<step>/state   params + optimizer state + step (sharded arrays, OCDBT)
                               /data    the input pipeline's iterator state (JSON)
                               /meta    run config, model config, counters (tokens, FLOPs), RNG seed

`step` is the number of optimiser steps taken. Orbax writes each checkpoint to a temporary folder and
renames it when every host has finished, so a crash mid-save never leaves a checkpoint that looks
complete; `latest_step()` only sees finished ones. Once a step is final, process 0 records every file's
size and CRC-32 in `<step>/integrity.json` (`integrity`); a restore first checks the newest step
against it (and Orbax's own metadata files), moves a damaged step aside to `<step>.corrupt` and falls
back to the previous intact one. A save that fails (full disk, lost permissions) stops the run with one
line, its partial folder removed; before each save the free space is checked against the size of the
previous checkpoint. Restoring takes the *abstract* train state of the
current run (shapes, dtypes and shardings), so a checkpoint written on one mesh restores onto another.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from parcae_jax import errors, fileio, integrity
from parcae_jax.config import ModelConfig
from parcae_jax.errors import NotFoundError, UserError

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


# Orbax's own metadata: a step folder without any of these cannot be restored, manifest or not.
REQUIRED_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt", "meta/metadata",
                  "data/metadata")
CORRUPT_SUFFIX = ".corrupt"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be used by this run (message names the mismatch and the fix)."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written; the run stops, the last good checkpoint stays."""


def finished_steps(workdir: str | os.PathLike) -> list[int]:
    """The finished checkpoint steps of a workdir, without opening a CheckpointManager."""
    folder = epath.Path(checkpoint_dir(workdir))
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


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
            cleanup_tmp_directories=True,  # what a killed save left behind
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta")
        )
        self._unsealed: int | None = None  # saved, not yet known to be final and recorded
        self._last_size: int | None = None  # bytes of the newest checkpoint (for the free-space check)

    def step_dir(self, step: int) -> str:
        return f"{self.directory.rstrip('/')}/{step}"

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def latest_intact_step(self, *, move_aside: bool) -> int | None:
        """The newest finished step whose files are intact. Damaged newer ones are reported in one line
        each and, with `move_aside` (training: process 0 renames them to `<step>.corrupt`), taken out of
        the way so the run continues from the step before."""
        chosen = None
        for step in sorted(self.all_steps(), reverse=True):
            problem = integrity.problem(self.step_dir(step), REQUIRED_FILES)
            if problem is None:
                chosen = step
                break
            where = self.step_dir(step)
            if move_aside and jax.process_index() == 0:
                aside = _free_name(where + CORRUPT_SUFFIX)
                epath.Path(where).rename(aside)
                log.warning("checkpoint %s is damaged (%s): moved aside to %s; using the previous one",
                            where, problem, aside)
            else:
                log.warning("checkpoint %s is damaged (%s); using the previous one", where, problem)
        if move_aside and chosen != self.latest_step():
            _sync_processes("parcae_jax_checkpoint_integrity")
            self.manager.reload()
        if chosen is not None:
            self._last_size = integrity.total_size(self.step_dir(chosen))
        return chosen

    def save(self, step: int, state: Any, data_state: dict | None, meta: dict, *, force: bool = True) -> bool:
        """Start an (asynchronous) save of `state` at `step`; returns False if one exists already.
        Raises CheckpointSaveError when the previous save failed or the disk has no room for this one."""
        if step in self.manager.all_steps():
            return False
        self.seal()
        self._check_free_space(step, state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
            meta=ocp.args.JsonSave(fileio.to_jsonable(meta)),
        )
        try:
            started = bool(self.manager.save(step, args=args, force=force))
        except OSError as e:  # a synchronous part of the save (directory creation) failed
            self._failed(step, e)
        self._unsealed = step if started else None
        return started

    def check_for_errors(self) -> None:
        """Raise CheckpointSaveError if the asynchronous save in flight has failed (cheap: every step)."""
        if self._unsealed is None:
            return
        try:
            self.manager.check_for_errors()
        except Exception as e:
            self._failed(self._unsealed, e)

    def seal(self) -> None:
        """Wait for the save in flight; once its step is final, record its manifest (process 0)."""
        if self._unsealed is None:
            return
        step = self._unsealed
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:
            self._failed(step, e)
        self._unsealed = None
        if jax.process_index() == 0 and step in self.manager.all_steps():
            self._last_size = integrity.write_manifest(self.step_dir(step))

    def _failed(self, step: int | None, err: BaseException):
        """Remove what the failed save left and stop the run with one line."""
        self._unsealed = None
        try:
            self.manager.wait_until_finished()  # other writes of the failed save may still be running
        except Exception:
            pass  # the failure is reported below
        if jax.process_index() == 0 and step is not None:
            for partial in epath.Path(self.directory).glob(f"{step}.orbax-checkpoint-tmp*"):
                partial.rmtree(missing_ok=True)
        last = self.latest_step()
        reason = errors.one_line(err) or f"{type(err).__name__}: {err}"
        raise CheckpointSaveError(
            f"saving checkpoint {step} to {self.directory} failed ({reason}); the run stops here and its "
            f"last good checkpoint is {'step ' + str(last) if last is not None else 'none'}: fix the cause "
            "and rerun the same command to resume"
        ) from err

    def _check_free_space(self, step: int, state: Any) -> None:
        if fileio.is_remote(self.directory):
            return  # object stores report no free space
        need = self._last_size or sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
        free = shutil.disk_usage(self.directory).free
        if free < need:
            last = self.latest_step()
            raise CheckpointSaveError(
                f"{self.directory}: {free / 2**20:.1f} MiB free, checkpoint {step} needs about "
                f"{need / 2**20:.1f} MiB; the run stops here and its last good checkpoint is "
                f"{'step ' + str(last) if last is not None else 'none'}: free space and rerun to resume"
            )

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
        self.seal()

    def close(self) -> None:
        try:
            self.seal()
        finally:
            self.manager.close()


def _free_name(path: str) -> str:
    """`path`, or `path.1`, `path.2`, ... when it is taken (a step damaged twice)."""
    candidate, i = path, 0
    while epath.Path(candidate).exists():
        i += 1
        candidate = f"{path}.{i}"
    return candidate


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


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
            raise NotFoundError(f"{ckpt.directory} holds no finished checkpoint")
        if step is None:
            step = ckpt.latest_intact_step(move_aside=False)
            if step is None:
                raise CheckpointError(f"every checkpoint in {ckpt.directory} is damaged ({sorted(steps)})")
        if step not in steps:
            raise NotFoundError(f"{ckpt.directory} has no checkpoint at step {step}; "
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
