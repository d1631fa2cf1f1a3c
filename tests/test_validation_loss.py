"""Validation during training is the evaluation package's loss task: eval.py on a training workdir
reproduces the trainer's last `val_loss_<d>` at every depth it logged."""

from __future__ import annotations

import pathlib

import pytest
from helpers import write_token_dataset

from parcae_jax import trainer
from parcae_jax.cli_config import load_config
from parcae_jax.evaluation import runner
from parcae_jax.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = [
    "model.block_size=32",
    "model.n_embd=32",
    "model.num_attention_heads=2",
    "model.num_key_value_heads=2",
    "model.intermediate_size=64",
    "model.recurrent_embedding_dimension=32",
    "model.recurrent_intermediation_embedding_dimension=64",
    "model.vocab_size=256",
    "train.world_batch_size=8",
    "train.micro_batch_size=1",
    "train.max_steps=3",
    "train.eval_iters=3",
    "train.partial_depth_eval=(1, 2)",
]


@pytest.mark.parametrize("packing", [pytest.param("best-fit", marks=pytest.mark.slow), "bos"])
def test_eval_loss_on_a_workdir_equals_the_trainers_val_loss(tmp_path, packing):
    dataset = write_token_dataset(tmp_path / "data", vocab_size=256)
    overrides = [*SMALL, "data.source=dir", f"data.dataset_dir={dataset}", f"data.packing={packing}"]
    run_cfg = load_config(str(REPO / "configs" / "tiny.py"), overrides)
    workdir = tmp_path / "run"
    trainer.train(run_cfg, str(workdir))
    logged = read_metrics(str(workdir))[-1]
    depths = sorted(int(k.rsplit("_", 1)[1]) for k in logged if k.startswith("val_loss_"))
    assert depths == [1, 2, int(run_cfg.model.mean_recurrence)]

    # A different batch size and mesh than the trainer's: the rows and their noise must not depend on them.
    eval_cfg = load_config(str(REPO / "configs" / "eval.py") + ":loss",
                           [f"checkpoint={workdir}", f"depths={','.join(map(str, depths))}", "batch_size=5"])
    results = runner.run(eval_cfg, log=lambda *a, **k: None)
    section = results["tasks"]["loss"]
    assert section["source"]["rule"] == "the training run's validation set"
    assert section["source"]["packing"] == packing
    for d in depths:
        ours = section["depths"][str(d)]["val_loss"]
        assert ours == pytest.approx(logged[f"val_loss_{d}"], rel=1e-6, abs=1e-6), d
    # The depths differ, so the comparison can fail.
    assert abs(logged["val_loss_1"] - logged[f"val_loss_{depths[-1]}"]) > 1e-4
