"""Counting how often jitted functions are traced, for the tests that check programs are reused.

jax reports each trace of a top-level jitted call as a monitoring event (`fun_name` = the Python function's name).
A jitted function's own `_cache_size()` is not usable for this: its entries live in one LRU shared by every jitted
call in the process, so late in a long test session a new program can evict an old one of the same function and
the count stays flat.
"""

import collections
import contextlib

import jax

_TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"


@contextlib.contextmanager
def count_traces(*fun_names: str):
  """Yields a Counter of traces per name in `fun_names`, updated live while the block runs."""
  counts = collections.Counter({name: 0 for name in fun_names})

  def listener(event, _duration, **kwargs):
    if event == _TRACE_EVENT and kwargs.get("fun_name") in counts:
      counts[kwargs["fun_name"]] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield counts
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
