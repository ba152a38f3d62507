"""`python -m megalodon_jax.aot`: see megalodon_jax/aot/cli.py."""

from megalodon_jax.aot.cli import run

if __name__ == "__main__":
  run()
