"""parcae-jax: Parcae stable looped language models in JAX/Flax NNX."""

from parcae_jax.config import ModelConfig

__version__ = "0.1.0"

# The models are imported on first use, not with the package: importing a JAX-free submodule (a
# config file's `parcae_jax.evaluation.tasks`) must not import JAX.
_MODEL_EXPORTS = ("GPT", "Parcae", "build_model")


def __getattr__(name: str):
    if name in _MODEL_EXPORTS:
        from parcae_jax import model

        return getattr(model, name)
    raise AttributeError(f"module 'parcae_jax' has no attribute {name!r}")


def load_pretrained(path, **overrides):
    """A model from a parcae-jax pretrained folder or an official PyTorch folder (see `pretrained`)."""
    from parcae_jax.pretrained import load_pretrained as _load

    return _load(path, **overrides)


__all__ = ["GPT", "ModelConfig", "Parcae", "build_model", "load_pretrained"]
