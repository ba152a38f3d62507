"""Complex exponential moving average (CEMA, docs/model.md#cema): coefficients, implementations, dispatcher.

Imports point one way: coefficients.py <- powers.py, final_state.py <- one file per implementation (fft.py,
associative_scan.py, sequential.py, chunked.py, pallas.py) <- dispatch.py <- this package's namespace. fft.py
runs chunked.py for document resets (no convolution form). Every implementation takes `resets`, (B, L) bool.
"""

from megalodon_jax.ops.cema.coefficients import CEMACoeffs, cema_coefficients
from megalodon_jax.ops.cema.dispatch import IMPLEMENTATIONS, cema, default_impl
from megalodon_jax.ops.cema.powers import cema_kernel, initial_state_contribution

__all__ = ["CEMACoeffs", "IMPLEMENTATIONS", "cema", "cema_coefficients", "cema_kernel", "default_impl",
           "initial_state_contribution"]
