"""`python -m megalodon_jax.convert ...`: `megalodon-convert` (megalodon_jax/cli/convert.py), on the CPU by default."""

import sys

from megalodon_jax.cli.convert import run

if __name__ == "__main__":
  sys.exit(run())
