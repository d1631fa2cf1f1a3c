"""Scaling-law toolkit: isoFLOP sweeps over the mean recurrence, and the paper's fits.

`python -m parcae_jax.scaling plan|run|status|fit` (see `cli.py`). Modules: `sweep` (sweep configs,
planned points), `state` (point status from its folder), `runner` (training and evaluation
subprocesses), `depth_sweep` (test-time losses of a checkpoint), `laws` (fits), `fit` (fits.json),
`plots` (PNGs). FLOP accounting lives in `parcae_jax.flops`.
"""
