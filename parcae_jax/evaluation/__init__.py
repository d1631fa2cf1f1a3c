"""Evaluation of Parcae / GPT checkpoints: held-out loss and bits per byte, test-time depth scaling,
the DCLM CORE / Core-Extended suites, LAMBADA and sampling. `eval.py` is the command line;
`runner.run(config)` the entry point; `tasks` the task registry; `scoring.TokenScorer` the batched,
sharded scoring primitive.

Nothing is imported here: `configs/eval.py` imports `tasks.TASKS`, and loading a config must not
import JAX."""
