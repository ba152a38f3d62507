"""Training utilities: the official optimizer, learning-rate schedule and gradient clipping in optax."""
