"""`data.document_boundaries`: the packer's segment ids, positions and target mask against a reference written out
token by token, carry batches unchanged, exact resume in reset mode, and the evaluation batches."""

import json
import random

import numpy as np
import pytest

from megalodon_jax.configs import default as default_config
from megalodon_jax import data
from megalodon_jax.data.row_streams import document_order

SEED = 5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """15 files (two empty, some a single byte) prepared with validation_percent=0."""
  root = tmp_path_factory.mktemp("boundaries")
  rng = random.Random(2)
  texts = ["".join(rng.choice("abcdef \n") for _ in range(rng.randrange(1, 30))) for _ in range(15)]
  texts[2], texts[9], texts[4], texts[11] = "", "", "x", "y"
  (root / "files").mkdir()
  for i, t in enumerate(texts):
    (root / "files" / f"{i:02d}.txt").write_text(t)
  cfg = default_config.get_config().data
  cfg.update(dict(data_dir=str(root / "tfds"), dataset="text_files", path=str(root / "files"), validation_percent=0))
  data.prepare(cfg)
  return cfg, [t.encode() for t in texts]


def reference(docs, order, seq_len, batch, count):
  """Token, occurrence number and in-document index for every token of the stream, then windows of seq_len + 1."""
  tokens, occurrence, index = [], [], []
  for n, d in enumerate(order):
    for i, b in enumerate(docs[d]):
      tokens.append(b)
      occurrence.append(n)
      index.append(i)
  w = seq_len + 1
  out = []
  for k in range(count):
    rows = {key: [] for key in ("inputs", "targets", "segment_ids", "positions", "target_mask")}
    for r in range(batch):
      s = (k * batch + r) * w
      occ = occurrence[s:s + w]
      rank = {o: j + 1 for j, o in enumerate(dict.fromkeys(occ))}  # documents numbered by first appearance
      rows["inputs"].append(tokens[s:s + w - 1])
      rows["targets"].append(tokens[s + 1:s + w])
      rows["segment_ids"].append([rank[o] for o in occ[:-1]])
      rows["positions"].append(index[s:s + w - 1])
      rows["target_mask"].append([int(occ[t + 1] == occ[t]) for t in range(w - 1)])
    out.append({k2: np.asarray(v, np.int32) for k2, v in rows.items()})
  return out


def test_reset_batches_mark_documents(corpus):
  cfg, docs = corpus
  cfg = cfg.copy_and_resolve_references()
  cfg.document_boundaries = "reset"
  seq_len, batch, count = 6, 3, 30  # several epochs, windows holding up to ~4 documents
  it = data.make_train_iterator(cfg, seq_len=seq_len, batch_size=batch, seed=SEED)
  got = [next(it) for _ in range(count)]
  order = document_order(len(docs), 40 * len(docs), seed=SEED)
  rows = [reference(docs, order[r::batch], seq_len, 1, count) for r in range(batch)]  # row r: documents r, r + B, ...
  want = [{k: np.concatenate([row[i][k] for row in rows]) for k in rows[0][i]} for i in range(count)]
  for g, w in zip(got, want):
    assert set(g) == set(w)
    for k in w:
      assert g[k].dtype == np.int32, k
      np.testing.assert_array_equal(g[k], w[k], err_msg=k)
  assert any((g["segment_ids"] > 2).any() for g in got)  # the corpus really packs several documents per window


def test_carry_batches_are_tokens_only_and_equal_to_reset_tokens(corpus):
  cfg, _ = corpus
  carry = data.make_train_iterator(cfg, seq_len=6, batch_size=3, seed=SEED)
  reset_cfg = cfg.copy_and_resolve_references()
  reset_cfg.document_boundaries = "reset"
  reset = data.make_train_iterator(reset_cfg, seq_len=6, batch_size=3, seed=SEED)
  for _ in range(10):
    c, r = next(carry), next(reset)
    assert set(c) == {"inputs", "targets"}
    np.testing.assert_array_equal(c["inputs"], r["inputs"])
    np.testing.assert_array_equal(c["targets"], r["targets"])


def test_reset_iterator_resumes_exactly(corpus):
  cfg, _ = corpus
  cfg = cfg.copy_and_resolve_references()
  cfg.document_boundaries = "reset"
  it = data.make_train_iterator(cfg, seq_len=6, batch_size=2, seed=SEED)
  states, batches = [], []
  for _ in range(25):
    states.append(it.get_state())
    batches.append(next(it))
  for step in (1, 7, 13):
    resumed = data.make_train_iterator(cfg, seq_len=6, batch_size=2, seed=SEED)
    resumed.set_state(json.loads(json.dumps(states[step])))
    for g, w in zip([next(resumed) for _ in range(25 - step)], batches[step:]):
      for k in w:
        np.testing.assert_array_equal(g[k], w[k])
  carry = data.make_train_iterator(corpus[0], seq_len=6, batch_size=2, seed=SEED)
  with pytest.raises(data.DataError, match="document_boundaries"):
    carry.set_state(states[3])  # a reset run's position is not silently reused by a carry run


def test_reset_eval_batches(corpus):
  cfg, docs = corpus
  cfg = cfg.copy_and_resolve_references()
  cfg.document_boundaries = "reset"
  got = data.make_eval_batches(cfg, split="train", seq_len=5, batch_size=2, num_batches=3)
  want = reference(docs, range(len(docs)), 5, 2, 3)
  for g, w in zip(got, want):
    for k in w:
      np.testing.assert_array_equal(g[k], w[k], err_msg=k)
  with pytest.raises(data.DataError, match="document_boundaries='sometimes'"):
    cfg.document_boundaries = "sometimes"
    data.check_data_config(cfg)
