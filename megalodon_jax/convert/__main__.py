"""`python -m megalodon_jax.convert ...` (see megalodon_jax/cli/convert.py)."""

import os
import sys

# Conversion is host work: keep JAX off any accelerator unless the caller chose a platform.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from megalodon_jax.cli.convert import main  # noqa: E402  (after the platform choice)

if __name__ == "__main__":
  sys.exit(main())
