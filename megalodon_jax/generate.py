"""`python -m megalodon_jax.generate`: megalodon_jax/cli/generate.py."""

import sys

from megalodon_jax.cli.generate import main

if __name__ == "__main__":
  sys.exit(main())
