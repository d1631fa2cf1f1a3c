"""Evaluation settings (`get_config(TASKS)`), kept in the package so installed copies have them too:
see parcae_jax/evaluation/config.py for every field.

    python eval.py --config configs/eval.py:loss,depth_sweep,core --config.checkpoint=runs/tiny
"""

from parcae_jax.evaluation.config import get_config

__all__ = ["get_config"]
