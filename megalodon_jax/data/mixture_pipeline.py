"""Training and evaluation batches of a data mixture (`data.mixture`, mixture.py).

Training: every source has its own row streams, exactly those a run on that source alone would read (row r packs
the source's documents r, r + B, ... of its own shuffled sequence, row_streams.py). Global row g = k * B + r of step
k takes the next window of row r of the source `mixture.row_sources` picks for g, so a source's row stream moves
only when the row draws from it. Process p builds its rows [p * b, (p + 1) * b) of every source; the global
batches do not depend on the process count.

State: {"version": 2, "data": fingerprint, "rows": {"first", "states"}}, the layout `merge_states` and the
trainer's `gather_data_state` join across processes; a row's state is {"batches": steps done, "sources":
{label: the row's position in that source}}. `set_state` continues the exact order with the same weights. Other
weights (or sources added or left out) are allowed and logged: the rows after the resume step follow the new
weights, each source continues where it was, and a new source starts at its beginning.

Evaluation: each source's own fixed evaluation batches (`pipeline.make_eval_batches` of the source), one after the
other; `EvalBatches.sources` names the source of each batch, for the per-source metrics.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Optional, Union

import numpy as np

from megalodon_jax.data import mixture, pipeline, sources
from megalodon_jax.data.row_streams import DocumentReader, RowPacker
from megalodon_jax.data.tokenizers import make_tokenizer
from megalodon_jax.errors import DataError

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


class EvalBatches(list):
  """A list of evaluation batches and, in `sources`, the label of the source of each."""

  def __init__(self, batches: list[Batch], sources: list[str]):
    super().__init__(batches)
    self.sources = tuple(sources)


class MixtureIterator:
  """Infinite iterator of training batches of a mixture: the process's rows, {"inputs", "targets"} (+ the "reset"
  features): (len(rows), seq_len) int32. `get_state` / `set_state` as `pipeline.TrainIterator` (module docstring).

  Args:
    labels, weights: the sources in label order and their normalised weights.
    streams: per source, (its reader, its packers of this process's rows).
    first_row: the global index of this process's first row; batch_size: rows of the global batch.
  """

  def __init__(self, labels: tuple[str, ...], weights: tuple[float, ...],
               streams: list[tuple[DocumentReader, list[RowPacker]]], first_row: int, batch_size: int, seed: int,
               fingerprint: dict[str, Any]):
    self._labels, self._weights, self._streams = labels, weights, streams
    self._first, self._batch_size, self._seed, self._fingerprint = first_row, batch_size, seed, fingerprint
    self._count = len(streams[0][1])
    self._step = 0  # global batches produced

  def __iter__(self) -> MixtureIterator:
    return self

  def _packers(self, step: int) -> list[RowPacker]:
    """The packer each of this process's rows reads in global batch `step`."""
    first = step * self._batch_size + self._first
    picks = mixture.row_sources(self._weights, self._seed, range(first, first + self._count))
    return [self._streams[s][1][i] for i, s in enumerate(picks)]

  def __next__(self) -> Batch:
    packers = self._packers(self._step)
    for p in packers:
      p.request_ahead()
    examples = [p.next_window() for p in packers]
    self._step += 1
    for p in self._packers(self._step):  # the next batch's documents tokenize while the caller uses this one
      p.request_ahead()
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

  def close(self) -> None:
    for reader, _ in self._streams:
      reader.close()

  def get_state(self) -> dict[str, Any]:
    states = [{"batches": self._step, "sources": {label: packers[i].get_state()
                                                  for label, (_, packers) in zip(self._labels, self._streams)}}
              for i in range(self._count)]
    return json.loads(json.dumps({"version": pipeline.STATE_VERSION, "data": self._fingerprint,
                                  "rows": {"first": self._first, "states": states}}))

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from `state` (`get_state` or `merge_states` of a mixture run with the same data settings, seed and
    batch_size; the weights and the set of sources may differ: logged).

    Raises:
      DataError: not a mixture state of this version, a source whose data differs, rows missing.
    """
    if not isinstance(state, dict) or state.get("version") != pipeline.STATE_VERSION or "rows" not in state:
      raise DataError(f"not a data iterator state of this version: {str(state)[:200]}")
    saved = state.get("data", {})
    if not isinstance(saved.get("mixture"), dict):
      raise DataError(f"the checkpoint's data position was recorded for one dataset ({saved.get('source')!r}), not "
                      f"a data.mixture; resume with the same data.* settings, or start in a new workdir (with "
                      f"--config.init_from=<its checkpoints dir> to keep the weights)")
    diff = _differences({k: v for k, v in saved.items() if k != "mixture"},
                        {k: v for k, v in self._fingerprint.items() if k != "mixture"})
    old, new = saved["mixture"], self._fingerprint["mixture"]
    for label in set(old) & set(new):
      diff += _differences(_without_weight(old[label]), _without_weight(new[label]), f"{label}.")
    if diff:
      raise DataError(f"the checkpoint's data position was recorded for other data ({'; '.join(diff)}); resume "
                      f"with the same data.* settings (data.mixture weights may change), seed and batch_size, or "
                      f"start in a new workdir")
    first, states = pipeline.row_range(state)
    lo, hi = self._first, self._first + self._count
    if not first <= lo <= hi <= first + len(states):
      raise DataError(f"the data state holds batch rows [{first}, {first + len(states)}), this process needs rows "
                      f"[{lo}, {hi}): give it the global state (merge_states of every process's get_state())")
    rows = states[lo - first:hi - first]
    steps = {row.get("batches") if isinstance(row, dict) else None for row in rows}
    if len(steps) != 1 or not isinstance(step := steps.pop(), int) or step < 0:
      raise DataError(f"not a data.mixture row state: {str(rows[0])[:200]}")
    old_weights = {k: v.get("weight") for k, v in old.items()}
    new_weights = {k: v["weight"] for k, v in new.items()}
    if not mixture.same_weights(old_weights, new_weights):
      added = sorted(set(new) - set(old))
      log.warning("data.mixture: the weights change on resume at batch %d from %s to %s%s; each source continues "
                  "where it was", step, _shown(old_weights), _shown(new_weights),
                  f" ({', '.join(added)} starting at the beginning)" if added else "")
    for label, (_, packers) in zip(self._labels, self._streams):
      for packer, row in zip(packers, rows):
        packer.set_state(row["sources"].get(label, {"documents": 0, "offset": 0}))
    self._step = step


def _without_weight(source: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in source.items() if k != "weight"}


def _differences(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
  return [f"{prefix}{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in {**saved, **now}
          if saved.get(k) != now.get(k)]


def _shown(weights: dict[str, Any]) -> str:
  return "{" + ", ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v!r}"
                         for k, v in sorted(weights.items())) + "}"


def make_train_iterator(data: Any, *, seq_len: int, batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1) -> Union[pipeline.TrainIterator, MixtureIterator]:
  """The training batches of this process's rows [p * b, (p + 1) * b) (b = batch_size / process_count): a
  `MixtureIterator` for a mixture, else `pipeline.make_train_iterator`'s. `data`: a plan (`sources.plan`), or a
  `config.data`, planned here.

  Raises:
    DataError: as `pipeline.make_train_iterator`, with the source's label.
  """
  plan = sources.as_plan(data)
  if isinstance(plan, sources.DataPlan):
    return pipeline.make_train_iterator(plan, seq_len=seq_len, batch_size=batch_size, seed=seed,
                                        process_index=process_index, process_count=process_count)
  local_batch = pipeline.per_process_batch(seq_len, batch_size, process_count, process_index)
  tokenizer = make_tokenizer(plan)
  first = process_index * local_batch
  streams, described = [], {}
  for source in plan.sources:
    try:
      reader, packers, about = pipeline.row_packers(source.plan, tokenizer, seq_len=seq_len, batch_size=batch_size,
                                                    seed=seed, rows=range(first, first + local_batch))
    except DataError as e:
      raise DataError(f"data.mixture source {source.label!r}: {e}") from None
    streams.append((reader, packers))
    described[source.label] = {"weight": source.weight, **about, "add_eos": bool(source.plan.add_eos)}
  reset = plan.document_boundaries == "reset"
  fingerprint = {"mixture": described, "tokenizer": pipeline.tokenizer_fingerprint(tokenizer), "seed": int(seed),
                 **({"document_boundaries": "reset"} if reset else {}), "batch_size": int(batch_size)}
  return MixtureIterator(plan.labels, tuple(s.weight for s in plan.sources), streams, first, batch_size, seed,
                         fingerprint)


def make_eval_batches(data: Any, *, seq_len: int, batch_size: int, num_batches: int, process_index: int = 0,
                      process_count: int = 1, split: Optional[str] = None) -> list[Batch]:
  """`pipeline.make_eval_batches` of a single dataset; of a mixture, each source's `num_batches` evaluation
  batches (its own `eval_split` unless `split` is given), sources in label order, as `EvalBatches`. `data`: a plan
  (`sources.plan`), or a `config.data`, planned here.

  Raises:
    DataError: as `pipeline.make_eval_batches`, with the source's label.
  """
  plan = sources.as_plan(data)
  kwargs = dict(seq_len=seq_len, batch_size=batch_size, num_batches=num_batches, process_index=process_index,
                process_count=process_count, split=split)
  if isinstance(plan, sources.DataPlan):
    return pipeline.make_eval_batches(plan, **kwargs)
  batches, labels = [], []
  for source in plan.sources:
    try:
      own = pipeline.make_eval_batches(source.plan, **kwargs)
    except DataError as e:
      raise DataError(f"data.mixture source {source.label!r}: {e}") from None
    batches += own
    labels += [source.label] * len(own)
  return EvalBatches(batches, labels)
