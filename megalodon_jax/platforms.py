"""Which jax backends a command line starts: libtpu only where a TPU is attached.

`requirements.txt` installs libtpu everywhere, because the deviceless planner (`megalodon-aot`) compiles TPU
programs with it on any machine. jax then tries the TPU backend on every machine, and on a host without a TPU
libtpu prints five lines of warnings to stderr at the first `jax.devices()` ("Failed to find host bounds...",
"Logging before InitGoogle()", an `E0000 ... libtpu_init_utils.cc` trace) before falling back to the CPU or GPU.

`skip_absent_tpu()` makes jax's TPU backend fail at once, without loading libtpu, when no TPU chip is on the PCI bus (the same check
jax's own Cloud TPU setup makes), so nothing is printed and start-up is shorter. It changes nothing when:
  - a TPU chip is attached (a TPU VM: the backend starts as usual);
  - `JAX_PLATFORMS` is set (the user chose the backends; `JAX_PLATFORMS=tpu,cpu` forces the TPU backend) or
    `JAX_FORCE_TPU_INIT` is set;
  - the backends have started already (too late to matter).
The deviceless TPU compile path does not use the backend (it loads libtpu through `jax.experimental.topologies`),
so the planner keeps working.
"""

from __future__ import annotations

import dataclasses
import glob
import os

_GOOGLE_PCI_VENDOR = "0x1ae0"


def tpu_attached() -> bool:
  """Whether a Google TPU chip is on this machine's PCI bus (what jax's cloud_tpu_init counts)."""
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor, encoding="ascii") as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          # Google's vendor id also covers non-TPU devices (e.g. gVNIC); jax lists the TPU device ids.
          from jax._src import hardware_utils  # pylint: disable=import-outside-toplevel
          return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except OSError:
      continue
  return False


def skip_absent_tpu() -> bool:
  """Keeps jax from starting libtpu on a machine without a TPU; returns whether the TPU backend was removed.

  Call before the first `jax.devices()` (importing jax is fine: backends start lazily)."""
  if os.environ.get("JAX_PLATFORMS") or "JAX_FORCE_TPU_INIT" in os.environ or tpu_attached():
    return False
  from jax._src import config, xla_bridge  # pylint: disable=import-outside-toplevel
  if config.jax_platforms.value or xla_bridge.backends_are_initialized():
    return False
  # A private table: if a jax upgrade renames it, the only cost is libtpu's warnings coming back. The entry stays
  # (lowering rules are registered per known platform, deviceless TPU compiles need them); its factory now fails
  # at once, which jax treats as it treats libtpu's own quiet failure on such a machine.
  factories = getattr(xla_bridge, "_backend_factories", None)
  registration = factories.get("tpu") if isinstance(factories, dict) else None
  if registration is None or not hasattr(registration, "factory"):
    return False
  factories["tpu"] = dataclasses.replace(registration, factory=_no_tpu, fail_quietly=True)
  return True


def _no_tpu():
  raise RuntimeError("no TPU chip is attached to this machine (megalodon_jax.platforms)")
