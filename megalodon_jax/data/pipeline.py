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
This packer, not grain's `ConcatThenSplitIterDataset`: grain's packer emits segment ids and positions too, but it
passes documents that fill a window on their own ahead of the buffer, which reorders the stream (carry batches
would change, and with them every existing run's data order). Ours keeps the stream order, and its state (the
document in progress and its offset) already resumes exactly, with or without the extra features.

Training: documents are sharded per process (process p reads documents p, p + P, p + 2P, ... of the split: disjoint
and together covering), shuffled with a seed-derived key and reshuffled every epoch (grain's ShuffleMapDataset uses
seed + epoch), repeated forever. The window stream continues across epochs (no tokens are dropped). The iterator is
checkpointable: its state is the position of the next document in the grain pipeline plus the number of tokens of
the current document already consumed.

Evaluation: documents in stored order, no shuffle; the same windows on every call and for any process count
(process p gets rows [p * b, (p + 1) * b) of each global batch of `batch_size` windows, b = batch_size / P).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

import grain
import numpy as np

from megalodon_jax.data import sources
from megalodon_jax.data.tokenizers import Tokenizer, make_tokenizer
from megalodon_jax.errors import DataError

Batch = dict[str, np.ndarray]

_STATE_VERSION = 1


def derive_seed(seed: int, purpose: str) -> int:
  """A 32-bit seed for `purpose` from the run seed (so runs with seeds s and s + 1 do not share epoch orders)."""
  digest = hashlib.sha256(f"megalodon-data/{purpose}/{int(seed)}".encode()).digest()
  return int.from_bytes(digest[:4], "little")


def shuffled_shard(ds: grain.MapDataset, *, seed: int, process_index: int, process_count: int) -> grain.MapDataset:
  """This process's documents of `ds`, reshuffled every epoch, repeated forever."""
  return ds[process_index::process_count].shuffle(seed=derive_seed(seed, "shuffle")).repeat(None)


def document_order(num_documents: int, count: int, *, seed: int, process_index: int = 0,
                   process_count: int = 1) -> np.ndarray:
  """The first `count` document indices the training stream of this process reads: (count,) int64."""
  ds = shuffled_shard(grain.MapDataset.range(num_documents), seed=seed, process_index=process_index,
                      process_count=process_count)
  return np.asarray([ds[i] for i in range(count)], dtype=np.int64)


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


class _PackIterator(grain.DatasetIterator):
  """Concatenates 1-D token arrays and cuts them into windows; yields {"inputs", "targets"}: (seq_len,) int32, plus
  the "reset" features of `window_batch` when `with_positions`.

  State: `parent` = the parent's state just before the current document, `offset` = its tokens already used
  (offset 0 means no current document: `parent` is then the parent's live state).
  """

  def __init__(self, parent: grain.DatasetIterator, window: int, max_empty: int, with_positions: bool = False):
    super().__init__(parent)
    self._window = window
    self._max_empty = max_empty
    self._with_positions = with_positions
    self._doc = np.zeros((0,), np.int32)
    self._doc_state = None
    self._offset = 0

  def _next_doc(self) -> None:
    for _ in range(self._max_empty + 1):
      self._doc_state = self._parent.get_state()
      self._doc = next(self._parent)
      self._offset = 0
      if self._doc.size:
        return
    raise DataError(f"the training documents produce no tokens ({self._max_empty + 1} empty documents in a row)")

  def __next__(self) -> Batch:
    pieces, positions, need = [], [], self._window
    while need:
      if self._offset == self._doc.size:
        self._next_doc()
      take = min(need, self._doc.size - self._offset)
      pieces.append(self._doc[self._offset:self._offset + take])
      if self._with_positions:
        positions.append(np.arange(self._offset, self._offset + take, dtype=np.int32))
      self._offset += take
      need -= take
    w = np.concatenate(pieces) if len(pieces) > 1 else pieces[0].copy()
    return window_batch(w, np.concatenate(positions) if self._with_positions else None)

  def get_state(self) -> dict[str, Any]:
    if self._offset == self._doc.size:
      return {"parent": self._parent.get_state(), "offset": 0}
    return {"parent": self._doc_state, "offset": int(self._offset)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._doc, self._offset = np.zeros((0,), np.int32), 0
    if state["offset"]:
      self._next_doc()
      if state["offset"] >= self._doc.size:
        raise DataError(f"iterator state offset {state['offset']} is past the end of its document "
                        f"({self._doc.size} tokens): the data changed since the state was saved")
      self._offset = int(state["offset"])


class _PackIterDataset(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, window: int, max_empty: int, with_positions: bool = False):
    super().__init__(parent)
    self._window = window
    self._max_empty = max_empty
    self._with_positions = with_positions

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self._window, self._max_empty, self._with_positions)

  def __str__(self) -> str:
    return f"_PackIterDataset(window={self._window})"


class TrainIterator:
  """Infinite iterator of training batches {"inputs", "targets"}: (batch_size / process_count, seq_len) int32.

  `get_state()` is a JSON-serializable dict; `set_state(state)` on an iterator built with the same data settings
  continues with exactly the batches that would have followed. The state is per process (each reads its own
  documents): a multi-process run must save every process's state and give each its own back.
  """

  def __init__(self, dataset: grain.IterDataset, fingerprint: dict[str, Any]):
    self._dataset = dataset
    self._iter = iter(dataset)
    self._fingerprint = fingerprint

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> Batch:
    return next(self._iter)

  def get_state(self) -> dict[str, Any]:
    # Round-trip through JSON so callers get plain lists/ints whatever grain returns.
    return json.loads(json.dumps({"version": _STATE_VERSION, "data": self._fingerprint,
                                  "position": self._iter.get_state()}))

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from `state` (from `get_state` of a run with the same data settings).

    Raises:
      DataError: the state was saved for other data (dataset, files, tokenizer, seed or process layout).
    """
    if not isinstance(state, dict) or state.get("version") != _STATE_VERSION or "position" not in state:
      raise DataError(f"not a data iterator state of this version: {str(state)[:200]}")
    saved = state.get("data", {})
    diff = {k: (saved.get(k), self._fingerprint.get(k)) for k in {**saved, **self._fingerprint}
            if saved.get(k) != self._fingerprint.get(k)}
    if set(diff) == {"process_index"}:
      raise DataError(f"this data iterator state was saved by process {saved.get('process_index')}, not by process "
                      f"{self._fingerprint['process_index']}: each process reads its own documents, so each must "
                      f"restore the state its own get_state() returned")
    if diff:
      details = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
      raise DataError(f"the checkpoint's data position was recorded for other data ({details}); resume with the "
                      f"same data.* settings, seed and process count, or start in a new workdir")
    self._iter.set_state(state["position"])


def _per_process_batch(batch_size: int, process_count: int, process_index: int) -> int:
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise DataError(f"batch_size={batch_size!r}: must be an int >= 1")
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} is not in [0, process_count={process_count})")
  if batch_size % process_count:
    raise DataError(f"batch_size={batch_size} is not divisible by the process count {process_count}")
  return batch_size // process_count


def _check_seq_len(seq_len: int) -> None:
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
    raise DataError(f"seq_len={seq_len!r}: must be an int >= 1")


def make_train_iterator(data_cfg: Any, *, seq_len: int, batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1) -> TrainIterator:
  """The training batches of this process: {"inputs", "targets"}: (batch_size / process_count, seq_len) int32.

  The dataset must be prepared (`prepare`).

  Raises:
    DataError: bad settings, unprepared data, or fewer training documents than processes.
  """
  _check_seq_len(seq_len)
  local_batch = _per_process_batch(batch_size, process_count, process_index)
  tokenizer = make_tokenizer(data_cfg)
  source = sources.open_split(data_cfg, sources.field(data_cfg, "train_split"), "train_split")
  if len(source) < process_count:
    raise DataError(f"data.train_split={sources.field(data_cfg, 'train_split')!r} has {len(source)} documents, "
                    f"fewer than the {process_count} processes that each need their own")
  shard_len = len(range(process_index, len(source), process_count))
  docs = shuffled_shard(grain.MapDataset.source(source), seed=seed, process_index=process_index,
                        process_count=process_count)
  docs = docs.map(_Tokenize(tokenizer, sources.field(data_cfg, "add_eos")))
  # A few threads tokenize ahead; grain keeps their output in order, so batches do not depend on timing.
  stream = docs.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=16))
  reset = sources.field(data_cfg, "document_boundaries") == "reset"
  windows = _PackIterDataset(stream, seq_len + 1, max_empty=shard_len, with_positions=reset)
  batches = windows.batch(local_batch, drop_remainder=True)
  fingerprint = {"source": source.description, "documents": len(source),
                 "tokenizer": f"{type(tokenizer).__name__}(vocab={tokenizer.vocab_size}, eos={tokenizer.eos_id})",
                 "add_eos": bool(sources.field(data_cfg, "add_eos")), "seed": int(seed),
                 **({"document_boundaries": "reset"} if reset else {}),  # absent for carry: old states still load
                 "process_index": int(process_index), "process_count": int(process_count)}
  return TrainIterator(batches, fingerprint)


def make_eval_batches(data_cfg: Any, *, seq_len: int, batch_size: int, num_batches: int, process_index: int = 0,
                      process_count: int = 1, split: Optional[str] = None) -> list[Batch]:
  """Fixed evaluation batches from the start of `split` (default `data.eval_split`), documents in order.

  Returns `min(num_batches, available)` batches {"inputs", "targets"}: (batch_size / process_count, seq_len) int32;
  the rows of all processes together form the same global batches whatever the process count.

  Raises:
    DataError: bad settings, unprepared data, or a split too short for one full batch.
  """
  _check_seq_len(seq_len)
  local_batch = _per_process_batch(batch_size, process_count, process_index)
  if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
    raise DataError(f"num_batches={num_batches!r}: must be an int >= 1")
  key = "eval_split" if split is None else "split"
  split = sources.field(data_cfg, "eval_split") if split is None else split
  tokenizer = make_tokenizer(data_cfg)
  source = sources.open_split(data_cfg, split, key)
  tokenize = _Tokenize(tokenizer, sources.field(data_cfg, "add_eos"))
  window = seq_len + 1
  needed = num_batches * batch_size * window
  pieces, total = [], 0
  for i in range(len(source)):  # stop reading as soon as there are enough tokens
    if total >= needed:
      break
    pieces.append(tokenize(source[i]))
    total += pieces[-1].size
  reset = sources.field(data_cfg, "document_boundaries") == "reset"
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
