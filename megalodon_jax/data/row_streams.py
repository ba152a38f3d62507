"""Row streams: the packer of one global batch row over its share of one global document sequence.

The training documents form ONE sequence: the split shuffled with a seed-derived key, reshuffled every epoch and
repeated forever (`global_documents`). Global batch row r (0 <= r < B, B = batch_size) reads the documents at
positions r, r + B, r + 2B, ... of that sequence, tokenizes them, concatenates them and cuts the stream into
windows of seq_len + 1 tokens; window k of row r is row r of global batch k. A row's windows therefore depend on
the data, the seed, B and seq_len only, never on the number of processes that share the rows.

Tokenizing ahead: every row keeps its next few documents requested on one thread pool shared by the rows of the
process (`DocumentReader`); a row always takes its own documents in order, so batches do not depend on timing.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
from typing import Any, Callable, Optional

import grain
import numpy as np

from megalodon_jax.errors import DataError

Batch = dict[str, np.ndarray]

# Tokenize-ahead: threads shared by all rows of a process; documents kept requested per row: at least
# ROW_PREFETCH, and one more than the row's last window took (short documents), at most MAX_ROW_PREFETCH.
READ_THREADS = 4
ROW_PREFETCH = 2
MAX_ROW_PREFETCH = 64


def derive_seed(seed: int, purpose: str) -> int:
  """A 32-bit seed for `purpose` from the run seed (so runs with seeds s and s + 1 do not share epoch orders)."""
  digest = hashlib.sha256(f"megalodon-data/{purpose}/{int(seed)}".encode()).digest()
  return int.from_bytes(digest[:4], "little")


def global_documents(ds: grain.MapDataset, *, seed: int) -> grain.MapDataset:
  """The global document sequence: `ds` shuffled per epoch (grain's ShuffleMapDataset uses seed + epoch), repeated
  forever; element i is document `perm_{i // N}[i % N]` (N = len(ds))."""
  return ds.shuffle(seed=derive_seed(seed, "shuffle")).repeat(None)


def document_order(num_documents: int, count: int, *, seed: int) -> np.ndarray:
  """The first `count` document indices of the global sequence: (count,) int64."""
  return row_documents(num_documents, count, seed=seed, batch_size=1, row=0)


def row_documents(num_documents: int, count: int, *, seed: int, batch_size: int, row: int) -> np.ndarray:
  """The first `count` document indices row `row` reads: positions row, row + B, ... of the global sequence."""
  ds = global_documents(grain.MapDataset.range(num_documents), seed=seed)
  return np.asarray([ds[row + k * batch_size] for k in range(count)], dtype=np.int64)


def window_batch(window: np.ndarray, positions: Optional[np.ndarray]) -> Batch:
  """One packed window (seq_len + 1,) as a training example; `positions` (same shape, index of each token in its
  document) adds the "reset" features: segment_ids, positions and target_mask, all (seq_len,) int32."""
  out = {"inputs": window[:-1], "targets": window[1:]}
  if positions is not None:
    starts = positions == 0
    starts[0] = True  # the window's first document is segment 1 wherever it began
    segment_ids = np.cumsum(starts, dtype=np.int32)
    out.update(segment_ids=segment_ids[:-1], positions=positions[:-1].astype(np.int32),
               target_mask=(positions[1:] != 0).astype(np.int32))
  return out


class DocumentReader:
  """Tokenized documents of the global sequence by position, read and tokenized on a shared pool of threads.

  Args:
    documents: position -> (n,) int32 token ids (a grain MapDataset: random access, safe from several threads).
    threads: size of the pool.
  """

  def __init__(self, documents: Callable[[int], np.ndarray], threads: int = READ_THREADS):
    self._documents = documents
    self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="megalodon-data")

  def request(self, position: int) -> concurrent.futures.Future:
    return self._pool.submit(self._documents.__getitem__, position)

  def close(self) -> None:
    self._pool.shutdown(wait=False, cancel_futures=True)


class RowPacker:
  """Windows of one row: documents `row + k * stride` (k = 0, 1, ...) concatenated and cut into `window` tokens.

  `next_window()` gives {"inputs", "targets"}: (window - 1,) int32, plus the "reset" features of `window_batch`
  when `with_positions`. State: {"documents": k, "offset": o}: the row has started its first k documents and used
  o tokens of document k - 1 (o = 0: no document in progress). Offsets count tokens, so a state resumes at the
  same token whatever the window length.

  Raises (from next_window): DataError when `max_empty` + 1 documents in a row are empty.
  """

  def __init__(self, reader: DocumentReader, row: int, stride: int, window: int, max_empty: int,
               with_positions: bool = False, prefetch: int = ROW_PREFETCH):
    self._reader, self._row, self._stride, self._window = reader, row, stride, window
    self._max_empty, self._with_positions, self._prefetch = max_empty, with_positions, prefetch
    self._ahead = prefetch
    self._pending: collections.deque = collections.deque()  # futures of documents _started, _started + 1, ...
    self._started, self._doc, self._offset = 0, np.zeros((0,), np.int32), 0

  def request_ahead(self) -> None:
    """Keeps the row's next documents requested (the iterator calls it for every row around each batch)."""
    while len(self._pending) < self._ahead:
      k = self._started + len(self._pending)
      self._pending.append(self._reader.request(self._row + k * self._stride))

  def _next_doc(self) -> None:
    for _ in range(self._max_empty + 1):
      self.request_ahead()
      self._doc, self._offset = self._pending.popleft().result(), 0
      self._started += 1
      if self._doc.size:
        return
    raise DataError(f"the training documents produce no tokens: batch row {self._row} read {self._max_empty + 1} "
                    f"empty documents in a row")

  def next_window(self) -> Batch:
    pieces, positions, need, started = [], [], self._window, self._started
    while need:
      if self._offset == self._doc.size:
        self._next_doc()
      take = min(need, self._doc.size - self._offset)
      pieces.append(self._doc[self._offset:self._offset + take])
      if self._with_positions:
        positions.append(np.arange(self._offset, self._offset + take, dtype=np.int32))
      self._offset += take
      need -= take
    # Only how far ahead the row reads adapts (never what it reads): batches do not depend on it.
    self._ahead = min(max(self._prefetch, self._started - started + 1), MAX_ROW_PREFETCH)
    w = np.concatenate(pieces) if len(pieces) > 1 else pieces[0].copy()
    return window_batch(w, np.concatenate(positions) if self._with_positions else None)

  def get_state(self) -> dict[str, int]:
    offset = 0 if self._offset == self._doc.size else self._offset
    return {"documents": int(self._started), "offset": int(offset)}

  def set_state(self, state: dict[str, Any]) -> None:
    documents, offset = state.get("documents"), state.get("offset")
    if not (isinstance(documents, int) and isinstance(offset, int) and documents >= 0 and offset >= 0
            and (documents or not offset)):
      raise DataError(f"batch row {self._row}: not a row state: {str(state)[:200]}")
    for f in self._pending:
      f.cancel()
    self._pending.clear()
    self._doc, self._offset, self._started = np.zeros((0,), np.int32), 0, documents
    if offset:  # document `documents - 1` is in progress
      self._doc = self._reader.request(self._row + (documents - 1) * self._stride).result()
      if offset >= self._doc.size:
        raise DataError(f"batch row {self._row}: state offset {offset} is past the end of its document "
                        f"({self._doc.size} tokens): the data changed since the state was saved")
      self._offset = offset
