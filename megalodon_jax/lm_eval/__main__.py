"""`python -m megalodon_jax.lm_eval`: megalodon_jax/cli/lm_eval.py."""

import sys

from megalodon_jax.cli.lm_eval import main

if __name__ == "__main__":
  sys.exit(main())
