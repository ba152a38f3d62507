"""Chunked (block-diagonal) causal attention as Pallas kernels for TPU (Mosaic) and GPU (Triton)."""

from pallas_kernels.chunked_attention.api import chunked_attention, chunked_attention_decode, resolve_backend
from pallas_kernels.chunked_attention.blocks import BlockSizes
from pallas_kernels.chunked_attention.layout import decode_supports_chunk_size
from pallas_kernels.chunked_attention.reference import chunked_attention_reference, decode_attention_reference

__all__ = ["BlockSizes", "chunked_attention", "chunked_attention_decode", "chunked_attention_reference",
           "decode_attention_reference", "decode_supports_chunk_size", "resolve_backend"]
