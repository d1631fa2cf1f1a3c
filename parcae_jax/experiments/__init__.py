"""The paper's claims at a scale you choose: `python -m parcae_jax.experiments CLAIM --root DIR`.

Each claim is a module with `SCALES`, `runs(scale, data_dir)`, `analyze(points, outcomes, scale)`,
`draw(results, out)` and `summary(results)`; `__main__` plans its runs through the scaling runner,
trains them, and writes `results.json` and the PNGs.
"""

# claim name -> module (imported on use, so `list` and `--help` start no JAX)
CLAIMS = {
    "stability": "parcae_jax.experiments.stability",
    "parcae-vs-gpt": "parcae_jax.experiments.parcae_vs_gpt",
    "test-time-depth": "parcae_jax.experiments.test_time_depth",
    "isoflop": "parcae_jax.experiments.isoflop",
}
