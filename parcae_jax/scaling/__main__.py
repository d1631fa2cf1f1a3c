import sys

from parcae_jax.scaling.cli import main

sys.exit(main())
