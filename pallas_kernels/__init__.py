"""Pallas kernels for Megalodon's two hot spots, independent of the model package (nothing here imports
megalodon_jax): `pallas_kernels.chunked_attention` (block-diagonal causal attention) and `pallas_kernels.cema`
(the complex EMA recurrence). Each subpackage has a pure-JAX reference next to its TPU (Mosaic) and GPU (Triton)
kernels, and runs on CPU in interpret mode."""
