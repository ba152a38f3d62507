"""`python -m megalodon_jax.aot`: see megalodon_jax/cli/aot.py."""

from megalodon_jax.cli.aot import run

if __name__ == "__main__":
  run()
