"""The data-iterator state a checkpoint holds: every global batch row's position, whatever the process count.

Each process's `TrainIterator.get_state()` holds the rows it builds (all of them when the rows are shared by
every process). `gather_data_state` joins them into one global state (the same on every process, so process 0's
save holds it); on restore every process hands the global state to its iterator, which takes its own rows, so a
run resumes on any number of hosts dividing batch_size with the exact data order.
"""

from __future__ import annotations

import json

import jax
import numpy as np

from megalodon_jax import data as data_lib
from megalodon_jax.data.pipeline import OLD_STATE
from megalodon_jax.errors import CheckpointError


def _holds_every_row(state: dict) -> bool:
  rows = state.get("rows", {})
  return rows.get("first") == 0 and len(rows.get("states", [])) == state.get("data", {}).get("batch_size")


def gather_data_state(own: dict) -> dict:
  """The global data state (every batch row) from this process's `own` iterator state; a collective when the
  processes hold different rows (every process calls it at the same step)."""
  if jax.process_count() == 1 or _holds_every_row(own):  # the same answer on every process: no one gathers
    return data_lib.merge_states([own])
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  encoded = np.frombuffer(json.dumps(own).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.asarray([encoded.size], np.int32))
  padded = np.zeros((int(lengths.max()),), np.uint8)
  padded[:encoded.size] = encoded
  gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(jax.process_count(), -1)
  return data_lib.merge_states([json.loads(bytes(row[:int(n)]).decode())
                                for row, n in zip(gathered, np.asarray(lengths).reshape(-1))])


def restored_data_state(saved: dict, ckpt_dir: str, step: int) -> dict:
  """The checkpoint's global data state, for `TrainIterator.set_state` (which takes this process's rows).

  Raises:
    CheckpointError: a state of the version-1 pipeline (per-process document shards), which cannot continue.
  """
  if isinstance(saved, dict) and "process_states" in saved:
    raise CheckpointError(
        f"{ckpt_dir}/{step}: {OLD_STATE}. To continue training from its weights, start a new "
        f"workdir with --config.init_from={ckpt_dir} (the step, optimizer state and data order start afresh)")
  return saved
