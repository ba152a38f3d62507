"""Finding a checkpoint's params and model config from any path a user may give, without reading arrays.

Accepted by `locate_checkpoint`:
- a train.py workdir (`WORKDIR/checkpoints/<step>/...`), its `checkpoints/` folder, one step folder
  (`<step>/{state,data,meta}`) or its `state/` item: the model config comes from the step's `meta` item ("model" =
  official ModelConf kwargs; execution settings such as `param_dtype` from "config"."model");
- a params-only checkpoint written by `model_io.save_params_checkpoint` (the `from-pytorch` command): an Orbax
  `params.save_params` folder (so `--config.init_from=DIR` accepts it) with the sidecar file
  `megalodon_config.json` = {"format", "model": official kwargs, "execution": {...}, "step", "source"}.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

from megalodon_jax import families, paths
from megalodon_jax.checkpoints import layout, tokenizer_copy
from megalodon_jax.config import EXECUTION_FIELDS, ConfigError
from megalodon_jax.errors import ConvertError, FieldError

__all__ = ["EXECUTION_FIELDS", "CheckpointInfo", "locate_checkpoint"]


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
  """Where a checkpoint's params are and what model they belong to.

  kind: "step" (a train.py step folder) or "params" (a params-only checkpoint).
  params_path: the folder to hand to `params.load_params`.
  step: the training step (None when unknown, e.g. imported weights).
  train_config: the training config (JSON) saved with a train.py step; None for a params-only checkpoint.
  tokenizer_model: the SentencePiece model's bytes the checkpoint carries (checkpoints/tokenizer_copy.py), or None.
  """
  kind: str
  params_path: str
  config: Any  # the family's model config (MegalodonConfig for Megalodon)
  step: Optional[int]
  train_config: Optional[dict] = None
  tokenizer_model: Optional[bytes] = None

  family: str = "megalodon"  # the model family (families.py) the params belong to


def _read_json(path: str, what: str) -> Any:
  try:
    return json.loads(paths.as_path(path).read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise ConvertError(f"{path} ({what}) is missing") from None
  except (OSError, ValueError) as e:
    raise ConvertError(f"{path} ({what}) is unreadable or not JSON: {e}") from None


def _family(name: Any, where: str) -> str:
  """A recorded family name, checked against the registry (runs written before families existed, and imported
  weights, record none: Megalodon)."""
  name = "megalodon" if name is None else name
  if name not in families.FAMILIES:
    raise ConvertError(f"{where}: the checkpoint's model family {name!r} is not registered (known: "
                       f"{', '.join(families.FAMILIES)})")
  return name


def _config(model: Any, execution: Any, where: str, family: str = "megalodon") -> Any:
  if not isinstance(model, dict):
    raise ConvertError(f"{where} holds no model config (expected a JSON object of the model's architecture fields)")
  execution = execution if isinstance(execution, dict) else {}
  try:
    return families.FAMILIES[family].config_class().from_checkpoint(model, execution)
  except (ConfigError, FieldError, TypeError) as e:
    raise ConvertError(f"{where}: invalid model config: {e}") from None


def locate_checkpoint(path: str, step: Optional[int] = None) -> CheckpointInfo:
  """Resolves `path` (workdir, checkpoints folder, step folder or params-only folder) without reading arrays.

  Args:
    path: see the module docstring.
    step: pick this step of a workdir / checkpoints folder (default: the latest finished one).

  Raises:
    ConvertError: not a checkpoint, no finished step, the step does not exist, or no model config.
  """
  root = paths.abspath(path).rstrip("/") if paths.is_remote(path) else paths.abspath(path)
  if not paths.as_path(root).exists():
    raise ConvertError(f"{root} does not exist")
  if not paths.as_path(root).is_dir():
    raise ConvertError(f"{root} is a file, not a checkpoint folder (expected a train.py workdir, its checkpoints/ "
                       f"folder, a step folder, or a from-pytorch output folder)")
  kind = layout.folder_kind(root)
  if kind == layout.STATE:
    return locate_checkpoint(os.path.dirname(root), step)  # a run's state/ item given directly
  if kind == "params":
    sidecar = paths.join(root, layout.CONFIG_FILE)
    if not paths.as_path(sidecar).is_file():
      raise ConvertError(f"{root} is a params-only checkpoint without {layout.CONFIG_FILE}: the model config is "
                         f"unknown (only folders written by `python -m megalodon_jax.convert from-pytorch` carry it)")
    side = _read_json(sidecar, "model config")
    if not isinstance(side, dict):
      raise ConvertError(f"{sidecar} is not a JSON object")
    saved_step = side.get("step")
    if step is not None and step != saved_step:
      raise ConvertError(f"{root} holds one params checkpoint (step {saved_step}); --step {step} does not apply")
    family = _family(side.get("family"), sidecar)
    return CheckpointInfo("params", root, _config(side.get("model"), side.get("execution"), sidecar, family),
                          saved_step, tokenizer_model=tokenizer_copy.read_copy(root), family=family)
  if kind == "step":
    name = os.path.basename(root)
    if step is not None and (not name.isdigit() or int(name) != step):
      raise ConvertError(f"{root} is the step folder {name}; --step {step} does not apply (pass the checkpoints/ "
                         f"folder to choose a step)")
    meta_path = layout.meta_file(root)
    meta = _read_json(meta_path, "checkpoint meta item")
    if not isinstance(meta, dict):
      raise ConvertError(f"{meta_path} is not a JSON object")
    train_config = meta.get("config")  # the training ConfigDict as JSON: its "model" holds the execution settings
    train_config = train_config if isinstance(train_config, dict) else None
    execution = train_config.get("model") if train_config is not None else None
    # The family is the model section's (`model.family`; a top-level "family" in runs of the first families release).
    family = _family((execution or {}).get("family", (train_config or {}).get("family")), meta_path)
    saved_step = meta.get("step", int(name) if name.isdigit() else None)
    return CheckpointInfo("step", root, _config(meta.get("model"), execution, meta_path, family), saved_step,
                          train_config, tokenizer_copy.embedded(meta, meta_path), family)
  if kind == "workdir":
    return locate_checkpoint(layout.checkpoints_dir(root), step)
  steps = layout.finished_steps(root)
  if not steps:
    raise ConvertError(f"{root} is not a checkpoint: no finished step folders, no state/ item, no _METADATA "
                       f"(expected a train.py workdir, its checkpoints/ folder, a step folder, or a from-pytorch "
                       f"output folder)")
  if step is not None and step not in steps:
    raise ConvertError(f"{root} has no finished step {step}; finished steps: {steps}")
  return locate_checkpoint(os.path.join(root, str(steps[-1] if step is None else step)))
