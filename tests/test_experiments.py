"""The claims' plumbing at micro scale (in process, a few steps per run): plan → train → analyse →
results.json and PNGs, resumption, and the measurements' definitions. Not the science."""

import json
import math
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import hf_tokenizer, write_token_dataset

from parcae_jax.experiments import CLAIMS, stability, test_time_depth
from parcae_jax.experiments.__main__ import main, run_claim
from parcae_jax.injection import spectral_radius

BUNDLE = pathlib.Path(__file__).parent / "fixtures" / "eval_bundle_tiny"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Synthetic tokens of vocabulary 320 whose metadata names a real (300-piece) tokenizer, so the
    models can be scored on an eval bundle."""
    base = tmp_path_factory.mktemp("data")
    path = write_token_dataset(base / "d", vocab_size=320)
    (base / "tok").mkdir()
    meta_path = pathlib.Path(path) / "metadata.json"
    meta = json.loads(meta_path.read_text())
    from parcae_jax.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(hf_tokenizer(base / "tok"))
    meta["tokenizer"] |= {"path": tokenizer.path, "fingerprint": tokenizer.fingerprint}
    meta_path.write_text(json.dumps(meta))
    return path


@pytest.fixture(scope="module")
def micro(dataset, tmp_path_factory):
    """Every claim run once at micro scale; {claim: (root, results)}."""
    base = tmp_path_factory.mktemp("claims")
    out = {}
    for claim in CLAIMS:
        root = base / claim
        bundle = dict(bundle=str(BUNDLE), max_per_task=4) if claim == "parcae-vs-gpt" else {}
        out[claim] = (
            root,
            run_claim(claim, str(root), "micro", data_dir=dataset, say=lambda _: None, **bundle),
        )
    return out


@pytest.mark.slow  # the module's micro-scale claims take about 2 minutes
def test_every_claim_writes_results_and_plots(micro):
    for claim, (root, results) in micro.items():
        on_disk = json.loads((root / "results.json").read_text())
        assert on_disk["claim"] == claim and on_disk["environment"]["scale"] == "micro"
        assert on_disk["plots"], claim
        for name in on_disk["plots"]:
            assert (root / name).stat().st_size > 1000, (claim, name)
        assert results["runs_seconds"] > 0


@pytest.mark.slow  # the module's micro-scale claims take about 2 minutes
def test_stability_measures_every_injection(micro):
    _, results = micro["stability"]
    runs = {e["injection"]: e for e in results["runs"]}
    assert sorted(runs) == sorted(stability.INJECTIONS)
    assert 0 < runs["diagonal"]["rho_last"] < 1  # contractive by construction
    assert runs["add"]["rho_last"] == 1.0  # identity state matrix
    assert runs["linear"]["rho_last"] > 0
    for e in runs.values():
        assert e["steps_run"] == 4 and e["diverged"] is False and len(e["rho_curve"]["rho"]) == 4
        assert e["lr"] == pytest.approx(8 * results["recipe_rates"]["lr"])


@pytest.mark.slow  # the module's micro-scale claims take about 2 minutes
def test_parcae_vs_gpt_matches_tokens_and_flops(micro):
    _, results = micro["parcae-vs-gpt"]
    runs = results["runs"]
    assert runs["gpt_tokens"]["tokens"] == runs["parcae"]["tokens"]
    assert runs["gpt_flops"]["tokens"] > runs["parcae"]["tokens"]  # a GPT token costs fewer FLOPs
    # equal FLOPs to within one GPT step
    step_flops = runs["gpt_flops"]["training_flops"] / runs["gpt_flops"]["steps"]
    assert abs(runs["gpt_flops"]["training_flops"] - runs["parcae"]["training_flops"]) <= step_flops
    # a parameter-matched pair: the same unique parameters up to the injection's
    assert runs["gpt_tokens"]["params"]["total"] == pytest.approx(runs["parcae"]["params"]["total"], rel=0.05)
    assert set(results["verdict"]) >= {"equal_tokens", "equal_flops"}
    assert set(results["core"]) == set(runs)  # every model scored on the bundle's CORE tasks
    for core in results["core"].values():
        assert core["core_tasks"] > 0 and core["accuracy"] and core["max_per_task"] == 4


@pytest.mark.slow  # the module's micro-scale claims take about 2 minutes
def test_test_time_depth_sweeps_to_three_times_the_training_recurrence(micro):
    _, results = micro["test-time-depth"]
    run = results["runs"]["rec2"]
    assert run["depths"] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(x) for x in run["losses"]) and "L_inf" in run["fit"]


@pytest.mark.slow  # the module's micro-scale claims take about 2 minutes
def test_isoflop_fits_the_sweep(micro):
    _, results = micro["isoflop"]
    assert [b["flop_budget"] for b in results["budgets"]] == sorted(
        b["flop_budget"] for b in results["budgets"]
    )
    assert all(set(b["losses_by_recurrence"]) == {1, 2} for b in results["budgets"])


@pytest.mark.slow  # the module's micro-scale claims take about 2 minutes
def test_rerun_resumes_only_what_is_missing(micro, dataset):
    """A finished claim re-run trains nothing; a run whose result is gone is evaluated again from its final
    checkpoint without training (the runner's resume from a mid-run checkpoint: tests/test_scaling.py)."""
    root, first = micro["test-time-depth"]
    said = []
    again = run_claim("test-time-depth", str(root), "micro", data_dir=dataset, say=said.append)
    assert not any("training" in line for line in said)
    assert again["runs"]["rec2"]["losses"] == first["runs"]["rec2"]["losses"]
    (root / "rec2" / "result.json").unlink()
    said.clear()
    run_claim("test-time-depth", str(root), "micro", data_dir=dataset, say=said.append)
    assert not any("training" in line for line in said)  # checkpoint kept: only evaluated again
    assert json.loads((root / "rec2" / "result.json").read_text())["steps"] == 4


def test_cli_lists_claims_and_refuses_bad_input(capsys):
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in CLAIMS)
    assert main(["nope", "--root", "x"]) == 2
    assert "unknown claim" in capsys.readouterr().err
    assert main(["stability", "--root", "x", "--scale", "gpu"]) == 2
    assert "--data-dir" in capsys.readouterr().err


def test_spikes_and_divergence_definitions():
    flat = [5.0] * 40
    assert stability.spikes(flat) == 0
    spiky = flat[:20] + [6.0, 6.1] + flat[:10] + [7.0] + flat[:7]
    assert stability.spikes(spiky) == 2  # two events; the two-step one counts once
    rows = [{"step": i + 1, "loss": v, "rho_A": 0.5} for i, v in enumerate([8.0, 7.0, float("nan")])]
    measured = stability.measure(rows)
    assert measured["diverged"] and measured["nonfinite_loss"] and measured["steps_run"] == 3
    rising = [{"step": i + 1, "loss": 5.0 + i} for i in range(12)]
    assert stability.measure(rising)["diverged"]  # ends above where it started


def test_saturation_point():
    depths = list(range(1, 13))
    losses = [3.0 + 2.0 * math.exp(-0.9 * t) for t in depths]
    fit = test_time_depth.fit_test_time_law(depths, losses)
    sat = test_time_depth.saturation(depths, losses, fit)
    assert sat["t_sat_fit"] == pytest.approx(1 + math.log(100) / 0.9, rel=1e-3)
    assert sat["t_empirical"] == next(
        t for t, v in zip(depths, losses, strict=True) if v <= min(losses) + 0.01
    )


def test_spectral_radius_matches_eigenvalues():
    rng = np.random.default_rng(0)
    rotation = np.array([[0.0, -1.2], [1.2, 0.0]], np.float32)  # complex pair, |λ| = 1.2
    cases = [
        rng.normal(size=(48, 48)).astype(np.float32) / 7,
        rotation,
        np.diag([0.3, -0.9]).astype(np.float32),
    ]
    for m in cases:
        expected = np.abs(np.linalg.eigvals(m)).max()
        assert float(spectral_radius(jnp.asarray(m))) == pytest.approx(expected, rel=1e-4)
