"""CEMA scan as Pallas kernels for TPU (Mosaic) and GPU (Triton), with a pure-JAX reference.

Independent of the model code: plain arrays in, plain arrays out. Unverified on TPU/GPU hardware; tested in
interpret mode on CPU.
"""

from pallas_kernels.cema.api import BlockSizes, cema_scan
from pallas_kernels.cema.reference import cema_scan_reference

__all__ = ["BlockSizes", "cema_scan", "cema_scan_reference"]
