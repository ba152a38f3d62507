"""`python -m megalodon_jax.train_cli`: megalodon_jax/cli/train.py."""

import sys

from megalodon_jax.cli.train import main

if __name__ == "__main__":
  sys.exit(main())
