"""Scaling-law toolkit: sweep plans, point status, the runner, the fits and `scaling fit` end to end.

FLOPs/token of the eight released configs against the spec: tests/test_flops.py
(`test_released_params_and_flops_match_spec`), which the plans below build on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
from helpers import write_token_dataset

from parcae_jax import fileio, flops, presets
from parcae_jax.cli_config import load_config
from parcae_jax.errors import UserError
from parcae_jax.scaling import cli, fit, laws, runner, state, sweep

REPO = pathlib.Path(__file__).resolve().parents[1]
PAPER_SWEEP = str(REPO / "configs" / "sweeps" / "paper_140m.py")
TINY_SWEEP = str(REPO / "configs" / "sweeps" / "tiny_cpu.py")


# ---------------------------------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paper_plan(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    code = cli.main(
        ["plan", "--sweep", PAPER_SWEEP, "--root", str(root), "--device", "h100", "--num-devices", "8"]
    )
    assert code == 0
    return root


def test_paper_grid_plan_has_35_points_with_exact_budgets(paper_plan):
    plan, points = sweep.read_plan(paper_plan)
    assert len(points) == 35 and len({p.name for p in points}) == 35
    assert sorted({p.mean_recurrence for p in points}) == [1, 2, 4, 6, 8, 10, 12]
    assert sorted({p.flop_budget for p in points}) == [1e18, 2e18, 4e18, 8e18, 1.6e19]
    small = presets.released("parcae-small-140m")
    for p in points:
        r, k = p.mean_recurrence, math.ceil(p.mean_recurrence / 2)
        assert p.mean_backprop_depth == k
        fpt = flops.flops_per_token(dict(small, mean_recurrence=r, mean_backprop_depth=k))
        assert p.flops_per_token == fpt
        assert p.tokens == int(p.flop_budget) // fpt  # budgets are whole numbers: 1.6e19 is exact
        assert p.steps == p.tokens // (256 * 2048) and p.trained_tokens == p.steps * 256 * 2048
        assert p.total_flops == p.trained_tokens * fpt <= p.flop_budget
        budget = flops.training_budget(load_config(str(REPO / p.base_config), list(p.overrides)))
        assert (budget.tokens, budget.steps, budget.criterion) == (p.tokens, p.steps, "max_flops")
        assert p.test_depths[0] == 1 and max(p.test_depths) == max(2 * r, 4) and r in p.test_depths
    by_name = {p.name: p for p in points}
    assert by_name["rec08_flops1e18"].flops_per_token == 1_359_902_976  # spec §10, the released r̄=8, k̄=4
    assert by_name["rec08_flops1e18"].steps == 1402
    assert (
        by_name["rec01_flops1.6e19"].steps
        == (16 * 10**18 // by_name["rec01_flops1.6e19"].flops_per_token) // 524_288
    )


def test_plan_writes_exact_commands(paper_plan):
    point = json.loads((paper_plan / "rec04_flops1e18" / "point.json").read_text())
    expected = (
        f"python -m parcae_jax.train --config configs/parcae_140m.py --workdir {paper_plan}/rec04_flops1e18 "
        "--config.model.mean_recurrence=4 --config.model.mean_backprop_depth=2 "
        "--config.train.max_tokens=None --config.train.max_flops=1e18 --config.train.eval_every=1000000"
    )
    assert point["command"] == expected
    assert (paper_plan / "rec04_flops1e18" / "command.sh").read_text().endswith(expected + "\n")
    # A base config whose stop criterion is max_steps (tiny) gets max_steps=None instead.
    tiny = sweep.plan_points(sweep.load_sweep(TINY_SWEEP), paper_plan / "tiny")[0]
    assert tiny.overrides[2:4] == ("train.max_steps=None", "train.max_flops=2e11")


def test_plan_cli_prints_totals_and_wall_time(tmp_path, capsys):
    cli.main(["plan", "--sweep", TINY_SWEEP, "--root", str(tmp_path), "--device", "v5p", "--mfu", "0.5"])
    out = capsys.readouterr().out
    _, points = sweep.read_plan(tmp_path)
    official = sum(p.total_flops for p in points)
    hardware = sum(p.trained_tokens * p.hardware_flops_per_token for p in points)
    assert f"total {official:.4e} FLOPs" in out and f"{hardware:.4e} hardware FLOPs" in out
    assert sweep.estimated_seconds(points, 459e12, 0.5) == pytest.approx(hardware / (459e12 * 0.5))
    assert "1 × 459 TFLOP/s at 50% MFU" in out
    with pytest.raises(ValueError, match="unknown device"):
        cli.peak_for("gtx1080")


def test_sweep_helpers():
    assert [sweep.backprop_depth("ceil_half", r) for r in (1, 2, 5, 12)] == [1, 1, 3, 6]
    assert sweep.backprop_depth("equal", 5) == 5 and sweep.backprop_depth("fixed:3", 2) == 2
    with pytest.raises(ValueError):
        sweep.backprop_depth("half", 4)
    assert [sweep.format_budget(x) for x in (1e18, 1.6e19, 2e11, 3.5e20)] == [
        "1e18",
        "1.6e19",
        "2e11",
        "3.5e20",
    ]
    assert float(sweep.format_budget(1.6e19)) == 1.6e19


def test_replan_refuses_to_change_a_started_point(tmp_path):
    cfg = sweep.load_sweep(TINY_SWEEP)
    points = sweep.plan_points(cfg, tmp_path)
    sweep.write_plan(cfg, TINY_SWEEP, tmp_path, points)
    sweep.write_plan(cfg, TINY_SWEEP, tmp_path, points)  # same commands: fine
    (tmp_path / points[0].name / "metrics.jsonl").write_text("")
    changed = [pt.__class__(**{**pt.__dict__, "overrides": (*pt.overrides, "train.lr=0.1")}) for pt in points]
    with pytest.raises(ValueError, match="another command"):
        sweep.write_plan(cfg, TINY_SWEEP, tmp_path, changed)


# ---------------------------------------------------------------------------------------------------
# status and the runner
# ---------------------------------------------------------------------------------------------------


def fake_checkpoint(workdir: pathlib.Path, step: int) -> None:
    folder = workdir / "checkpoints" / str(step)
    folder.mkdir(parents=True)
    (folder / "_CHECKPOINT_METADATA").write_text("{}")


def test_status_classifies_points(tmp_path):
    cfg = sweep.load_sweep(TINY_SWEEP)
    points = sweep.plan_points(cfg, tmp_path)
    sweep.write_plan(cfg, TINY_SWEEP, tmp_path, points)
    done, running, failed, resumable, eval_only, dead = (tmp_path / p.name for p in points)
    fake_checkpoint(done, points[0].steps)
    fileio.write_json_atomic(done / state.RESULT_FILE, {"val_loss": 4.25})
    fileio.write_json_atomic(running / state.RUNNING_FILE, {"pid": os.getpid(), "host": socket.gethostname()})
    fileio.write_json_atomic(failed / state.FAILED_FILE, {"stage": "train", "returncode": 1})
    fake_checkpoint(resumable, 5)
    (resumable / "checkpoints" / "7.orbax-checkpoint-tmp-123").mkdir()  # an unfinished save: ignored
    fake_checkpoint(eval_only, points[4].steps)
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_info = {"pid": int(finished.stdout), "host": socket.gethostname()}
    fileio.write_json_atomic(dead / state.RUNNING_FILE, dead_info)

    got = [state.point_status(tmp_path / p.name, p) for p in points]
    assert [(s.state, s.detail) for s in got] == [
        ("done", ""),
        ("running", "step 0/196"),
        ("failed", "train rc=1"),
        ("pending", "resume@5"),
        ("pending", "eval only"),
        ("pending", ""),
    ]
    assert got[0].val_loss == 4.25 and got[3].last_step == 5
    table = cli.status_table(str(tmp_path))
    assert "1 done, 1 running, 3 pending, 1 failed" in table and "4.2500" in table


def test_run_records_a_failed_point_and_skips_finished_ones(tmp_path):
    cfg = sweep.load_sweep(TINY_SWEEP)
    points = sweep.plan_points(cfg, tmp_path)
    broken = points[1].__class__(**{**points[1].__dict__, "base_config": "configs/does_not_exist.py"})
    sweep.write_plan(cfg, TINY_SWEEP, tmp_path, [points[0], broken])
    fake_checkpoint(tmp_path / points[0].name, points[0].steps)
    fileio.write_json_atomic(tmp_path / points[0].name / state.RESULT_FILE, {"val_loss": 4.0})
    messages = []
    outcome = runner.run_sweep(tmp_path, say=messages.append)
    assert outcome == {points[0].name: "done", broken.name: "failed"}
    failure = json.loads((tmp_path / broken.name / state.FAILED_FILE).read_text())
    assert failure["stage"] == "train" and failure["returncode"] != 0
    assert "does_not_exist" in failure["log_tail"]
    assert not (tmp_path / broken.name / state.RUNNING_FILE).exists()
    # Failed points wait for --retry-failed.
    assert runner.run_sweep(tmp_path, say=messages.append)[broken.name] == "failed"
    assert any("failed train rc=" in m and "skipped" in m for m in messages)
    pod = runner.train_command(points[0], "pod", ["--name", "s", "--zone", "z"])
    assert pod[:6] == ["bash", "tpu_setup/launch.sh", "--name", "s", "--zone", "z"]
    assert pod[6:] == points[0].train_args()


def test_pod_runs_are_awaited_through_the_shared_workdir(tmp_path, monkeypatch):
    """The pod launcher returns while train.py runs on the workers: the runner polls for the final
    checkpoint, reporting the logged step."""
    point = sweep.plan_points(sweep.load_sweep(TINY_SWEEP), tmp_path)[0]
    workdir = pathlib.Path(point.workdir)
    workdir.mkdir(parents=True)
    polls = []

    def fake_sleep(seconds):
        polls.append(seconds)
        if len(polls) == 1:
            (workdir / "metrics.jsonl").write_text(json.dumps({"step": 100}) + "\n")
        else:
            fake_checkpoint(workdir, point.steps)

    monkeypatch.setattr(runner.time, "sleep", fake_sleep)
    messages = []
    runner.wait_for_final_checkpoint(point, 30.0, messages.append)
    assert polls == [30.0, 30.0]
    assert messages[0].endswith("(step 0/208)") and messages[1].endswith("(step 100/208)")


def test_depth_sweep_command_and_reader(tmp_path):
    point = sweep.plan_points(sweep.load_sweep(TINY_SWEEP), tmp_path)[2]  # r̄ = 4
    via_eval = runner.depth_sweep_command(point, "out.json", python="python")
    assert via_eval[:4] == ["python", "-m", "parcae_jax.eval", "--config"]
    assert via_eval[4].endswith("parcae_jax/evaluation/config.py:depth_sweep")
    assert "--config.sweep_depths=1,2,3,4,6,8" in via_eval and "--config.max_rows=64" in via_eval
    whole = dataclasses.replace(point, depth_sweep_batches=None)  # the run's own validation set
    assert "--config.max_rows=0" in runner.depth_sweep_command(whole, "out.json", python="python")
    doc = tmp_path / "eval.json"
    doc.write_text(
        json.dumps({"tasks": {"depth_sweep": {"depths": [1, 2], "losses": [5.0, 4.5], "fit": None}}})
    )
    assert runner.read_depth_sweep(doc) == {"depths": [1, 2], "losses": [5.0, 4.5], "source": "eval.py"}
    last = {
        "step": point.steps,
        "loss": 4.4,
        "tokens": point.trained_tokens,
        "val_loss_1": 4.6,
        "val_loss_4": 4.5,
    }
    result = runner.build_result(point, last, None)
    assert result["val_loss"] == 4.5 and result["val_loss_by_depth"] == {"1": 4.6, "4": 4.5}
    assert fit.depth_curve(result) == ([1, 4], [4.6, 4.5])  # no sweep: the final losses by depth
    with pytest.raises(ValueError, match="not 159"):
        runner.build_result(point, {**last, "step": 3}, None)


@pytest.mark.slow
def test_run_evaluates_a_trained_point_with_the_eval_depth_sweep(tmp_path):
    """A point trained in process (2 steps): `run` skips training, runs the eval depth-sweep subprocess
    and writes result.json; at the training recurrence, the sweep reproduces the trainer's final val
    loss (it scores the run's own validation set)."""
    from parcae_jax import trainer

    data = write_token_dataset(tmp_path / "data", vocab_size=256)
    small = [
        "model.block_size=32", "model.n_embd=32", "model.num_attention_heads=2",
        "model.num_key_value_heads=2", "model.n_layers_in_recurrent_block=1", "model.intermediate_size=64",
        "model.recurrent_embedding_dimension=32",
        "model.recurrent_intermediation_embedding_dimension=64", "model.vocab_size=256",
        "train.world_batch_size=8", "train.micro_batch_size=1", "train.eval_iters=2",
        "data.source=dir", f"data.dataset_dir={data}",
    ]  # fmt: skip
    fpt = flops.flops_per_token(load_config(str(REPO / "configs" / "tiny.py"), small), f=2, b=1)
    budget = fpt * 8 * 32 * 2.5  # 2.5 steps of 8 rows × 32 tokens at r̄ = 2, k̄ = 1: 2 whole steps
    spec = dict(
        name="t", base_config="configs/tiny.py", overrides=tuple(small), mean_recurrences=(2,),
        backprop_depth="ceil_half", flop_budgets=(float(round(budget)),),
        depth_sweep=dict(depths=(1, 2, 3, 4), max_factor=2.0, min_max_depth=4, batches=None, batch_size=8),
    )  # fmt: skip
    config = tmp_path / "sweep.py"
    header = "import ml_collections\n\n\ndef get_config(arg=None):\n"
    config.write_text(header + f"    return ml_collections.ConfigDict({spec!r})\n")
    root = tmp_path / "root"
    cli.main(["plan", "--sweep", str(config), "--root", str(root)])
    _, [point] = sweep.read_plan(root)
    assert point.steps == 2
    trainer.train(load_config(str(REPO / point.base_config), list(point.overrides)), point.workdir)
    outcome = runner.run_sweep(root, say=print)
    assert outcome == {point.name: "done"}
    result = json.loads((root / point.name / state.RESULT_FILE).read_text())
    sweep_losses = dict(zip(result["depth_sweep"]["depths"], result["depth_sweep"]["losses"], strict=True))
    assert sorted(sweep_losses) == [1, 2, 3, 4]
    assert sweep_losses[2] == pytest.approx(result["val_loss"], rel=1e-6)
    assert sweep_losses[1] == pytest.approx(result["val_loss_by_depth"]["1"], rel=1e-6)
    assert state.point_status(root / point.name, point).state == "done"


# ---------------------------------------------------------------------------------------------------
# fits on synthetic data from known laws
# ---------------------------------------------------------------------------------------------------

TRUE_LAW = laws.UnifiedLaw(E=1.8, A=0.5, alpha=0.6, B=0.8, beta=0.35, Z=1.5, z=2.0)
RECURRENCES = (1, 2, 4, 6, 8, 10, 12)
BUDGETS = (1e18, 2e18, 4e18, 8e18, 1.6e19)


def fpt_140m(mu: int) -> float:
    """FLOPs/token of the 140M model at (r̄, ⌈r̄/2⌉) is affine in r̄ (official formula)."""
    return 6.64e8 + 8.18e7 * mu + 8.18e7 * math.ceil(mu / 2)


def synthetic_results(noise: float, seed: int = 0) -> list[dict]:
    """result.json contents of the paper grid, losses from TRUE_LAW with relative Gaussian noise."""
    rng = np.random.default_rng(seed)
    results = []
    for c in BUDGETS:
        for mu in RECURRENCES:
            tokens = int(c // fpt_140m(mu))
            depths = [d for d in (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24) if d <= max(2 * mu, 4)]
            losses = TRUE_LAW(mu, tokens, np.array(depths)) * (1 + noise * rng.standard_normal(len(depths)))
            results.append({
                "name": sweep.point_name(mu, c), "mean_recurrence": mu, "flop_budget": c, "tokens": tokens,
                "val_loss": float(losses[depths.index(mu)]),
                "val_loss_by_depth": {str(mu): float(losses[depths.index(mu)])},
                "depth_sweep": {"depths": depths, "losses": losses.tolist()},
            })  # fmt: skip
    return results


def test_unified_law_recovers_known_parameters():
    results = synthetic_results(noise=0.003)
    data = fit.unified_data(results)
    got = laws.fit_unified_law(data["mu"], data["tokens"], data["depth"], data["loss"], runs=data["run"])
    p = got["params"]
    assert abs(p["alpha"] - TRUE_LAW.alpha) < 0.02 and abs(p["beta"] - TRUE_LAW.beta) < 0.02
    assert p["Z"] == pytest.approx(TRUE_LAW.Z, rel=0.02) and p["z"] == pytest.approx(TRUE_LAW.z, rel=0.02)
    assert p["E"] == pytest.approx(TRUE_LAW.E, rel=0.02)
    assert got["mean_rel_error"] < 0.004 and got["loo_mean_rel_error"] < 0.004  # noise level 0.3%
    assert got["num_runs"] == 35 and 0 < got["param_errors"]["alpha"] < 0.05


def parabola_results(exponent: float, axis: str, noise: float, seed: int = 1) -> list[dict]:
    """Per budget, loss = L0(C) + q·(ln x − ln x*(C))² with x*(C) = k·C^exponent, x = μ or tokens."""
    rng = np.random.default_rng(seed)
    results = []
    for c in BUDGETS:
        for mu in RECURRENCES:
            tokens = int(c // fpt_140m(mu))
            x = mu if axis == "recurrence" else tokens
            optimum = (2.0 / 1e18**exponent if axis == "recurrence" else 1.2e9 / 1e18**exponent) * c**exponent
            loss = 3.0 - 0.05 * math.log(c / 1e18) + 0.08 * math.log(x / optimum) ** 2
            loss *= 1 + noise * rng.standard_normal()
            results.append({"name": sweep.point_name(mu, c), "mean_recurrence": mu, "flop_budget": c,
                            "tokens": tokens, "val_loss": loss})  # fmt: skip
    return results


@pytest.mark.parametrize("axis, exponent", [("recurrence", 0.40), ("tokens", 0.78)])
def test_isoflop_parabolas_and_power_law_recover_exponents(axis, exponent):
    isoflops = fit.fit_isoflops(parabola_results(exponent, axis, noise=0.001))
    key = "recurrence" if axis == "recurrence" else "tokens_fit"
    for b in isoflops:
        assert b[key]["ok"] and b[key]["interior"] and 0 < b[key]["log_optimum_err"] < 0.2
    law = fit.fit_power_laws(isoflops)[axis]
    assert abs(law["exponent"] - exponent) < 0.02 and law["num_budgets"] == 5 and law["weighted"]
    assert 0 < law["exponent_err"] < 0.05


def test_isoflop_and_power_law_edge_cases():
    assert not laws.isoflop_optimum([1, 2], [3.0, 2.9])["ok"]  # too few points
    down = laws.isoflop_optimum([1, 2, 4, 8], [3.0, 3.2, 3.3, 3.1])
    assert not down["ok"] and "downwards" in down["reason"]
    exact = laws.isoflop_optimum([1, 2, 4], [3.0 + math.log(x / 2) ** 2 for x in (1, 2, 4)])
    assert exact["optimum"] == pytest.approx(2.0) and math.isnan(exact["log_optimum_err"])
    two = laws.fit_power_law([1e18, 4e18], [2.0, 2.0 * 4**0.5])
    assert two["exponent"] == pytest.approx(0.5) and math.isnan(two["exponent_err"])


# ---------------------------------------------------------------------------------------------------
# `scaling fit` end to end on a synthetic results folder
# ---------------------------------------------------------------------------------------------------


def test_fit_cli_end_to_end(tmp_path, capsys):
    for result in synthetic_results(noise=0.0005, seed=3):
        folder = tmp_path / result["name"]
        folder.mkdir()
        fileio.write_json_atomic(folder / state.RESULT_FILE, result)
    assert cli.main(["fit", "--root", str(tmp_path), "--out", str(tmp_path / "fits")]) == 0
    out = capsys.readouterr().out
    assert "35 finished runs" in out and "leave-one-run-out" in out
    fits = json.loads((tmp_path / "fits" / "fits.json").read_text())
    assert [b["flop_budget"] for b in fits["isoflop"]] == list(BUDGETS)
    assert set(fits["power_laws"]) == {"recurrence", "tokens"}
    for law in fits["power_laws"].values():
        assert "exponent" in law or "error" in law
    assert abs(fits["unified"]["params"]["beta"] - TRUE_LAW.beta) < 0.02
    # Per run, the test-time law's decay is z/μ of the unified law (the depth enters as T/μ).
    for name, res in fits["runs"].items():
        per_run = fits["test_time"][name]
        if res["mean_recurrence"] >= 4:
            assert per_run["z"] == pytest.approx(TRUE_LAW.z / res["mean_recurrence"], rel=0.02), name
            assert per_run["Z"] == pytest.approx(TRUE_LAW.Z, rel=0.02), name
        assert per_run["saturating"], name
    for name in ("isoflop.png", "power_laws.png", "test_time.png", "predicted_vs_observed.png"):
        png = (tmp_path / "fits" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, name
    assert fits["plots"] == ["isoflop.png", "power_laws.png", "test_time.png", "predicted_vs_observed.png"]


def test_fit_without_results_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match="scaling run"):
        fit.run_fit(tmp_path)
