"""A MegalodonLM from any checkpoint this project writes, and a MegalodonLM written as a params-only checkpoint.

Only the params are read (never the optimizer state); buffers (`rope.freqs`, TimestepNorm priors) are constants
of the config and are rebuilt from it by the model's own constructor. Which paths are accepted: locate.py.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import tempfile
import uuid
from typing import Any, Iterator, Optional

import jax
from flax import nnx

from megalodon_jax import families, paths
from megalodon_jax.checkpoints import layout, output_guard, tokenizer_copy
from megalodon_jax.checkpoints.locate import locate_checkpoint
from megalodon_jax.checkpoints.params import load_params, save_params
from megalodon_jax.errors import CheckpointDamagedError, ConvertError
from megalodon_jax.model_state import merge_model, split_model

log = logging.getLogger("megalodon_jax")


def _default_variables(family: families.ModelFamily, config: Any):
  """(buffers, rng_vars) of a freshly built model; jitted so the unused weight init is never computed."""
  def build():
    _, _, buffers, rng_vars = split_model(family.build(config, nnx.Rngs(0)))
    return buffers, rng_vars
  return jax.jit(build)()


def load_checkpoint(path: str, *, step: Optional[int] = None, device: Optional[jax.Device] = None,
                    **execution: Any) -> tuple[families.LanguageModel, Any, Optional[int]]:
  """Loads the model of any checkpoint this project writes (see locate.py).

  Args:
    path: workdir, checkpoints folder, step folder, or params-only folder.
    step: the step of a workdir / checkpoints folder (default: latest finished).
    device: where the arrays go (default: `jax.devices()[0]`); the converter passes the CPU.
    **execution: overrides of execution settings (e.g. dtype="bfloat16", cema_impl="sequential"). The params are
      stored in the checkpoint's `param_dtype` unless `param_dtype` is overridden (then cast on load).

  Returns:
    (model, config, step); step is None when the checkpoint does not record one.

  Raises:
    ConvertError, CheckpointError: see `locate_checkpoint`; also mismatching or damaged arrays.
  """
  info = locate_checkpoint(path, step)
  config = info.config
  if execution:
    allowed = type(config).execution_fields()
    bad = sorted(set(execution) - set(allowed))
    if bad:
      raise ConvertError(f"load_checkpoint: {bad} are not execution settings; allowed: {list(allowed)}")
    config = config.replace(**execution)
  device = device or jax.devices()[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  family = families.get(info.family, key=None)
  abstract = nnx.eval_shape(lambda: family.build(config, nnx.Rngs(0)))
  graphdef, abs_params, _, _ = split_model(abstract)
  abs_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abs_params)
  try:
    params = load_params(info.params_path, abs_params)
  except CheckpointDamagedError as e:
    if step is not None or info.kind != "step":
      raise
    info, params = _load_an_earlier_step(path, info, abs_params, e)
  with jax.default_device(device):
    buffers, rng_vars = _default_variables(family, config)
  return merge_model(graphdef, params, buffers, rng_vars), config, info.step


def _load_an_earlier_step(path: str, newest: Any, abs_params: Any, error: CheckpointDamagedError) -> tuple[Any, Any]:
  """The params of the newest earlier step that loads, when the latest step of a run is damaged (a reader never
  renames it: training does, when it resumes). Raises the first error if no earlier step loads."""
  steps_dir = os.path.dirname(newest.params_path.rstrip("/"))
  for step in reversed([s for s in layout.finished_steps(steps_dir) if s < (newest.step or 0)]):
    try:
      info = locate_checkpoint(path, step)
      params = load_params(info.params_path, abs_params)
    except CheckpointDamagedError:
      continue
    log.warning("the latest step %s of %s is damaged (%s); loaded step %d instead", newest.step, steps_dir,
                error.problem, step)
    return info, params
  raise error


@contextlib.contextmanager
def atomic_output(out: str, *, known: output_guard.KnownEntries, overwrite: bool = False) -> Iterator[str]:
  """Writes a folder atomically: yields a not-yet-existing temp sibling path to create and fill.

  On success the temp folder becomes `out` (an existing `out` is first renamed aside, then deleted); on any
  exception the temp folder (and orbax leftovers next to it) is removed and `out` is untouched.

  An object store (gs://...) cannot rename folders: there the temp folder is local, and on success the old `out`
  (if any) is deleted and the new files are uploaded. A failure before the upload leaves `out` untouched; one
  during the upload leaves a partial `out`, which a rerun with --overwrite replaces.

  Raises:
    ConvertError: `out` is a file, or a non-empty folder and `overwrite` is False, or a folder holding an entry
      that `known` (what the caller writes) does not cover (`output_guard.check_output_folder`, checked before
      yielding).
  """
  if paths.is_remote(out):
    output_guard.check_output_folder(out, "--out", known, ConvertError, overwrite=overwrite)
    with tempfile.TemporaryDirectory(prefix="megalodon_out_") as staging:
      tmp = os.path.join(staging, "out")
      yield tmp
      if not os.path.isdir(tmp):
        raise RuntimeError(f"atomic_output: nothing was written to {tmp}")  # a converter bug
      if paths.as_path(out).exists():
        paths.as_path(out).rmtree()
      paths.copy_tree(tmp, out)
    return
  out = os.path.abspath(os.path.expanduser(out))
  output_guard.check_output_folder(out, "--out", known, ConvertError, overwrite=overwrite)
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
    for leftover in [tmp] + glob.glob(glob.escape(tmp) + layout.TMP_MARK + "*"):
      shutil.rmtree(leftover, ignore_errors=True)
    raise


def save_params_checkpoint(out: str, model: families.LanguageModel, *, step: Optional[int] = None,
                           source: Optional[str] = None, overwrite: bool = False,
                           tokenizer_model: Optional[bytes] = None) -> None:
  """Writes `model`'s params as a params-only Orbax checkpoint plus its config sidecar, atomically.

  Layout of `out`: the files of `params.save_params(out, params)` (`_METADATA`, `manifest.ocdbt`, ...; the
  nnx.Param state as nested dicts, exactly `state["params"]` of a train.py checkpoint) and `megalodon_config.json`,
  plus `tokenizer.model` when `tokenizer_model` (a SentencePiece model's bytes) is given.

  With `overwrite`, an existing `out` is replaced only when it holds nothing but these entries (an earlier params
  checkpoint): `output_guard.PARAMS_CHECKPOINT_ENTRIES`.

  Raises:
    ConvertError: see `atomic_output`.
  """
  _, params, _, _ = split_model(model)
  config = model.config
  sidecar = {"format": layout.PARAMS_FORMAT, "family": families.of_config(config).name, "model": config.official_kwargs(),
             "execution": {k: getattr(config, k) for k in type(config).execution_fields()}, "step": step,
             "source": source}
  with atomic_output(out, overwrite=overwrite, known=output_guard.PARAMS_CHECKPOINT_ENTRIES) as tmp:
    save_params(tmp, params)
    paths.as_path(tmp).joinpath(layout.CONFIG_FILE).write_text(json.dumps(sidecar, indent=2), encoding="utf-8")
    if tokenizer_model is not None:
      tokenizer_copy.write_copy(tmp, tokenizer_model)
