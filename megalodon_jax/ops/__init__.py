"""The math of Megalodon as pure jnp functions (no Flax)."""
