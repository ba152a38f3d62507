"""Tokenize, pack and batch documents with grain: the infinite training iterator and the fixed evaluation batches.

Packing (GPT style): each document is tokenized, the tokenizer's EOS is appended when `data.add_eos` is set and the
tokenizer has one (the byte tokenizer has none: documents simply follow each other), the documents are concatenated
in order and the stream is cut into non-overlapping windows of `seq_len + 1` tokens. A window `w` gives
`inputs = w[:-1]` and `targets = w[1:]`. Windows cross document boundaries. `data.document_boundaries` says what
the model does there:
- "carry" (default, the official training): nothing marks them; the model keeps its CEMA, normalisation and
  attention state across the separator, so a document's first tokens are predicted with the previous document in
  context. Batches hold only `inputs` and `targets`.
- "reset": batches also hold, per input token, `segment_ids` (1, 2, ... numbering the documents of the window) and
  `positions` (the token's index in its document; 0 marks a document start, where the model restarts its state),
  and `target_mask` (0 where the target is the first token of the next document, which the loss skips). The
  tokens are the same as with "carry".
Our packer, not grain's `ConcatThenSplitIterDataset`: grain's packer emits segment ids and positions too, but it
passes documents that fill a window on their own ahead of the buffer, which reorders the stream (carry batches
would change, and with them every existing run's data order). Ours keeps the stream order, and its state (the
document in progress and its offset) already resumes exactly, with or without the extra features.

Training (row streams, row_streams.py): the split forms ONE document sequence, shuffled with a seed-derived key,
reshuffled every epoch (grain's ShuffleMapDataset uses seed + epoch) and repeated forever. Global batch row r
(0 <= r < B = batch_size) packs, as above, the documents at positions r, r + B, r + 2B, ... of that sequence, and
its k-th window is row r of global batch k. Process p of P builds only its rows [p * b, (p + 1) * b) (b = B / P),
so the global batches are the same for any process count (a run whose rows are shared by every process builds all
B rows). Each row's stream continues across epochs (no tokens are dropped). Documents are tokenized ahead on a
few threads shared by the process's rows; each row takes its own documents in order, so batches do not depend on
timing. The iterator is checkpointable per row: a row's state is the number of its documents started and the
tokens of the current one already used; `merge_states` joins every process's rows into one global state, from
which a run with any process count dividing B continues the exact order.

Evaluation: documents in stored order, no shuffle; the same windows on every call and for any process count
(process p gets rows [p * b, (p + 1) * b) of each global batch of `batch_size` windows, b = batch_size / P).
"""

from __future__ import annotations

import json
from typing import Any, Optional, Union

import grain
import numpy as np

from megalodon_jax.data import sources
from megalodon_jax.data.row_streams import DocumentReader, RowPacker, global_documents, window_batch
from megalodon_jax.data.tokenizers import Tokenizer, make_tokenizer
from megalodon_jax.errors import DataError

Batch = dict[str, np.ndarray]

STATE_VERSION = 2


class _Tokenize:
  """bytes -> (n,) int32 token ids, plus EOS when asked and available."""

  def __init__(self, tokenizer: Tokenizer, add_eos: bool):
    self._tokenizer = tokenizer
    self._eos = tokenizer.eos_id if add_eos else None

  def __call__(self, text: bytes) -> np.ndarray:
    ids = self._tokenizer.encode_bytes(text)
    if self._eos is not None:
      ids = np.append(ids, np.int32(self._eos))
    return ids.astype(np.int32, copy=False)


OLD_STATE = ("this data-iterator state was written by the version-1 data pipeline (documents sharded per process); "
             "the data order is now set per global batch row and cannot continue from it")


class TrainIterator:
  """Infinite iterator of training batches {"inputs", "targets"}: (len(rows), seq_len) int32, the process's rows.

  `get_state()` is a JSON-serializable dict {"version": 2, "data": fingerprint, "rows": {"first": first row,
  "states": [one per row]}}; `merge_states` joins the states of all processes into the global one (every row).
  `set_state(state)` takes the states of this iterator's rows from any state that holds them (its own, or a
  global one saved with any process count) and continues with exactly the batches that would have followed.
  """

  def __init__(self, reader: DocumentReader, rows: list[RowPacker], first_row: int, fingerprint: dict[str, Any]):
    self._reader, self._rows, self._first, self._fingerprint = reader, rows, first_row, fingerprint

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> Batch:
    for row in self._rows:  # every row's next documents are tokenizing before the first row waits on its own
      row.request_ahead()
    examples = [row.next_window() for row in self._rows]
    for row in self._rows:  # the next batch's documents tokenize while the caller uses this one
      row.request_ahead()
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

  def close(self) -> None:
    """Stops the tokenize-ahead threads (the iterator is unusable afterwards)."""
    self._reader.close()

  def get_state(self) -> dict[str, Any]:
    # Round-trip through JSON so callers get plain lists/ints.
    return json.loads(json.dumps({"version": STATE_VERSION, "data": self._fingerprint,
                                  "rows": {"first": self._first, "states": [r.get_state() for r in self._rows]}}))

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from `state` (from `get_state` or `merge_states` of a run with the same data settings).

    Raises:
      DataError: a version-1 state, a state saved for other data (dataset, files, tokenizer, seed, batch_size,
        document_boundaries), or one without the states of this iterator's rows.
    """
    if isinstance(state, dict) and (state.get("version") == 1 or "process_states" in state):
      raise DataError(f"{OLD_STATE}: start a new workdir with --config.init_from=<the old run's checkpoints dir> "
                      f"(its weights; step, optimizer and data order start afresh)")
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or "rows" not in state:
      raise DataError(f"not a data iterator state of this version: {str(state)[:200]}")
    saved = state.get("data", {})
    diff = {k: (saved.get(k), self._fingerprint.get(k)) for k in {**saved, **self._fingerprint}
            if saved.get(k) != self._fingerprint.get(k)}
    if diff:
      details = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
      raise DataError(f"the checkpoint's data position was recorded for other data ({details}); resume with the "
                      f"same data.* settings, seed and batch_size, or start in a new workdir")
    first, states = row_range(state)
    lo, hi = self._first, self._first + len(self._rows)
    if not first <= lo <= hi <= first + len(states):
      raise DataError(f"the data state holds batch rows [{first}, {first + len(states)}), this process needs rows "
                      f"[{lo}, {hi}): give it the global state (merge_states of every process's get_state())")
    for row, row_state in zip(self._rows, states[lo - first:hi - first]):
      row.set_state(row_state)


def row_range(state: dict[str, Any]) -> tuple[int, list]:
  """(first row, row states) of a data state; DataError when it has no such rows."""
  rows = state.get("rows")
  if not (isinstance(rows, dict) and isinstance(rows.get("first"), int) and isinstance(rows.get("states"), list)):
    raise DataError(f"not a data iterator state of this version: {str(state)[:200]}")
  return rows["first"], rows["states"]


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
  """One state holding every batch row, from the `get_state()` of all processes (any order; rows that several
  processes hold, as with shared rows, must agree).

  Raises:
    DataError: states of different data or versions, disagreeing or missing rows.
  """
  if not states:
    raise DataError("no data iterator states to merge")
  head = {k: v for k, v in states[0].items() if k != "rows"}
  batch_size = head.get("data", {}).get("batch_size")
  merged: dict[int, Any] = {}
  for state in states:
    if {k: v for k, v in state.items() if k != "rows"} != head:
      raise DataError("the processes' data iterator states were recorded for different data or versions")
    first, row_states = row_range(state)
    for r, row_state in enumerate(row_states, start=first):
      if merged.setdefault(r, row_state) != row_state:
        raise DataError(f"the processes disagree on the data state of batch row {r}")
  if sorted(merged) != list(range(batch_size or 0)):
    raise DataError(f"the data iterator states hold rows {sorted(merged)[:8]}..., not every row of the batch "
                    f"of {batch_size}")
  return {**head, "rows": {"first": 0, "states": [merged[r] for r in range(batch_size)]}}


def per_process_batch(seq_len: int, batch_size: int, process_count: int, process_index: int) -> int:
  """Checks the settings both iterators share; returns the rows per process."""
  sources.check_number("seq_len", seq_len, 1)
  sources.check_number("batch_size", batch_size, 1)
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} is not in [0, process_count={process_count})")
  if batch_size % process_count:
    raise DataError(f"batch_size={batch_size} is not divisible by the process count {process_count}")
  return batch_size // process_count


def make_train_iterator(data: Union[sources.DataPlan, Any], *, seq_len: int, batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1) -> TrainIterator:
  """The training batches of this process's rows [p * b, (p + 1) * b) of every global batch (b = batch_size /
  process_count): {"inputs", "targets"}: (b, seq_len) int32, plus the "reset" features. `data`: a DataPlan
  (`sources.plan`), or a `config.data`, planned here.

  Row r packs documents r, r + B, r + 2B, ... of the global sequence (row_streams.py), so the global batches are
  the same for any process count. A split with fewer documents than rows is fine: the sequence repeats (every
  epoch reshuffled), so a row simply reads later epochs' documents. The dataset must be prepared (`prepare`).

  Raises:
    DataError: bad settings, unprepared data or an empty split; from next(): a row that reads only empty documents
      for 8 * N + 64 documents in a row (N = the split's documents).
  """
  local_batch = per_process_batch(seq_len, batch_size, process_count, process_index)
  plan = sources.as_plan(data)
  tokenizer = make_tokenizer(plan)
  first = process_index * local_batch
  reader, rows, described = row_packers(plan, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed,
                                        rows=range(first, first + local_batch))
  fingerprint = {**described, "tokenizer": tokenizer_fingerprint(tokenizer), "add_eos": bool(plan.add_eos),
                 "seed": int(seed), **({"document_boundaries": "reset"} if _reset(plan) else {}),
                 "batch_size": int(batch_size)}
  return TrainIterator(reader, rows, first, fingerprint)


def _reset(plan: sources.DataPlan) -> bool:
  return plan.document_boundaries == "reset"


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
  return f"{type(tokenizer).__name__}(vocab={tokenizer.vocab_size}, eos={tokenizer.eos_id})"


def row_packers(plan: sources.DataPlan, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, seed: int,
                rows: range) -> tuple[DocumentReader, list[RowPacker], dict[str, Any]]:
  """The packers of global batch rows `rows` over the training split of `plan` (row_streams.py), their reader,
  and {"source": the split's description, "documents": its size} for the state's fingerprint."""
  source = sources.open_split(plan, plan.train_split, "train_split")  # not empty
  docs = global_documents(grain.MapDataset.source(source), seed=seed)
  reader = DocumentReader(docs.map(_Tokenize(tokenizer, plan.add_eos)))
  # A row with only empty documents for this long would loop forever; with a few non-empty documents, each of a
  # row's draws is one of them with probability >= 1/N, so a row meets one well within 8N draws.
  max_empty = 8 * len(source) + 64
  packers = [RowPacker(reader, r, batch_size, seq_len + 1, max_empty, with_positions=_reset(plan)) for r in rows]
  return reader, packers, {"source": source.description, "documents": len(source)}


def make_eval_batches(data: Union[sources.DataPlan, Any], *, seq_len: int, batch_size: int, num_batches: int,
                      process_index: int = 0, process_count: int = 1, split: Optional[str] = None) -> list[Batch]:
  """Fixed evaluation batches from the start of `split` (default `data.eval_split`), documents in order. `data`: a
  DataPlan (`sources.plan`), or a `config.data`, planned here.

  Returns `min(num_batches, available)` batches {"inputs", "targets"}: (batch_size / process_count, seq_len) int32;
  the rows of all processes together form the same global batches whatever the process count.

  Raises:
    DataError: bad settings, unprepared data, or a split too short for one full batch.
  """
  local_batch = per_process_batch(seq_len, batch_size, process_count, process_index)
  sources.check_number("num_batches", num_batches, 1)
  plan = sources.as_plan(data)
  key = "eval_split" if split is None else "split"
  split = plan.eval_split if split is None else split
  tokenize = _Tokenize(make_tokenizer(plan), plan.add_eos)
  source = sources.open_split(plan, split, key)
  window = seq_len + 1
  needed = num_batches * batch_size * window
  pieces, total = [], 0
  for i in range(len(source)):  # stop reading as soon as there are enough tokens
    if total >= needed:
      break
    pieces.append(tokenize(source[i]))
    total += pieces[-1].size
  reset = plan.document_boundaries == "reset"
  n_batches = min(num_batches, total // (batch_size * window))
  if n_batches == 0:
    name = f"data.eval_split={split!r}" if key == "eval_split" else f"split={split!r}"
    raise DataError(f"{name} has {total} tokens, fewer than one evaluation batch needs: {batch_size * window} "
                    f"(batch_size {batch_size} x (seq_len + 1) {window}); lower batch_size or seq_len, or hold out "
                    f"more documents (data.validation_percent for stdlib / text_files / jsonl)")
  shape, size = (n_batches, batch_size, window), n_batches * batch_size * window
  tokens = np.concatenate(pieces)[:size].reshape(shape)
  positions = np.concatenate([np.arange(p.size, dtype=np.int32) for p in pieces])[:size].reshape(shape) \
      if reset else None
  rows = slice(process_index * local_batch, (process_index + 1) * local_batch)
  out = []
  for b in range(n_batches):
    examples = [window_batch(tokens[b, r], None if positions is None else positions[b, r].copy())
                for r in range(rows.start, rows.stop)]
    out.append({k: np.stack([e[k] for e in examples]) for k in examples[0]})
  return out
