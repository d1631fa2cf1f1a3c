"""Training: sharded-vs-unsharded equality, the trainer loop, Orbax resume after SIGKILL, train.py CLI."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import run_cli, write_token_dataset, xla_flags

from parcae_jax import checkpointing, sharding, train_step
from parcae_jax.checkpointing import finished_steps
from parcae_jax.cli_config import load_config
from parcae_jax.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")
# The tiny config shrunk further so each compile takes seconds, every architecture choice kept.
SMALL = [
    "model.block_size=32",
    "model.n_embd=64",
    "model.num_attention_heads=2",
    "model.num_key_value_heads=2",
    "model.intermediate_size=128",
    "model.recurrent_embedding_dimension=64",
    "model.recurrent_intermediation_embedding_dimension=128",
    "model.vocab_size=256",
    "train.world_batch_size=8",
    "train.micro_batch_size=1",
    "train.log_every=1",
    "train.eval_iters=2",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_token_dataset(tmp_path_factory.mktemp("tokens") / "data", vocab_size=256)


def small_config(dataset_dir, *extra):
    return load_config(TINY, [*SMALL, "data.source=dir", f"data.dataset_dir={dataset_dir}", *extra])


# ---------------------------------------------------------------------------------------------------
# Same losses on every mesh
# ---------------------------------------------------------------------------------------------------


def five_step_losses(cfg, mesh_shape, batches):
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[: int(np.prod(mesh_shape))])
    setup, state = train_step.create_train_state(cfg, mesh, max_steps=5)
    step_fn = train_step.make_train_step(setup, cfg.train)
    losses = []
    for batch in batches:
        shaped = {k: v.reshape(setup.accum, setup.global_micro_batch, -1) for k, v in batch.items()}
        state, metrics = step_fn(state, jax.device_put(shaped, setup.batch_sharding), jax.random.key(0))
        losses.append(float(metrics["loss"]))
    return losses


@pytest.mark.slow
def test_mesh_shapes_give_the_same_losses(dataset):
    """(8,1,1), (2,4,1), (2,2,2), (1,1,1): five steps, losses equal to 1e-5 relative.

    Muon orthogonalises in float32 here: in bf16 (the recipe) a last-bit difference in a gradient
    (different reduction order on another mesh) flips bf16 roundings of X, which moves the loss by
    ~1e-5 after a few steps; the partitioning itself is what this test checks."""
    from parcae_jax.data import pipeline

    it = pipeline.train_iterator(dataset, block_size=32, world_batch=8, accum=1, seed=0)
    batches = [{k: v.reshape(8, 32) for k, v in next(it).items()} for _ in range(5)]
    results = {}
    for mesh_shape in [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]:
        data_devices = mesh_shape[0] * mesh_shape[1]
        cfg = small_config(dataset, f"train.micro_batch_size={8 // data_devices}", "train.max_steps=5",
                           "train.muon_ortho_dtype=float32")
        results[mesh_shape] = five_step_losses(cfg, mesh_shape, batches)
    reference = np.array(results[(1, 1, 1)])
    assert reference[-1] < reference[0]  # it trains
    for mesh_shape, losses in results.items():
        np.testing.assert_allclose(losses, reference, rtol=1e-5, err_msg=str(mesh_shape))


# ---------------------------------------------------------------------------------------------------
# The trainer, in process
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(dataset, tmp_path_factory):
    from parcae_jax import trainer

    parent = tmp_path_factory.mktemp("run")
    cfg = small_config(dataset, "train.max_steps=8", "train.eval_every=4", "train.checkpoint_every=4",
                       "train.lr=1e-2")
    cwd = os.getcwd()
    os.chdir(parent)
    try:  # a relative --workdir, as in the README's main job
        last = trainer.train(cfg, "run")
    finally:
        os.chdir(cwd)
    return str(parent / "run"), cfg, last


def test_trainer_writes_metrics_checkpoints_and_validation(trained_run):
    workdir, cfg, last = trained_run
    rows = read_metrics(workdir)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for key in ("step", "loss", "tokens", "flops", "lr", "grad_norm", "tokens_per_s", "mfu", "rho_A",
                "state_norm", "rel_residual", "num_steps_no_grad", "num_steps_with_grad"):
        assert key in rows[-1], key
    assert rows[-1]["tokens"] == 8 * 8 * 32
    depths = sorted({*cfg.train.partial_depth_eval, cfg.model.mean_recurrence})
    for d in depths:
        assert np.isfinite(rows[3][f"val_loss_{d}"]) and np.isfinite(rows[7][f"val_loss_{d}"])
    assert "val_loss_1" not in rows[0]
    assert 0 < rows[-1]["rho_A"] < 1
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert sorted(checkpointing.Checkpointer(workdir).all_steps()) == [4, 8]
    assert any(p.name.startswith("events") for p in (pathlib.Path(workdir) / "tensorboard").iterdir())


def test_incompatible_checkpoint_is_refused(trained_run, dataset):
    from parcae_jax import trainer

    workdir, _, _ = trained_run
    cfg = small_config(dataset, "train.max_steps=8", "model.intermediate_size=96")
    with pytest.raises(checkpointing.CheckpointError, match="intermediate_size"):
        trainer.train(cfg, workdir)


def test_workdir_converts_to_torch(trained_run, tmp_path):
    pytest.importorskip("torch")
    from parcae_jax import convert, loading, pretrained

    workdir, _, _ = trained_run
    out = convert.to_torch(workdir, tmp_path / "official", step=4)
    model = loading.load_model(workdir, step=4).model
    back = pretrained.load_pretrained(out, compute_dtype="float32")
    ids = np.arange(16, dtype=np.int32)[None] % 200
    key = jax.random.key(0)
    np.testing.assert_allclose(np.asarray(model(ids, num_steps=2, rng=key)),
                               np.asarray(back(ids, num_steps=2, rng=key)), atol=1e-5)


@pytest.mark.slow
def test_loss_guardrail_stops(dataset, tmp_path):
    from parcae_jax import trainer

    cfg = small_config(dataset, "train.max_steps=4", "train.loss_guardrail=stop", "train.guardrail_loss=0.5",
                       "train.guardrail_after_tokens=0")
    with pytest.raises(trainer.TrainingStopped, match="guardrail"):
        trainer.train(cfg, str(tmp_path / "run"))


# ---------------------------------------------------------------------------------------------------
# Resume after a kill is bitwise exact; the train CLI
# ---------------------------------------------------------------------------------------------------

RESUME = ["train.max_steps=12", "train.checkpoint_every=6", "train.eval_every=100"]


def train_argv(workdir, dataset, *extra) -> list[str]:
    """The train.py command line of a SMALL run on `dataset` (without the program name)."""
    return ["--config", TINY, "--workdir", str(workdir), *[f"--config.{o}" for o in SMALL],
            "--config.data.source=dir", f"--config.data.dataset_dir={dataset}",
            *[f"--config.{o}" for o in RESUME], *extra]


def start_train(workdir, dataset, devices: int, log_path, *extra) -> subprocess.Popen:
    """`python train.py ...` as a command, output to a file (a full pipe would block the run)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=xla_flags(devices))
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *train_argv(workdir, dataset, *extra)],
                            env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, text=True)
    proc.log_path = log_path
    return proc


def finish(proc, timeout=600) -> str:
    proc.wait(timeout=timeout)
    return pathlib.Path(proc.log_path).read_text()


def logged_steps(workdir) -> list[int]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def losses_by_step(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(str(workdir))}


def assert_bitwise(straight: dict, resumed: dict) -> None:
    assert sorted(resumed) == list(range(1, 13))  # the killed run's later rows dropped, not duplicated
    for step in range(1, 13):
        assert straight[step] == resumed[step], (step, straight[step], resumed[step])  # bitwise


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_exact_one_device(dataset, tmp_path):
    """Real processes (1 device): `python train.py` killed with SIGKILL mid-run (after its first finished
    checkpoint and a later step); rerunning the command resumes from the last finished checkpoint, every
    loss bitwise equal to an uninterrupted run's."""
    import signal
    import time

    every3 = "--config.train.checkpoint_every=3"  # checkpoints 3, 6, 9: the kill lands well before the end
    # The uninterrupted run and the run to be killed run side by side (compiles overlap on 2 cores).
    straight = start_train(tmp_path / "straight", dataset, 1, tmp_path / "straight.log", every3)
    killed = start_train(tmp_path / "resumed", dataset, 1, tmp_path / "killed.log", every3)
    workdir = tmp_path / "resumed"
    deadline = time.monotonic() + 600
    while killed.poll() is None and time.monotonic() < deadline:
        if 3 in finished_steps(workdir) and max(logged_steps(workdir), default=0) >= 4:
            break
        time.sleep(0.01)
    alive = killed.poll() is None
    killed.send_signal(signal.SIGKILL)
    out = finish(killed)
    assert alive and killed.returncode == -signal.SIGKILL, out[-3000:]  # killed mid-run, not a clean exit
    finished, logged = finished_steps(workdir), logged_steps(workdir)
    assert finished and max(finished) in (3, 6, 9) and max(logged) >= max(finished), (finished, logged)
    out = finish(straight)
    assert straight.returncode == 0, out[-3000:]
    resumed = start_train(workdir, dataset, 1, tmp_path / "resumed.log", every3)
    out = finish(resumed)
    assert resumed.returncode == 0, out[-3000:]
    assert f"resumed from {checkpointing.checkpoint_dir(workdir)}/{max(finished)}" in out
    assert_bitwise(losses_by_step(tmp_path / "straight"), losses_by_step(workdir))


@pytest.fixture(scope="module")
def straight_run(dataset, tmp_path_factory):
    """The 12-step SMALL run on all 8 (fake) devices, in process, uninterrupted."""
    from parcae_jax import trainer

    workdir = tmp_path_factory.mktemp("straight") / "run"
    trainer.train(small_config(dataset, *RESUME), str(workdir))
    return workdir


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_falls_back_and_resumes_bitwise_on_eight_devices(
        dataset, tmp_path, straight_run, caplog):
    """Sharded (8 devices) in process: a run stopped after step 7 whose step-7 checkpoint was then
    damaged (an array file cut short) moves it aside, resumes from step 6, and every loss is bitwise
    equal to the uninterrupted run's."""
    from parcae_jax import trainer

    workdir = tmp_path / "resumed"
    cfg = small_config(dataset, *RESUME)
    trainer.train(cfg, str(workdir), stop_after_steps=7)
    assert finished_steps(workdir) == [6, 7] and logged_steps(workdir) == list(range(1, 8))
    step7 = pathlib.Path(checkpointing.checkpoint_dir(workdir)) / "7"
    data = max((p for p in (step7 / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:-1000])
    trainer.train(cfg, str(workdir))
    assert finished_steps(workdir) == [6, 12]
    assert (step7.parent / "7.corrupt").is_dir()
    assert any("checkpoint" in r.message and "is damaged" in r.message for r in caplog.records)
    assert_bitwise(losses_by_step(straight_run), losses_by_step(workdir))


def run_main(argv, monkeypatch) -> int | str | None:
    """`python train.py ARGV` in process: its exit code."""
    from parcae_jax.train import main

    return run_cli(main, ["train.py", *argv], monkeypatch)


def test_train_cli_rejects_unknown_key_with_valid_keys(dataset, tmp_path, capsys, monkeypatch):
    code = run_main(train_argv(tmp_path / "w", dataset, "--config.train.lrr=1"), monkeypatch)
    assert code not in (0, None)
    message = str(code) + capsys.readouterr().err
    assert "lrr" in message and "'lr'" in message and "muon_lr" in message


@pytest.mark.parametrize("override, message", [
    ("train.loss_normalization=mean", "train.loss_normalization='mean' is not one of"),
    ("model.sampling_scheme=geometric", "sampling_scheme 'geometric' names none of"),
    ("model.n_embd=65", "n_embd 65 is not divisible by num_attention_heads 2"),
    ("train.stop_before_last_step=True", "max_steps=1, and the official rule"),
])
def test_bad_run_config_is_refused_before_the_workdir_exists(dataset, tmp_path, override, message):
    from parcae_jax import trainer

    cfg = small_config(dataset, "train.max_steps=1", override)
    with pytest.raises(trainer.ConfigError, match=message):
        trainer.train(cfg, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_train_cli_config_error_is_one_line_and_exit_2(dataset, tmp_path, capsys, monkeypatch):
    argv = train_argv(tmp_path / "w", dataset, "--config.train.loss_normalization=mean")
    code = run_main(argv, monkeypatch)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert err.strip() == ("error: train.loss_normalization='mean' is not one of ('micro_batch', "
                           "'global'); set --config.train.loss_normalization=...")
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_train_cli_none_override_switches_stop_criterion(dataset, tmp_path, capsys, monkeypatch):
    from parcae_jax import flops

    cfg = load_config(TINY, ["train.max_steps=None", "train.max_tokens=100000"])
    assert cfg.train.max_steps is None
    assert flops.training_budget(cfg).steps == 100000 // (16 * 128)
    code = run_main(train_argv(tmp_path / "w", dataset, "--config.train.max_steps=None",
                               "--config.train.max_tokens=768", "--config.train.eval_every=1"), monkeypatch)
    assert code in (0, None), capsys.readouterr().err[-3000:]
    rows = read_metrics(str(tmp_path / "w"))
    assert rows[-1]["step"] == 3 and rows[-1]["tokens"] == 768
    assert json.loads((tmp_path / "w" / "config.json").read_text())["train"]["max_tokens"] == 768


def test_metrics_file_resume_and_object_store_mode(tmp_path):
    """A resumed run drops the killed run's later lines; on object stores (no append; a file:// URL
    takes that path) the file is rewritten whole, with the same content."""
    from parcae_jax import metrics

    for remote in (False, True):
        folder = tmp_path / f"remote_{remote}"
        workdir = f"file://{folder}" if remote else str(folder)
        writer = metrics.MetricsWriter(workdir)
        for step in range(1, 6):
            writer.write({"step": step, "loss": 1.0 / step})
        writer.close()
        with open(folder / metrics.METRICS_FILE, "a") as f:
            f.write('{"step": 6, "lo')  # a line cut by SIGKILL
        writer = metrics.MetricsWriter(workdir, resume_step=3)
        writer.write({"step": 4, "loss": 9.0})
        writer.close()
        rows = read_metrics(workdir)
        assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == 9.0


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(dataset, tmp_path):
    """Preemption (SIGTERM): the step in flight finishes, a checkpoint of it is written, exit 0."""
    import signal
    import time

    workdir = tmp_path / "preempted"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=xla_flags(1))
    args = [sys.executable, str(REPO / "train.py"), "--config", TINY, "--workdir", str(workdir),
            *[f"--config.{o}" for o in SMALL], "--config.data.source=dir",
            f"--config.data.dataset_dir={dataset}", "--config.train.max_steps=100000",
            "--config.train.checkpoint_every=100000", "--config.train.eval_every=100000"]
    log = open(tmp_path / "train.log", "w+")  # a file, not a pipe: a full pipe would block the run
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    metrics_file = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics_file.exists() and metrics_file.read_text().count("\n") >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    log.seek(0)
    err = log.read()
    assert proc.returncode == 0, err[-3000:]
    assert "preempted" in err
    steps = checkpointing.Checkpointer(workdir).all_steps()
    assert len(steps) == 1 and steps[0] >= 3
    assert steps[0] == read_metrics(str(workdir))[-1]["step"]
