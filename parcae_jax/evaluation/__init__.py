"""Evaluation of Parcae / GPT checkpoints: held-out loss and bits per byte, test-time depth scaling,
the DCLM CORE / Core-Extended suites, LAMBADA and sampling. `eval.py` is the command line;
`runner.run(config)` the entry point; `scoring.TokenScorer` the batched, sharded scoring primitive."""

from parcae_jax.evaluation.core import centered_accuracy
from parcae_jax.evaluation.scoring import TokenScorer
from parcae_jax.evaluation.testtime_law import fit_test_time_law

__all__ = ["TokenScorer", "centered_accuracy", "fit_test_time_law"]
