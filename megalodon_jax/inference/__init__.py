"""Inference: sampling from a MegalodonLM with its constant-size streaming cache."""
