"""The training data order does not depend on the process count: row streams, per-row state, resume on another
number of processes, and the version-1 state. Every process of a P-process run is built here in one Python process
(process_index 0..P-1); the reference is plain NumPy over the documented rule (row r packs documents r, r + B, ...
of the global shuffled sequence)."""

import functools
import random

import numpy as np
import pytest

from batches import assert_same as _assert_same, global_batches
from megalodon_jax.configs import default as default_config
from megalodon_jax import data
from megalodon_jax.data.row_streams import document_order
from megalodon_jax.errors import CheckpointError
from megalodon_jax.training import data_state

SEED = 3
KEYS = ("inputs", "targets", "segment_ids", "positions", "target_mask")


def assert_same(got, want):
  _assert_same(got, want, KEYS)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """10 files of 0 to 24 bytes (one empty), prepared with validation_percent=0: the train split is every file."""
  root = tmp_path_factory.mktemp("order")
  rng = random.Random(4)
  texts = ["".join(rng.choice("abcdefgh \n") for _ in range(rng.randrange(1, 25))) for _ in range(10)]
  texts[6] = ""
  (root / "files").mkdir()
  for i, t in enumerate(texts):
    (root / "files" / f"{i:02d}.txt").write_text(t)
  cfg = default_config.get_config().data
  cfg.update(dict(data_dir=str(root / "tfds"), dataset="text_files", path=str(root / "files"), validation_percent=0,
                  document_boundaries="reset"))
  data.prepare(cfg)
  return cfg, [np.frombuffer(t.encode(), np.uint8) for t in texts]


def processes(cfg, count, batch_size=8, seq_len=5):
  return [data.make_train_iterator(cfg, seq_len=seq_len, batch_size=batch_size, seed=SEED, process_index=p,
                                   process_count=count) for p in range(count)]


@functools.lru_cache(maxsize=None)
def global_order(num_documents, count):
  return document_order(num_documents, count, seed=SEED)


def row_reference(docs, row, batch_size, seq_len, count):
  """Row `row`'s first `count` windows by the documented rule: the documents at positions row, row + B, ... of the
  global order, concatenated; windows of seq_len + 1; positions = index in the document."""
  order = global_order(len(docs), batch_size * (count * (seq_len + 1) + 1))[row::batch_size]
  tokens = np.concatenate([docs[d] for d in order]).astype(np.int32)
  index = np.concatenate([np.arange(docs[d].size) for d in order]).astype(np.int32)
  w = seq_len + 1
  windows = tokens[:count * w].reshape(count, w)
  pos = index[:count * w].reshape(count, w)
  segments = np.cumsum((pos == 0) | (np.arange(w) == 0), axis=1, dtype=np.int32)
  return {"inputs": windows[:, :-1], "targets": windows[:, 1:], "positions": pos[:, :-1],
          "segment_ids": segments[:, :-1], "target_mask": (pos[:, 1:] != 0).astype(np.int32)}


def test_global_batches_equal_for_1_2_4_processes(corpus):
  cfg, _ = corpus
  want = global_batches(processes(cfg, 1), 12)  # several epochs of the corpus per row
  for count in (2, 4):
    assert_same(global_batches(processes(cfg, count), 12), want)


def test_row_streams_equal_the_numpy_rule(corpus):
  cfg, docs = corpus
  batch_size, seq_len, steps = 8, 5, 12
  got = global_batches(processes(cfg, 2, batch_size, seq_len), steps)
  for row in range(batch_size):
    want = row_reference(docs, row, batch_size, seq_len, steps)
    for k in KEYS:
      np.testing.assert_array_equal(np.stack([b[k][row] for b in got]), want[k], err_msg=f"row {row}, {k}")
  assert any((b["segment_ids"] > 1).any() for b in got)  # windows really cross documents


def test_fewer_documents_than_rows(corpus):
  """16 rows over 10 documents: the sequence repeats, so rows 10..15 start in the second epoch's order."""
  cfg, docs = corpus
  one = global_batches(processes(cfg, 1, batch_size=16), 6)
  assert_same(global_batches(processes(cfg, 16, batch_size=16), 6), one)
  for row in (0, 12, 15):
    np.testing.assert_array_equal(np.stack([b["inputs"][row] for b in one]),
                                  row_reference(docs, row, 16, 5, 6)["inputs"])


@pytest.mark.parametrize("k", [1, 7])
def test_resume_on_another_process_count(corpus, k):
  """States of a 2-process run after k steps, merged, continue exactly on 1 and on 4 processes."""
  cfg, _ = corpus
  straight = global_batches(processes(cfg, 1), k + 8)
  two = processes(cfg, 2)
  assert_same(global_batches(two, k), straight[:k])
  saved = data.merge_states([it.get_state() for it in reversed(two)])  # any order
  assert len(saved["rows"]["states"]) == 8 and "process_count" not in saved["data"]
  for count in (1, 4):
    resumed = processes(cfg, count)
    for it in resumed:
      it.set_state(saved)
    assert_same(global_batches(resumed, 8), straight[k:])


def test_merge_states_needs_every_row(corpus):
  cfg, _ = corpus
  two = processes(cfg, 2)
  with pytest.raises(data.DataError, match="not every row of the batch of 8"):
    data.merge_states([two[0].get_state()])
  other = processes(cfg, 2, batch_size=4)[1]
  with pytest.raises(data.DataError, match="different data"):
    data.merge_states([two[0].get_state(), other.get_state()])


def test_gather_on_one_process_is_the_global_state(corpus):
  cfg, _ = corpus
  (it,) = processes(cfg, 1)
  next(it)
  state = it.get_state()
  assert data_state.gather_data_state(state) == state
  assert data_state.restored_data_state(state, "/ckpt", 3) == state


def test_version_1_state_says_how_to_continue(corpus):
  cfg, _ = corpus
  old = {"version": 1, "data": {"seed": SEED, "process_index": 0, "process_count": 1},
         "position": {"parent": {"next_index": 4}, "offset": 2}}
  with pytest.raises(CheckpointError, match=r"/runs/a/checkpoints/40: .*version-1 data pipeline.*"
                                            r"new workdir with --config.init_from=/runs/a/checkpoints"):
    data_state.restored_data_state({"process_states": [old]}, "/runs/a/checkpoints", 40)
  (it,) = processes(cfg, 1)
  with pytest.raises(data.DataError, match="version-1 data pipeline.*--config.init_from"):
    it.set_state(old)


def test_a_row_of_only_empty_documents_stops(tmp_path):
  (tmp_path / "files").mkdir()
  for i in range(3):
    (tmp_path / "files" / f"{i}.txt").write_text("")
  cfg = default_config.get_config().data
  cfg.update(dict(data_dir=str(tmp_path / "tfds"), dataset="text_files", path=str(tmp_path / "files"),
                  validation_percent=0))
  data.prepare(cfg)
  it = data.make_train_iterator(cfg, seq_len=4, batch_size=2, seed=SEED)
  with pytest.raises(data.DataError, match=r"no tokens: batch row 0 read 89 empty documents in a row"):
    next(it)
