"""Helpers shared by the benchmark scripts: compiled-memory accounting and a machine/version record."""

from __future__ import annotations

import os
import platform

import jax


def memory_bytes(compiled) -> dict:
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  out = {k: int(getattr(stats, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                               "temp_size_in_bytes", "alias_size_in_bytes")}
  peak = getattr(stats, "peak_memory_in_bytes", 0)
  if peak:
    out["peak_memory_in_bytes"] = int(peak)
  out["total_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"] + out["temp_size_in_bytes"]
                        - out["alias_size_in_bytes"])
  return out


def machine_info() -> dict:
  import jaxlib  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  info = {"platform": dev.platform, "device_kind": dev.device_kind, "device_count": jax.device_count(),
          "jax": jax.__version__, "jaxlib": jaxlib.__version__, "python": platform.python_version(),
          "cpu_count": os.cpu_count(), "machine": platform.machine()}
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
  except OSError:
    pass
  return info
