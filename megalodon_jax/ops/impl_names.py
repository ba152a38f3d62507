"""The implementations a config chooses between, by name, and what the Pallas attention kernel cannot do. No jax
import: MegalodonConfig checks against these before jax starts; ops/cema/dispatch.py and ops/attention.py use them."""

from __future__ import annotations

# Each is `cema_<name>` of ops/cema/<name>.py (dispatch.IMPLEMENTATIONS); a config may also say "auto".
CEMA_IMPLEMENTATIONS = ("fft", "associative_scan", "sequential", "chunked", "pallas")
ATTENTION_IMPLEMENTATIONS = ("xla", "pallas")  # a config may also say "auto" (ops/attention.resolve_attention_impl)


def pallas_dropout_problem(attention_dropout: float, drop_key: bool) -> str | None:
  """Why attention_impl='pallas' cannot run this attention dropout (its kernels implement DropKey only), or None."""
  if attention_dropout > 0 and not drop_key:
    return ("implements DropKey attention dropout only: with attention_dropout > 0 set efficient_attn to 'swift' or "
            "'fused', or use attention_impl='xla' for plain softmax dropout")
  return None
