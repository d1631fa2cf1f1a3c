"""Multi-process training on this machine: real processes joined by `jax.distributed` (gloo on CPU).

Each process fakes 2 or 4 CPU devices; the global mesh (8 devices) spans processes, and the reference is
the same run in this (8-device) process. These are the same code paths a
TPU pod or a multi-node GPU job takes (process-local data -> global arrays, per-process checkpoint
shards, process-0-only metrics), minus the network.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import write_token_dataset, xla_flags
from test_train import REPO, SMALL, TINY, finished_steps, logged_steps, small_config

from parcae_jax import peers
from parcae_jax.metrics import read_metrics


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_token_dataset(tmp_path_factory.mktemp("mp_tokens") / "data", vocab_size=256)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# fp32 orthogonalisation: gloo and in-process all-reduces sum in different orders, and bf16 Muon turns
# that last-bit noise into ~1e-4 loss differences (see test_train's mesh test).
RUN = ["train.max_steps=8", "train.checkpoint_every=4", "train.eval_every=4",
       "train.muon_ortho_dtype=float32"]


def command(workdir, dataset, *extra):
    return [sys.executable, str(REPO / "train.py"), "--config", TINY, "--workdir", str(workdir),
            *[f"--config.{o}" for o in SMALL], "--config.data.source=dir",
            f"--config.data.dataset_dir={dataset}", *[f"--config.{o}" for o in RUN], *extra]


def env_for(devices: int, **extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=xla_flags(devices))
    env.update(extra)
    return env


def start(workdir, dataset, processes: int, devices_each: int, *extra, env_extra=None):
    """Start `processes` train.py processes (output to log files; a full pipe must never block one);
    `env_extra` maps process id -> extra environment."""
    logs = pathlib.Path(str(workdir) + "_logs")
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for i in range(processes):
        args = command(workdir, dataset, *extra)
        if processes > 1:
            args += [f"--coordinator_address=localhost:{port}", f"--num_processes={processes}",
                     f"--process_id={i}", "--heartbeat_timeout_seconds=15"]
        env = env_for(devices_each, **((env_extra or {}).get(i, {})))
        log = open(logs / f"process_{i}_{time.monotonic_ns()}.log", "w+")
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        proc.log = log
        procs.append(proc)
    return procs


def output(proc) -> str:
    proc.log.flush()
    proc.log.seek(0)
    return proc.log.read()


def wait_all(procs, timeout=600):
    for p in procs:
        p.wait(timeout=timeout)
    return [p.returncode for p in procs], [output(p) for p in procs]


def losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(str(workdir))}


def multi_process_run(workdir, dataset, processes):
    codes, outs = wait_all(start(workdir, dataset, processes, 8 // processes))
    assert codes == [0] * processes, outs[0][-3000:]
    return workdir


@pytest.fixture(scope="module")
def two_process_run(dataset, tmp_path_factory):
    """One 2-process run (4 devices each), shared by the tests that only read it."""
    return multi_process_run(tmp_path_factory.mktemp("two") / "run", dataset, 2)


@pytest.fixture(scope="module")
def single_process_run(dataset, tmp_path_factory):
    """The same run in this process, on its 8 devices."""
    from parcae_jax import trainer

    workdir = tmp_path_factory.mktemp("single") / "run"
    trainer.train(small_config(dataset, *RUN), str(workdir))
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 4])
def test_multi_process_losses_equal_single_process(dataset, tmp_path, processes, request, single_process_run):
    if processes == 2:
        multi_dir = request.getfixturevalue("two_process_run")
    else:
        multi_dir = multi_process_run(tmp_path / "multi", dataset, processes)
    multi, single = losses(multi_dir), losses(single_process_run)
    assert sorted(multi) == list(range(1, 9))  # process 0 alone wrote the metrics, once per step
    np.testing.assert_allclose([multi[s] for s in range(1, 9)], [single[s] for s in range(1, 9)], rtol=1e-5)
    assert "val_loss_4" in read_metrics(str(multi_dir))[-1]


@pytest.mark.slow
def test_two_process_checkpoint_restores_in_one_process(dataset, tmp_path, two_process_run, caplog):
    from parcae_jax import trainer

    # A new workdir holding only the step-4 checkpoint of the 2-process run.
    (tmp_path / "one" / "checkpoints").mkdir(parents=True)
    shutil.copytree(two_process_run / "checkpoints" / "4", tmp_path / "one" / "checkpoints" / "4")
    with caplog.at_level(logging.INFO, logger="parcae_jax"):
        trainer.train(small_config(dataset, *RUN), str(tmp_path / "one"))
    assert "resumed from" in caplog.text
    two, one = losses(two_process_run), losses(tmp_path / "one")
    assert sorted(one) == [5, 6, 7, 8]
    np.testing.assert_allclose([one[s] for s in range(5, 9)], [two[s] for s in range(5, 9)], rtol=1e-5)


@pytest.mark.slow
def test_killed_worker_stops_the_run_and_restart_resumes(dataset, tmp_path):
    """SIGKILL of process 1 after checkpoint 4 and step 5: process 0 exits (no hang on the dead peer),
    and rerunning both processes resumes from step 4 and finishes."""
    workdir = tmp_path / "run"
    procs = start(workdir, dataset, 2, 2)
    killed = procs[1]
    deadline = time.monotonic() + 600
    while killed.poll() is None and time.monotonic() < deadline:
        if 4 in finished_steps(workdir) and max(logged_steps(workdir), default=0) >= 5:
            break
        time.sleep(0.01)
    alive = killed.poll() is None
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert alive and killed.returncode == -signal.SIGKILL, output(killed)[-3000:]
    t0 = time.monotonic()
    try:
        procs[0].wait(timeout=120)  # must not hang on the dead peer
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("process 0 still running 120 s after its peer died")
    waited, survivor = time.monotonic() - t0, output(procs[0])
    print(f"survivor exited {waited:.1f} s after the kill:\n{survivor[-800:]}")
    # One line, the documented exit status, within the 15 s heartbeat bound, no runtime abort.
    assert procs[0].returncode == peers.EXIT_PEER_LOST, survivor[-3000:]
    assert waited < 15
    assert "error: process 1 is gone" in survivor and "last checkpoint: step 4" in survivor
    assert "Fatal" not in survivor and "Thread 0x" not in survivor
    assert finished_steps(workdir) == [4]
    codes, outs = wait_all(start(workdir, dataset, 2, 2))
    assert codes == [0, 0], outs[0][-3000:]
    assert "resumed from" in outs[0]
    assert max(losses(workdir)) == 8
