"""One plan per data run: `data.plan(config.data)` resolves the source once (file listing, stat and text check), and
`prepare`, the training iterator and the evaluation batches built from that plan resolve nothing again, reading
the same batches as iterators built from the config (the way before plans) and as an independent NumPy reading of
the files."""

import dataclasses
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from test_data_order import global_batches

from megalodon_jax.configs import default as default_config
from megalodon_jax import data
from megalodon_jax.data import text_files
from megalodon_jax.data.config import DataConfig
from megalodon_jax.data.row_streams import document_order

SEED = 5
KEYS = ("inputs", "targets", "segment_ids", "positions", "target_mask")


def make_corpus(root, n=14, percent=0):
  """`n` text files (one empty) and their config; with percent=0 every file is training, in name order."""
  rng = random.Random(9)
  texts = ["".join(rng.choice("abcdef \n") for _ in range(rng.randrange(1, 40))) for _ in range(n)]
  texts[4] = ""
  (root / "files").mkdir()
  for i, t in enumerate(texts):
    (root / "files" / f"{i:02d}.txt").write_text(t)
  cfg = default_config.get_config().data
  cfg.update(dict(data_dir=str(root / "tfds"), dataset="text_files", path=str(root / "files"),
                  validation_percent=percent, document_boundaries="reset"))
  return cfg, [np.frombuffer(t.encode(), np.uint8) for t in texts]


@pytest.fixture
def resolutions(monkeypatch):
  """Counts the source resolutions: listing and stat of the files, and their text check."""
  counts = {"documents": 0, "text_check": 0}
  list_files, check = text_files.text_files_documents, text_files.check_text_files

  def counted(name, fn):
    def spy(*args, **kwargs):
      counts[name] += 1
      return fn(*args, **kwargs)
    return spy

  monkeypatch.setattr(text_files, "text_files_documents", counted("documents", list_files))
  monkeypatch.setattr(text_files, "check_text_files", counted("text_check", check))
  return counts


def test_a_training_sequence_resolves_the_source_once(tmp_path, resolutions):
  cfg, _ = make_corpus(tmp_path, percent=30)
  plan = data.check_data_config(cfg)  # what train_config.check_inputs runs first
  assert isinstance(plan, data.DataPlan) and resolutions == {"documents": 1, "text_check": 1}
  assert data.prepare(plan) is plan
  kw = dict(seq_len=6, batch_size=2)
  it = data.make_train_iterator(plan, seed=SEED, **kw)
  next(it)
  it.close()
  assert data.make_eval_batches(plan, num_batches=1, **kw)
  assert data.make_tokenizer(plan).vocab_size == 256
  assert resolutions == {"documents": 1, "text_check": 1}
  # A config is still taken, and planned on each call (the transition path).
  data.make_eval_batches(cfg, num_batches=1, **kw)
  assert resolutions["documents"] == 2


def test_a_plan_reads_the_files_as_planned(tmp_path):
  """Editing a file after planning: the plan keeps reading the dataset prepared for it; a config re-resolves and
  names a new, unprepared dataset."""
  cfg, _ = make_corpus(tmp_path)
  plan = data.prepare(data.plan(cfg))
  kw = dict(seq_len=6, batch_size=2, num_batches=2, split="train")
  before = data.make_eval_batches(plan, **kw)
  with open(tmp_path / "files" / "00.txt", "a") as f:
    f.write("appended later")
  for a, b in zip(data.make_eval_batches(plan, **kw), before):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  with pytest.raises(data.DataError, match=r"is not prepared in data.data_dir=.*call megalodon_jax.data.prepare"):
    data.make_eval_batches(cfg, **kw)


def assert_same(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert set(g) == set(w)
    for k in g:
      assert g[k].dtype == w[k].dtype == np.int32
      np.testing.assert_array_equal(g[k], w[k], err_msg=k)


def test_plan_iterators_equal_the_config_iterators_and_the_files(tmp_path):
  cfg, docs = make_corpus(tmp_path)
  data.prepare(cfg)
  plan = data.plan(cfg)
  batch, seq_len, steps = 4, 5, 9

  def iterators(source, count):
    return [data.make_train_iterator(source, seq_len=seq_len, batch_size=batch, seed=SEED, process_index=p,
                                     process_count=count) for p in range(count)]

  from_plan, from_cfg = iterators(plan, 2), iterators(cfg, 1)
  got = global_batches(from_plan, steps)
  assert_same(got, global_batches(from_cfg, steps))
  # Independently: row r packs documents r, r + B, ... of the seed's global order, windows of seq_len + 1.
  order = document_order(len(docs), batch * (steps * (seq_len + 1) + 1), seed=SEED)
  for row in range(batch):
    tokens = np.concatenate([docs[d] for d in order[row::batch]])[:steps * (seq_len + 1)]
    windows = tokens.reshape(steps, seq_len + 1).astype(np.int32)
    np.testing.assert_array_equal(np.stack([b["inputs"][row] for b in got]), windows[:, :-1])
    np.testing.assert_array_equal(np.stack([b["targets"][row] for b in got]), windows[:, 1:])
  # Same checkpointed state (fingerprint included), and a state saved by either resumes on the other.
  state = data.merge_states([it.get_state() for it in from_plan])
  assert json.dumps(state, sort_keys=True) == json.dumps(from_cfg[0].get_state(), sort_keys=True)
  straight = global_batches(from_cfg, 4)
  resumed = iterators(plan, 4)
  for it in resumed:
    it.set_state(state)
  assert_same(global_batches(resumed, 4), straight)
  kw = dict(seq_len=seq_len, batch_size=2, num_batches=3, split="train")
  evals = data.make_eval_batches(plan, **kw)
  assert_same(evals, data.make_eval_batches(cfg, **kw))
  stream = np.concatenate(docs)[:3 * 2 * (seq_len + 1)].reshape(3, 2, seq_len + 1).astype(np.int32)
  np.testing.assert_array_equal(np.stack([b["inputs"] for b in evals]), stream[:, :, :-1])
  for it in from_plan + from_cfg + resumed:
    it.close()


def test_the_plan_is_a_frozen_value_with_the_checks_messages(tmp_path):
  cfg, _ = make_corpus(tmp_path)
  plan = data.plan(cfg)
  assert plan == data.check_data_config(cfg) == data.plan(DataConfig(**cfg.to_dict()))  # the trainer's typed config
  assert plan.dataset == "text_files" and plan.splits == ("train", "validation")
  assert plan.data_dir == str(tmp_path / "tfds") and plan.document_boundaries == "reset"
  with pytest.raises(dataclasses.FrozenInstanceError):
    plan.train_split = "validation"
  with pytest.raises(data.DataError, match=r"data.dataset='text_files' is not prepared in data.data_dir="):
    data.make_train_iterator(plan, seq_len=4, batch_size=2, seed=SEED)
  with pytest.raises(data.DataError, match=r"split='test': data.dataset='text_files' has no such split"):
    data.make_eval_batches(plan, seq_len=4, batch_size=2, num_batches=1, split="test")
  cfg.path = str(tmp_path / "nope")
  with pytest.raises(data.DataError, match=r"data.path: '.*nope' matches no file"):
    data.plan(cfg)


def test_planning_imports_neither_jax_nor_grain(tmp_path):
  """The command line plans before jax starts: the plan path needs sources.py (and TFDS) only."""
  code = ("import sys, types\nimport megalodon_jax.data as d\n"
          "assert not {'jax', 'grain', 'tensorflow_datasets'} & set(sys.modules), 'import'\n"
          f"d.plan(types.SimpleNamespace(dataset='stdlib', max_documents=3, data_dir={str(tmp_path)!r}))\n"
          "print(sorted({'jax', 'grain'} & set(sys.modules)))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip() == "[]"
