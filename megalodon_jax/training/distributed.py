"""Multi-process runs: start `jax.distributed` from what the launcher put in the environment.

One process per host (TPU VM pod slices, one per node or per GPU on GPU clusters). Recognised, in this order:
- an explicit description: `JAX_COORDINATOR_ADDRESS` (host:port of process 0), `JAX_NUM_PROCESSES` and
  `JAX_PROCESS_ID` (any launcher, and the CPU multi-process test);
- `MEGALODON_DISTRIBUTED=1`: jax's own cluster detection (Cloud TPU, SLURM, Open MPI, ...) without further checks;
- a TPU pod slice (`TPU_WORKER_HOSTNAMES` lists more than one host) or a SLURM step of more than one task.
Nothing set: a single-process run. Multi-process CPU runs use jax's default CPU collectives (gloo).
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

from megalodon_jax.errors import ConfigError


def _int_env(env: Mapping[str, str], name: str, minimum: int) -> int:
  raw = env.get(name, "")
  try:
    value = int(raw)
  except ValueError:
    value = None
  if value is None or value < minimum:
    raise ConfigError(f"{name}={raw!r}: must be an integer >= {minimum} (set with JAX_COORDINATOR_ADDRESS)")
  return value


def plan(env: Optional[Mapping[str, str]] = None) -> Optional[dict]:
  """The keyword arguments of `jax.distributed.initialize` this environment asks for, or None (single process).

  Raises:
    ConfigError: an incomplete or malformed explicit description.
  """
  env = os.environ if env is None else env
  if env.get("JAX_COORDINATOR_ADDRESS") and ("JAX_NUM_PROCESSES" in env or "JAX_PROCESS_ID" in env):
    count = _int_env(env, "JAX_NUM_PROCESSES", 1)
    index = _int_env(env, "JAX_PROCESS_ID", 0)
    if index >= count:
      raise ConfigError(f"JAX_PROCESS_ID={index} is not below JAX_NUM_PROCESSES={count}")
    return {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"], "num_processes": count, "process_id": index}
  if env.get("MEGALODON_DISTRIBUTED") == "1" or env.get("JAX_COORDINATOR_ADDRESS"):
    return {}
  if env.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    return {}
  try:
    if int(env.get("SLURM_NTASKS", "1")) > 1:
      return {}
  except ValueError:
    pass
  return None


def initialize_from_environment() -> bool:
  """Calls `jax.distributed.initialize` when the environment describes a multi-process job (see the module doc);
  must run before anything touches the jax backend. Returns whether it did."""
  kwargs = plan()
  if kwargs is None:
    return False
  import jax  # pylint: disable=import-outside-toplevel
  if not jax.distributed.is_initialized():  # main() may run twice in one process (tests, notebooks)
    jax.distributed.initialize(**kwargs)
  return True
