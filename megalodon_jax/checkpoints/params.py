"""Params-only checkpoints: writing one, and reading the params of any checkpoint folder onto given shardings."""

from __future__ import annotations

from typing import Any

import orbax.checkpoint as ocp

from megalodon_jax.checkpoints import layout, trees
from megalodon_jax.errors import CheckpointDamagedError, CheckpointError


def save_params(path: str, params: Any, *, overwrite: bool = False) -> None:
  """Writes a params-only checkpoint (for `--config.init_from` and export); synchronous and atomic.

  Raises:
    CheckpointError: `path` exists and `overwrite` is False.
  """
  target = layout.as_path(path)
  if target.exists() and not overwrite:
    raise CheckpointError(f"{target} already exists: choose another path or pass overwrite=True.")
  ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  try:
    ckptr.save(target, args=ocp.args.StandardSave(params), force=overwrite)
  finally:
    ckptr.close()


def load_params(path: str, abstract_params: Any) -> Any:
  """Loads params onto the shardings of `abstract_params` (dtypes are cast to the abstract ones).

  Args:
    path: A params-only checkpoint (`save_params`), a run's step folder (its state["params"] is used), a run's
      checkpoints/ folder or a train.py workdir (their latest finished step); see `layout.params_item`.
    abstract_params: Pytree of `jax.ShapeDtypeStruct` (or arrays) with target shardings.

  Raises:
    CheckpointError: the path does not exist, holds no params, is corrupted, or its shapes/keys differ.
  """
  item_dir, prefix = layout.params_item(path)
  abstract = trees.abstract(abstract_params)
  expected, saved = trees.leaves(abstract), trees.saved_leaves(item_dir)
  key = layout.PARAMS_KEY + "/"
  if (prefix is None and saved and all(k.startswith(key) for k in saved)
      and not any(k.startswith(key) for k in expected)):
    prefix = layout.PARAMS_KEY  # a run's state/ item given directly
  if prefix is not None:
    saved = {k[len(prefix) + 1:]: v for k, v in saved.items() if k.startswith(prefix + "/")}
  if not saved:
    raise CheckpointError(f"{item_dir} holds no params.")
  trees.match(saved, expected, item_dir, check_dtype=False)
  target = abstract if prefix is None else {prefix: abstract}
  args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                partial_restore=prefix is not None)
  ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  try:
    out = ckptr.restore(item_dir, args=args)
  except Exception as e:  # tensorstore/orbax errors on damaged data files
    raise CheckpointDamagedError(f"loading params from {item_dir} failed: {trees.damage(e)}") from e
  finally:
    ckptr.close()
  return out if prefix is None else out[prefix]
