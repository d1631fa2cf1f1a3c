"""Every released config (configs/parcae_*.py, gpt_*.py) trains at tiny widths, in-process, with its own
recipe (packing, normalisation, update count, remat, guardrail); the GPT baseline also evaluates,
generates, converts to PyTorch and benchmarks."""

import json

import numpy as np
import pytest

from parcae_jax import trainer
from parcae_jax.cli_config import load_config
from tests.helpers import write_token_dataset

RELEASED = ("parcae_140m", "parcae_370m", "parcae_770m", "parcae_1_3b",
            "gpt_140m", "gpt_370m", "gpt_770m", "gpt_1_3b")
TINY_MODEL = ["model.n_embd=32", "model.num_attention_heads=2", "model.num_key_value_heads=2",
              "model.intermediate_size=64", "model.block_size=16", "model.vocab_size=256",
              "model.compute_dtype=float32"]
TINY_PARCAE = ["model.recurrent_embedding_dimension=32",
               "model.recurrent_intermediation_embedding_dimension=64", "model.n_layers_in_prelude=1",
               "model.n_layers_in_recurrent_block=1", "model.n_layers_in_coda=1"]
TINY_GPT = ["model.n_layer=2"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_token_dataset(tmp_path_factory.mktemp("released_data"), vocab_size=256, docs=120,
                               val_docs=16)


@pytest.fixture(scope="module")
def workdirs():
    return {}


def tiny_run(name, dataset, *extra):
    arch_overrides = TINY_PARCAE if name.startswith("parcae") else TINY_GPT
    return load_config(f"configs/{name}.py", [
        *TINY_MODEL, *arch_overrides, "train.max_tokens=None", "train.max_steps=3",
        "train.world_batch_size=8", "train.eval_iters=2", "train.eval_every=1000", "train.log_every=1",
        "data.source=dir", f"data.dataset_dir={dataset}", *extra])


@pytest.mark.slow
@pytest.mark.parametrize("name", RELEASED)
def test_released_config_trains(name, dataset, workdirs, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp(name))
    run = tiny_run(name, dataset)
    last = trainer.train(run, workdir)
    rows = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
    # The official update count: max_steps=3 runs 2 steps, and the update of step 0 is discarded.
    assert [r["step"] for r in rows] == [1, 2]
    assert np.isfinite(last["loss"]) and last["real_tokens"] == sum(r["target_tokens"] for r in rows)
    assert 0.0 <= last["padding_fraction"] < 1.0 and last["real_tokens"] <= last["tokens"]
    val = [k for k in last if k.startswith("val_loss")]
    assert val == (["val_loss"] if name.startswith("gpt") else ["val_loss_1", "val_loss_2", "val_loss_4",
                                                                "val_loss_8"])
    workdirs[name] = workdir


@pytest.mark.slow
def test_gpt_baseline_evaluates_generates_converts_and_benchmarks(dataset, workdirs, tmp_path, capsys):
    if "gpt_140m" not in workdirs:
        pytest.skip("needs test_released_config_trains[gpt_140m]")
    workdir = workdirs["gpt_140m"]
    from parcae_jax import convert, engine, loading
    from parcae_jax.bench import generate as bench_generate
    from parcae_jax.evaluation import runner

    config = load_config("configs/eval.py:loss", [f"checkpoint={workdir}", "max_rows=4", "batch_size=8"])
    results = runner.run(config, log=lambda *a: None)
    (by_depth,) = results["tasks"]["loss"]["depths"].values()
    assert results["checkpoint"]["arch"] == "gpt" and np.isfinite(by_depth["val_loss"])

    model = loading.load_model(workdir).model
    out = engine.generate(model, [[5, 6, 7]], max_new_tokens=4)
    assert len(out.tokens[0]) == 4

    exported = convert.to_torch(workdir, tmp_path / "torch")
    assert json.loads((exported / "config.json").read_text())["_class_name"] == "GPTConfig"

    overrides = [f"--config.{o}" for o in TINY_MODEL + TINY_GPT]
    bench_args = ["--prompt-len", "4", "--new-tokens", "4", "--depths", "1", "--repeats", "1"]
    assert bench_generate.main(["--config", "configs/gpt_140m.py", *overrides, *bench_args]) == 0
    assert "| - |" in capsys.readouterr().out  # a GPT has no depth column value
