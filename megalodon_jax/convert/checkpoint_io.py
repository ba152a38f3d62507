"""Loading a MegalodonLM from any checkpoint this project writes, and writing params-only checkpoints.

Accepted by `load_checkpoint` / `locate_checkpoint`:
- a train.py workdir (`WORKDIR/checkpoints/<step>/...`), its `checkpoints/` folder, or one step folder
  (`<step>/{state,data,meta}`): the model config comes from the step's `meta` item ("model" = official ModelConf
  kwargs; execution settings such as `param_dtype` from "config"."model");
- a params-only checkpoint written by `save_params_checkpoint` (the `from-pytorch` command): an Orbax
  `checkpointing.save_params` folder (so `--config.init_from=DIR` accepts it) with the sidecar file
  `megalodon_config.json` = {"format", "model": official kwargs, "execution": {...}, "step", "source"}.

Only the params are read (never the optimizer state); buffers (`rope.freqs`, TimestepNorm priors) are constants
of the config and are rebuilt from it by the model's own constructor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import shutil
import uuid
from typing import Any, Iterator, Optional

import jax
from flax import nnx

from megalodon_jax.config import EXECUTION_FIELDS, MegalodonConfig
from megalodon_jax.errors import ConfigError, ConvertError
from megalodon_jax.model import MegalodonLM
from megalodon_jax.training import checkpointing
from megalodon_jax.training import train_step as ts

CONFIG_FILE = "megalodon_config.json"
PARAMS_FORMAT = "megalodon-jax params-only checkpoint"


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
  """Where a checkpoint's params are and what model they belong to.

  kind: "step" (a train.py step folder) or "params" (a params-only checkpoint).
  params_path: the folder to hand to `checkpointing.load_params`.
  step: the training step (None when unknown, e.g. imported weights).
  """
  kind: str
  params_path: str
  config: MegalodonConfig
  step: Optional[int]


def _read_json(path: str, what: str) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise ConvertError(f"{path} ({what}) is missing") from None
  except (OSError, ValueError) as e:
    raise ConvertError(f"{path} ({what}) is unreadable or not JSON: {e}") from None


def _config(model: Any, execution: Any, where: str) -> MegalodonConfig:
  if not isinstance(model, dict):
    raise ConvertError(f"{where} holds no model config (expected a JSON object of official ModelConf fields)")
  execution = {k: v for k, v in execution.items() if k in EXECUTION_FIELDS} if isinstance(execution, dict) else {}
  try:
    return MegalodonConfig.from_official(model, **execution)
  except (ConfigError, TypeError) as e:
    raise ConvertError(f"{where}: invalid model config: {e}") from None


def _finished_steps(root: str) -> list[int]:
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from etils import epath  # pylint: disable=import-outside-toplevel
  return sorted(int(n) for n in os.listdir(root) if n.isdigit() and os.path.isdir(os.path.join(root, n))
                and ocp.path.step.is_path_finalized(epath.Path(root) / n))


def locate_checkpoint(path: str, step: Optional[int] = None) -> CheckpointInfo:
  """Resolves `path` (workdir, checkpoints folder, step folder or params-only folder) without reading arrays.

  Args:
    path: see the module docstring.
    step: pick this step of a workdir / checkpoints folder (default: the latest finished one).

  Raises:
    ConvertError: not a checkpoint, no finished step, the step does not exist, or no model config.
  """
  root = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(root):
    raise ConvertError(f"{root} does not exist")
  if not os.path.isdir(root):
    raise ConvertError(f"{root} is a file, not a checkpoint folder (expected a train.py workdir, its checkpoints/ "
                       f"folder, a step folder, or a from-pytorch output folder)")
  if os.path.isfile(os.path.join(root, "_METADATA")):
    if os.path.basename(root) == "state" and os.path.isdir(os.path.join(os.path.dirname(root), "meta")):
      return locate_checkpoint(os.path.dirname(root), step)  # a run's state/ item given directly
    sidecar = os.path.join(root, CONFIG_FILE)
    if not os.path.isfile(sidecar):
      raise ConvertError(f"{root} is a params-only checkpoint without {CONFIG_FILE}: the model config is unknown "
                         f"(only folders written by `python -m megalodon_jax.convert from-pytorch` carry it)")
    side = _read_json(sidecar, "model config")
    if not isinstance(side, dict):
      raise ConvertError(f"{sidecar} is not a JSON object")
    saved_step = side.get("step")
    if step is not None and step != saved_step:
      raise ConvertError(f"{root} holds one params checkpoint (step {saved_step}); --step {step} does not apply")
    return CheckpointInfo("params", root, _config(side.get("model"), side.get("execution"), sidecar), saved_step)
  if os.path.isdir(os.path.join(root, "state")):
    name = os.path.basename(root)
    if step is not None and (not name.isdigit() or int(name) != step):
      raise ConvertError(f"{root} is the step folder {name}; --step {step} does not apply (pass the checkpoints/ "
                         f"folder to choose a step)")
    meta_path = os.path.join(root, "meta", "metadata")
    meta = _read_json(meta_path, "checkpoint meta item")
    if not isinstance(meta, dict):
      raise ConvertError(f"{meta_path} is not a JSON object")
    train_config = meta.get("config")  # the training ConfigDict as JSON: its "model" holds the execution settings
    execution = train_config.get("model") if isinstance(train_config, dict) else None
    saved_step = meta.get("step", int(name) if name.isdigit() else None)
    return CheckpointInfo("step", root, _config(meta.get("model"), execution, meta_path), saved_step)
  if os.path.isdir(os.path.join(root, "checkpoints")):
    return locate_checkpoint(os.path.join(root, "checkpoints"), step)
  steps = _finished_steps(root)
  if not steps:
    raise ConvertError(f"{root} is not a checkpoint: no finished step folders, no state/ item, no _METADATA "
                       f"(expected a train.py workdir, its checkpoints/ folder, a step folder, or a from-pytorch "
                       f"output folder)")
  if step is not None and step not in steps:
    raise ConvertError(f"{root} has no finished step {step}; finished steps: {steps}")
  return locate_checkpoint(os.path.join(root, str(steps[-1] if step is None else step)))


def _default_variables(config: MegalodonConfig):
  """(buffers, rng_vars) of a freshly built model; jitted so the unused weight init is never computed."""
  def build():
    _, _, buffers, rng_vars = ts.split_model(MegalodonLM(config, rngs=nnx.Rngs(0)))
    return buffers, rng_vars
  return jax.jit(build)()


def load_checkpoint(path: str, *, step: Optional[int] = None, device: Optional[jax.Device] = None,
                    **execution: Any) -> tuple[MegalodonLM, MegalodonConfig, Optional[int]]:
  """Loads the model of any checkpoint this project writes (see the module docstring).

  Args:
    path: workdir, checkpoints folder, step folder, or params-only folder.
    step: the step of a workdir / checkpoints folder (default: latest finished).
    device: where the arrays go (default: `jax.devices()[0]`); the converter passes the CPU.
    **execution: overrides of execution settings (e.g. dtype="bfloat16", cema_impl="sequential"). The params are
      stored in the checkpoint's `param_dtype` unless `param_dtype` is overridden (then cast on load).

  Returns:
    (model, config, step); step is None when the checkpoint does not record one.

  Raises:
    ConvertError, checkpointing.CheckpointError: see `locate_checkpoint`; also mismatching or damaged arrays.
  """
  info = locate_checkpoint(path, step)
  config = info.config
  if execution:
    bad = sorted(set(execution) - set(EXECUTION_FIELDS))
    if bad:
      raise ConvertError(f"load_checkpoint: {bad} are not execution settings; allowed: {list(EXECUTION_FIELDS)}")
    config = config.replace(**execution)
  device = device or jax.devices()[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  abstract = nnx.eval_shape(lambda: MegalodonLM(config, rngs=nnx.Rngs(0)))
  graphdef, abs_params, _, _ = ts.split_model(abstract)
  abs_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abs_params)
  params = checkpointing.load_params(info.params_path, abs_params)
  with jax.default_device(device):
    buffers, rng_vars = _default_variables(config)
  return ts.merge_model(graphdef, params, buffers, rng_vars), config, info.step


@contextlib.contextmanager
def atomic_output(out: str, *, overwrite: bool = False) -> Iterator[str]:
  """Writes a folder atomically: yields a not-yet-existing temp sibling path to create and fill.

  On success the temp folder becomes `out` (an existing `out` is first renamed aside, then deleted); on any
  exception the temp folder (and orbax leftovers next to it) is removed and `out` is untouched.

  Raises:
    ConvertError: `out` is a file, or a non-empty folder and `overwrite` is False (checked before yielding).
  """
  out = os.path.abspath(os.path.expanduser(out))
  check_output(out, overwrite=overwrite)
  parent, name = os.path.split(out)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
  try:
    yield tmp
    if not os.path.isdir(tmp):
      raise RuntimeError(f"atomic_output: nothing was written to {tmp}")  # a converter bug
    if os.path.lexists(out):
      old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:12]}")
      os.rename(out, old)
      os.rename(tmp, out)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, out)
  except BaseException:
    for leftover in [tmp] + glob.glob(glob.escape(tmp) + ".orbax-checkpoint-tmp*"):
      shutil.rmtree(leftover, ignore_errors=True)
    raise


def check_output(out: str, *, overwrite: bool) -> None:
  """Refuses an output path that is a file, or a non-empty folder unless `overwrite`."""
  out = os.path.abspath(os.path.expanduser(out))
  if os.path.lexists(out):
    if not os.path.isdir(out) or os.path.islink(out):
      raise ConvertError(f"--out {out} exists and is not a folder; remove it or choose another path")
    if os.listdir(out) and not overwrite:
      raise ConvertError(f"--out {out} exists and is not empty; pass --overwrite to replace it")


def save_params_checkpoint(out: str, model: MegalodonLM, *, step: Optional[int] = None, source: Optional[str] = None,
                           overwrite: bool = False) -> None:
  """Writes `model`'s params as a params-only Orbax checkpoint plus its config sidecar, atomically.

  Layout of `out`: the files of `checkpointing.save_params(out, params)` (`_METADATA`, `manifest.ocdbt`, ...; the
  nnx.Param state as nested dicts, exactly `state["params"]` of a train.py checkpoint) and `megalodon_config.json`.

  Raises:
    ConvertError: see `atomic_output`.
  """
  _, params, _, _ = ts.split_model(model)
  config = model.config
  sidecar = {"format": PARAMS_FORMAT, "model": config.official_kwargs(),
             "execution": {k: getattr(config, k) for k in EXECUTION_FIELDS}, "step": step, "source": source}
  with atomic_output(out, overwrite=overwrite) as tmp:
    checkpointing.save_params(tmp, params)
    with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
      json.dump(sidecar, f, indent=2)
