"""Train a Parcae (or GPT baseline) model from a checkout: the same as `python -m parcae_jax.train`.

    python train.py --config configs/tiny.py --workdir runs/tiny

See `parcae_jax/train.py` for the flags and exit statuses.
"""

import sys

from parcae_jax.train import main

if __name__ == "__main__":
    main(sys.argv)
