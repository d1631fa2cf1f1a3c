"""parcae-jax: Parcae stable looped language models in JAX/Flax NNX."""

from parcae_jax.config import ModelConfig
from parcae_jax.model import GPT, Parcae, build_model

__version__ = "0.1.0"


def load_pretrained(path, **overrides):
    """A model from a parcae-jax pretrained folder or an official PyTorch folder (see `pretrained`)."""
    from parcae_jax.pretrained import load_pretrained as _load

    return _load(path, **overrides)


__all__ = ["GPT", "ModelConfig", "Parcae", "build_model", "load_pretrained"]
