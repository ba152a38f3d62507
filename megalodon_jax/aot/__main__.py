"""`python -m megalodon_jax.aot`: see megalodon_jax/cli/aot.py."""

import sys

from megalodon_jax.cli.aot import main

if __name__ == "__main__":
  sys.exit(main())
