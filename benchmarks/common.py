"""Helpers shared by the benchmark scripts: one timing loop, compiled-memory accounting and a machine/version
record."""

from __future__ import annotations

import os
import platform
import statistics
import time

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


def time_runs(run, repeats: int, *, warmups: int = 1) -> list[float]:
  """Wall seconds of `repeats` calls of `run()`, after `warmups` untimed ones; each call ends when what it returns is
  ready (`jax.block_until_ready`), so asynchronous dispatch is not mistaken for speed. `run` may carry state from
  call to call (a donated train state, a decode cache) through its closure."""
  for _ in range(warmups):
    jax.block_until_ready(run())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - t0)
  return times


def compile_and_time(fn, inputs: tuple, result: dict, *, max_bytes: int, max_seconds: float, repeats: int,
                     fit_repeats: bool = False):
  """Compiles `fn` ahead of time, checks its buffers against `max_bytes`, then times it; fills `result`.

  Sets `compile_s`, `memory`, then either status "error" (did not compile), "skip" (over `max_bytes`), or
  `times_s`, `median_ms` and status "ok" / "slow" ("slow": only the warm-up run, which took over `max_seconds`).
  Times are `repeats` runs after one warm-up run, each ended with `block_until_ready`; with `fit_repeats` the
  runs are also capped (at least one) so that they take about `max_seconds` in all.

  Returns:
    The compiled function when it ran, else None.
  """
  t0 = time.perf_counter()
  try:
    compiled = jax.jit(fn).lower(*inputs).compile()
  except Exception as e:  # pylint: disable=broad-except
    # e.g. a kernel that does not lower on this backend, or cuDNN refusing a shape: record it, keep sweeping.
    result.update(status="error", error=f"{type(e).__name__}: {str(e)[:300]}")
    return None
  result["compile_s"] = time.perf_counter() - t0
  result["memory"] = memory_bytes(compiled)
  if result["memory"].get("total_bytes", 0) > max_bytes:
    result.update(status="skip", reason=f"needs {result['memory']['total_bytes'] / 2**20:.0f} MiB")
    return None
  run = lambda: compiled(*inputs)  # noqa: E731
  (first,) = time_runs(run, 1, warmups=0)
  if first > max_seconds:
    runs = 0
  elif fit_repeats:
    runs = max(1, min(repeats, int(max_seconds / max(first, 1e-9))))
  else:
    runs = repeats
  times = time_runs(run, runs, warmups=0)
  result["times_s"] = times or [first]
  result["median_ms"] = 1e3 * statistics.median(result["times_s"])
  result["status"] = "ok" if times else "slow"
  return compiled
