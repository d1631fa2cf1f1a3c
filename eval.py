"""Evaluate a checkpoint from a checkout: the same as `python -m parcae_jax.eval`.

    python eval.py --config configs/eval.py:loss,depth_sweep,core --config.checkpoint=runs/tiny

See `parcae_jax/eval.py` for the options.
"""

import sys

from parcae_jax.eval import main

if __name__ == "__main__":
    main(sys.argv)
