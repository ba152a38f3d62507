"""`python -m megalodon_jax.evaluate`: megalodon_jax/cli/evaluate.py."""

import sys

from megalodon_jax.cli.evaluate import main

if __name__ == "__main__":
  sys.exit(main())
