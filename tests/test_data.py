"""Data package: builders (stdlib, text_files, enwik8, tfds by name), splits, packing, iterator state, eval batches,
and the config errors. References are plain NumPy / zlib / os.walk computations independent of the package."""

import json
import os
import random
import sysconfig
import threading
import zipfile
import zlib

import numpy as np
import pytest
import sentencepiece as spm

from megalodon_jax.configs import default as default_config
from megalodon_jax import data
from megalodon_jax.data import enwik8, sources
from megalodon_jax.data.row_streams import document_order, row_documents
from megalodon_jax.data.stdlib_corpus import stdlib_documents
from megalodon_jax.data.text_files import text_files_documents

SEED = 7


def make_cfg(data_dir, **kw):
  c = default_config.get_config().data
  c.data_dir = str(data_dir)
  c.update(kw)
  return c


def held_out(name, percent):
  """The documented split rule, written out independently."""
  return zlib.crc32(name.encode("utf-8")) % 10_000 < round(percent * 100)


def write_docs(folder, texts):
  folder.mkdir(parents=True, exist_ok=True)
  paths = []
  for i, t in enumerate(texts):
    p = folder / f"doc_{i:03d}.txt"
    p.write_bytes(t.encode("utf-8") if isinstance(t, str) else t)
    paths.append(os.path.realpath(p))
  return paths


def random_texts(n, seed, max_len=40):
  rng = random.Random(seed)
  return ["".join(rng.choice("abcdefghij \n") for _ in range(rng.randrange(max_len))) for _ in range(n)]


def reference_batches(docs_tokens, order, seq_len, batch, count):
  """`count` batches of plain concatenate-and-reshape over the documents in `order`."""
  stream = np.concatenate([docs_tokens[i] for i in order]).astype(np.int32)
  need = count * batch * (seq_len + 1)
  assert stream.size >= need, "reference needs more documents"
  w = stream[:need].reshape(count, batch, seq_len + 1)
  return [{"inputs": x[:, :-1], "targets": x[:, 1:]} for x in w]


def row_reference_batches(docs_tokens, order, seq_len, batch, count):
  """The documented training rule: row r packs documents order[r], order[r + B], ... (B = batch) on its own."""
  rows = [reference_batches(docs_tokens, order[r::batch], seq_len, 1, count) for r in range(batch)]
  return [{k: np.concatenate([row[i][k] for row in rows]) for k in ("inputs", "targets")} for i in range(count)]


def assert_batches_equal(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert set(g) == {"inputs", "targets"}
    for k in ("inputs", "targets"):
      assert g[k].dtype == np.int32 and g[k].shape == w[k].shape
      np.testing.assert_array_equal(g[k], w[k])


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
  """12 text files (one empty) prepared with validation_percent=0: the train split is every file in name order."""
  root = tmp_path_factory.mktemp("corpus")
  texts = random_texts(12, seed=1)
  texts[3] = ""
  paths = write_docs(root / "files", texts)
  cfg = make_cfg(root / "tfds", dataset="text_files", path=str(root / "files" / "*.txt"), validation_percent=0)
  data.prepare(cfg)
  return cfg, [np.frombuffer(t.encode(), np.uint8) for t in texts], paths


@pytest.fixture(scope="module")
def stdlib_cfg(tmp_path_factory):
  cfg = make_cfg(tmp_path_factory.mktemp("stdlib_tfds"), max_documents=60, validation_percent=20)
  data.prepare(cfg)
  return cfg


# ---------------- splits and document sets ----------------


def test_text_files_split_is_hash_rule_disjoint_covering(tmp_path):
  paths = write_docs(tmp_path / "d", [f"doc {i}" for i in range(200)])
  docs = text_files_documents(str(tmp_path / "d"), validation_percent=10, max_documents=0)
  train = [f.name for f in docs.split("train")]
  val = [f.name for f in docs.split("validation")]
  assert val == sorted(p for p in paths if held_out(p, 10))
  assert train == sorted(p for p in paths if not held_out(p, 10))
  assert 0 < len(val) < 60  # about 10% of 200
  again = text_files_documents(str(tmp_path / "d"), 10, 0)
  assert [f.name for f in again.split("validation")] == val
  # A file's split depends on its own name only: dropping files keeps the others where they were.
  fewer = text_files_documents(",".join(paths[:100]), 10, 0)
  assert [f.name for f in fewer.split("validation")] == [p for p in val if p in paths[:100]]
  assert text_files_documents(str(tmp_path / "d"), 0, 0).split("validation") == []
  assert text_files_documents(str(tmp_path / "d"), 100, 0).split("train") == []


def test_text_files_paths_globs_dedupe_and_max_documents(tmp_path):
  paths = write_docs(tmp_path / "a", ["x", "y", "z"])
  write_docs(tmp_path / "b", ["w"])
  docs = text_files_documents(f"{tmp_path}/a/*.txt, {paths[0]}, {tmp_path}/b", 0, 0)
  assert [f.name for f in docs.files] == sorted(paths + [os.path.realpath(tmp_path / "b" / "doc_000.txt")])
  assert [f.name for f in text_files_documents(f"{tmp_path}/**/*.txt", 0, 2).files] == [f.name for f in docs.files][:2]


def test_prepared_dataset_is_keyed_on_the_files(tmp_path):
  paths = write_docs(tmp_path / "d", ["first version", "other"])
  cfg = make_cfg(tmp_path / "tfds", dataset="text_files", path=str(tmp_path / "d"), validation_percent=0)
  name = text_files_documents(cfg.path, 0, 0).config_name
  assert text_files_documents(cfg.path, 0, 0).config_name == name
  assert text_files_documents(cfg.path, 5, 0).config_name != name
  assert text_files_documents(paths[0], 0, 0).config_name != name
  data.prepare(cfg)
  assert bytes(sources.open_split(cfg, "train", "train_split")[0]) == b"first version"
  with open(paths[0], "w") as f:
    f.write("second version, longer")
  assert text_files_documents(cfg.path, 0, 0).config_name != name
  data.prepare(cfg)
  assert bytes(sources.open_split(cfg, "train", "train_split")[0]) == b"second version, longer"
  assert len(os.listdir(tmp_path / "tfds" / "megalodon_text_files")) >= 2  # the old copy was not reused


def test_stdlib_listing_sorted_prefix_and_excludes_site_packages():
  root = os.path.realpath(sysconfig.get_paths()["stdlib"])
  want = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__")]
    want += [os.path.relpath(os.path.join(folder, f), root).replace(os.sep, "/") for f in files if f.endswith(".py")]
  want.sort()
  full = stdlib_documents(5, 0)
  assert [f.name for f in full.files] == want and len(want) > 100
  assert [f.name for f in stdlib_documents(5, 25).files] == want[:25]
  assert not any("site-packages" in f.path or "dist-packages" in f.path for f in full.files)


def test_stdlib_records_are_the_files_in_order(stdlib_cfg):
  docs = stdlib_documents(20, 60)
  for split in ("train", "validation"):
    want = [f for f in docs.files if held_out(f.name, 20) == (split == "validation")]
    src = sources.open_split(stdlib_cfg, split, "eval_split")
    assert len(src) == len(want) > 0
    for i, f in enumerate(want):
      with open(f.path, "rb") as fh:
        assert src[i] == fh.read().decode("utf-8", errors="replace").encode("utf-8")


def test_check_data_config_prepares_nothing(tmp_path):
  cfg = make_cfg(tmp_path / "tfds", max_documents=5)
  data.check_data_config(cfg)
  assert not os.path.exists(tmp_path / "tfds")
  with pytest.raises(data.DataError, match="not prepared"):
    data.make_train_iterator(cfg, seq_len=8, batch_size=2, seed=0)


def test_concurrent_prepare_is_safe(tmp_path):
  cfg = make_cfg(tmp_path / "tfds", max_documents=30)
  errors = []

  def run():
    try:
      data.prepare(cfg)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=run) for _ in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors
  assert len(sources.open_split(cfg, "train", "train_split")) + len(
      sources.open_split(cfg, "validation", "eval_split")) == 30


# ---------------- training stream: order, packing, sharding, state ----------------


def test_document_order_epochs_and_row_documents():
  n, batch = 23, 4
  order = document_order(n, 3 * n, seed=SEED)
  epochs = order.reshape(3, n)
  for e in epochs:
    assert sorted(e) == list(range(n))  # each epoch is a permutation of the documents
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch
  for row in range(batch):  # row r reads positions r, r + B, ... of the one global sequence
    np.testing.assert_array_equal(row_documents(n, 12, seed=SEED, batch_size=batch, row=row), order[row::batch][:12])
  assert not np.array_equal(document_order(n, n, seed=1), document_order(n, n, seed=2))


def test_train_batches_equal_numpy_packing_across_epochs(small_corpus):
  cfg, docs, _ = small_corpus
  seq_len, batch, count = 7, 3, 40  # about 4 epochs of this corpus
  it = data.make_train_iterator(cfg, seq_len=seq_len, batch_size=batch, seed=SEED)
  got = [next(it) for _ in range(count)]
  order = document_order(len(docs), 20 * len(docs), seed=SEED)
  assert_batches_equal(got, row_reference_batches(docs, order, seq_len, batch, count))


def test_iterator_state_resumes_bitwise_across_epochs(small_corpus):
  cfg, _, _ = small_corpus
  kw = dict(seq_len=7, batch_size=3, seed=SEED)
  it = data.make_train_iterator(cfg, **kw)
  states, batches = [], []
  for _ in range(45):
    states.append(it.get_state())
    batches.append(next(it))
  for step in (0, 1, 5, 11, 12, 23, 30):  # the corpus is about 11 batches per epoch
    state = json.loads(json.dumps(states[step]))
    resumed = data.make_train_iterator(cfg, **kw)
    resumed.set_state(state)
    assert_batches_equal([next(resumed) for _ in range(45 - step)], batches[step:])
  # Each row's position is in documents and tokens, so a changed seq_len resumes every row at the same token.
  short = data.make_train_iterator(cfg, seq_len=3, batch_size=3, seed=SEED)
  short.set_state(states[5])
  np.testing.assert_array_equal(next(short)["inputs"], batches[5]["inputs"][:, :3])


def test_set_state_rejects_other_data(small_corpus):
  cfg, _, _ = small_corpus
  state = data.make_train_iterator(cfg, seq_len=7, batch_size=2, seed=SEED).get_state()
  other = data.make_train_iterator(cfg, seq_len=7, batch_size=2, seed=SEED + 1)
  with pytest.raises(data.DataError, match="seed"):
    other.set_state(state)
  with pytest.raises(data.DataError, match="batch_size: saved 2, now 4"):
    data.make_train_iterator(cfg, seq_len=7, batch_size=4, seed=SEED).set_state(state)
  proc1 = data.make_train_iterator(cfg, seq_len=7, batch_size=2, seed=SEED, process_index=1, process_count=2)
  proc0_state = data.make_train_iterator(cfg, seq_len=7, batch_size=2, seed=SEED, process_count=2).get_state()
  with pytest.raises(data.DataError, match=r"holds batch rows \[0, 1\), this process needs rows \[1, 2\)"):
    proc1.set_state(proc0_state)
  with pytest.raises(data.DataError, match="not a data iterator state"):
    other.set_state({"next_index": 3})


def test_sentencepiece_packing_appends_eos(tmp_path, small_corpus):
  _, _, paths = small_corpus
  prefix = tmp_path / "sp"
  texts = [open(p, encoding="utf-8").read() for p in paths]
  spm.SentencePieceTrainer.train(sentence_iterator=iter([t for t in texts if t] * 5), model_prefix=str(prefix),
                                 vocab_size=40, hard_vocab_limit=False, minloglevel=2)
  ref = spm.SentencePieceProcessor(model_file=str(prefix) + ".model")
  for add_eos in (True, False):
    cfg = make_cfg(tmp_path / "tfds", dataset="text_files", path=",".join(paths), validation_percent=0,
                   tokenizer="sentencepiece", tokenizer_path=str(prefix) + ".model", add_eos=add_eos)
    data.prepare(cfg)
    docs = [np.asarray(ref.encode(t) + ([ref.eos_id()] if add_eos else []), np.int32) for t in texts]
    it = data.make_train_iterator(cfg, seq_len=6, batch_size=2, seed=SEED)
    got = [next(it) for _ in range(8)]
    order = document_order(len(docs), 100, seed=SEED)
    assert_batches_equal(got, row_reference_batches(docs, order, 6, 2, 8))
    assert add_eos == any((b["inputs"] == ref.eos_id()).any() for b in got)


# ---------------- evaluation batches ----------------


def test_eval_batches_in_order_deterministic_and_process_split(small_corpus):
  cfg, docs, _ = small_corpus
  kw = dict(seq_len=4, batch_size=4, split="train")
  got = data.make_eval_batches(cfg, num_batches=3, **kw)
  assert_batches_equal(got, reference_batches(docs, range(len(docs)), 4, 4, 3))
  assert_batches_equal(data.make_eval_batches(cfg, num_batches=3, **kw), got)
  halves = [data.make_eval_batches(cfg, num_batches=3, process_index=p, process_count=2, **kw) for p in range(2)]
  for b, lo, hi in zip(got, halves[0], halves[1]):
    np.testing.assert_array_equal(np.concatenate([lo["inputs"], hi["inputs"]]), b["inputs"])
  total = sum(d.size for d in docs)
  few = data.make_eval_batches(cfg, num_batches=1000, **kw)  # the split is short: as many full batches as fit
  assert len(few) == total // (4 * 5)


def test_eval_split_too_short_names_key_and_counts(tmp_path):
  paths = write_docs(tmp_path / "d", [f"document number {i}" for i in range(40)])
  cfg = make_cfg(tmp_path / "tfds", dataset="text_files", path=str(tmp_path / "d"), validation_percent=30)
  data.prepare(cfg)
  tokens = sum(os.path.getsize(p) for p in paths if held_out(p, 30))
  with pytest.raises(data.DataError, match=rf"data.eval_split='validation' has {tokens} tokens.*needs: 8008"):
    data.make_eval_batches(cfg, seq_len=1000, batch_size=8, num_batches=2)
  assert len(data.make_eval_batches(cfg, seq_len=4, batch_size=2, num_batches=2)) == 2


def test_empty_validation_split_says_so(tmp_path):
  write_docs(tmp_path / "d", ["a", "b"])
  cfg = make_cfg(tmp_path / "tfds", dataset="text_files", path=str(tmp_path / "d"), validation_percent=0)
  data.prepare(cfg)
  with pytest.raises(data.DataError, match="data.eval_split='validation' has no documents.*validation_percent=0"):
    data.make_eval_batches(cfg, seq_len=4, batch_size=1, num_batches=1)


def test_stdlib_trains_and_evaluates(stdlib_cfg):
  it = data.make_train_iterator(stdlib_cfg, seq_len=64, batch_size=4, seed=0)
  b = next(it)
  assert b["inputs"].shape == (4, 64) and b["inputs"].dtype == np.int32
  np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  ev = data.make_eval_batches(stdlib_cfg, seq_len=64, batch_size=4, num_batches=2)
  assert len(ev) == 2 and ev[0]["targets"].shape == (4, 64)


# ---------------- enwik8 ----------------


def test_enwik8_split_and_records_pure():
  raw = bytes(range(100))
  sizes = {"train": 90, "validation": 5, "test": 5}
  s = enwik8.split_enwik8(raw, sizes)
  assert [bytes(s[k]) for k in sizes] == [raw[:90], raw[90:95], raw[95:]]
  recs = enwik8.to_records(s["train"], 32)
  assert [len(r) for r in recs] == [32, 32, 26] and b"".join(recs) == raw[:90]
  with pytest.raises(data.DataError, match="data.manual_dir.*99 bytes, expected exactly 100"):
    enwik8.split_enwik8(raw[:99], sizes)


def test_enwik8_full_size_prepare_and_read(tmp_path):
  raw = np.tile(np.arange(251, dtype=np.uint8), 100_000_000 // 251 + 1)[:100_000_000].tobytes()  # order-sensitive
  (tmp_path / "m").mkdir()
  (tmp_path / "m" / "enwik8").write_bytes(raw)
  cfg = make_cfg(tmp_path / "tfds", dataset="enwik8", manual_dir=str(tmp_path / "m"))
  data.prepare(cfg)
  bounds = {"train": (0, 90_000_000), "validation": (90_000_000, 95_000_000), "test": (95_000_000, 100_000_000)}
  for split, (lo, hi) in bounds.items():
    src = sources.open_split(cfg, split, "eval_split")
    assert len(src) == -(-(hi - lo) // enwik8.RECORD_BYTES)
    assert b"".join(src[i] for i in range(len(src))) == raw[lo:hi]
  ev = data.make_eval_batches(cfg, seq_len=1000, batch_size=2, num_batches=1)
  np.testing.assert_array_equal(ev[0]["inputs"].reshape(-1)[:1000], np.frombuffer(raw[90_000_000:90_001_000], np.uint8))
  b = next(data.make_train_iterator(cfg, seq_len=100, batch_size=2, seed=0))
  assert b["inputs"].shape == (2, 100)
  os.remove(tmp_path / "m" / "enwik8")
  data.check_data_config(cfg)  # prepared: the raw file is no longer needed
  data.prepare(cfg)


@pytest.fixture
def small_enwik8(monkeypatch):
  monkeypatch.setattr(enwik8, "_split_bytes", {"train": 9000, "validation": 500, "test": 500})
  monkeypatch.setattr(enwik8, "_record_bytes", 1000)
  monkeypatch.setattr(enwik8, "_url", "file:///nonexistent/megalodon-test/enwik8.zip")
  return bytes(random.Random(0).randrange(256) for _ in range(10_000))


def test_enwik8_from_zip_scaled_down(tmp_path, small_enwik8):
  raw = small_enwik8
  (tmp_path / "m").mkdir()
  with zipfile.ZipFile(tmp_path / "m" / "enwik8.zip", "w") as zf:
    zf.writestr("enwik8", raw)
  cfg = make_cfg(tmp_path / "tfds", dataset="enwik8", manual_dir=str(tmp_path / "m"), eval_split="test")
  data.prepare(cfg)
  test = sources.open_split(cfg, "test", "eval_split")
  assert b"".join(test[i] for i in range(len(test))) == raw[9500:]
  train = sources.open_split(cfg, "train", "train_split")
  assert len(train) == 9 and b"".join(train[i] for i in range(9)) == raw[:9000]


def test_enwik8_errors(tmp_path, small_enwik8):
  (tmp_path / "m").mkdir()
  cfg = make_cfg(tmp_path / "tfds", dataset="enwik8", manual_dir=str(tmp_path / "m"))
  data.check_data_config(cfg)  # absent file: prepare will try to download it
  with pytest.raises(data.DataError, match=r"data.manual_dir=.*no enwik8 or enwik8.zip.*put enwik8.zip"):
    data.prepare(cfg)
  (tmp_path / "m" / "enwik8").write_bytes(small_enwik8[:-1])
  with pytest.raises(data.DataError, match="data.manual_dir.*9,999 bytes.*expected exactly 10,000"):
    data.check_data_config(cfg)
  with pytest.raises(data.DataError, match="data.manual_dir is empty"):
    data.check_data_config(make_cfg(tmp_path / "tfds", dataset="enwik8"))
  with pytest.raises(data.DataError, match="data.tokenizer='sentencepiece'.*bytes"):
    data.check_data_config(make_cfg(tmp_path / "tfds", dataset="enwik8", manual_dir=str(tmp_path / "m"),
                                    tokenizer="sentencepiece", tokenizer_path=str(tmp_path / "m" / "enwik8")))


# ---------------- tfds by name ----------------


def test_tfds_by_name_reads_a_prepared_dataset(small_corpus):
  cfg, _, _ = small_corpus
  config_name = text_files_documents(cfg.path, 0, 0).config_name
  by_name = make_cfg(cfg.data_dir, dataset="tfds", name=f"megalodon_text_files/{config_name}", eval_split="train")
  data.check_data_config(by_name)
  data.prepare(by_name)  # nothing to do
  kw = dict(seq_len=7, batch_size=3, seed=SEED)
  a, b = data.make_train_iterator(cfg, **kw), data.make_train_iterator(by_name, **kw)
  assert_batches_equal([next(b) for _ in range(15)], [next(a) for _ in range(15)])
  assert_batches_equal(data.make_eval_batches(by_name, seq_len=4, batch_size=2, num_batches=2, split="train"),
                       data.make_eval_batches(cfg, seq_len=4, batch_size=2, num_batches=2, split="train"))


def test_tfds_errors(small_corpus):
  cfg, _, _ = small_corpus
  config_name = text_files_documents(cfg.path, 0, 0).config_name
  with pytest.raises(data.DataError, match=r"data.name='pg19': no prepared TFDS dataset.*array_record"):
    data.check_data_config(make_cfg(cfg.data_dir, dataset="tfds", name="pg19"))
  with pytest.raises(data.DataError, match=rf"data.name='megalodon_text_files'.*\['{config_name}'"):
    data.check_data_config(make_cfg(cfg.data_dir, dataset="tfds", name="megalodon_text_files"))
  with pytest.raises(data.DataError, match="data.name is empty"):
    data.check_data_config(make_cfg(cfg.data_dir, dataset="tfds"))
  named = dict(dataset="tfds", name=f"megalodon_text_files/{config_name}", eval_split="train")
  with pytest.raises(data.DataError, match="data.text_key='body'.*'text'"):
    data.check_data_config(make_cfg(cfg.data_dir, text_key="body", **named))
  with pytest.raises(data.DataError, match="data.eval_split='test'.*no such split"):
    data.check_data_config(make_cfg(cfg.data_dir, **{**named, "eval_split": "test"}))


# ---------------- config errors name their key ----------------


@pytest.mark.parametrize("kw, match", [
    (dict(dataset="c4"), "data.dataset='c4' is unknown"),
    (dict(dataset="text_files"), "data.path is empty"),
    (dict(dataset="text_files", path="/no/such/dir/*.txt"), r"data.path: '/no/such/dir/\*.txt' matches no file"),
    (dict(tokenizer="bpe"), "data.tokenizer='bpe' is unknown"),
    (dict(tokenizer="sentencepiece", tokenizer_path="/no/tok.model"), "data.tokenizer_path='/no/tok.model'"),
    (dict(eval_split="test"), "data.eval_split='test'.*no such split.*'validation'"),
    (dict(train_split="training"), "data.train_split='training'"),
    (dict(validation_percent=100, max_documents=10), "data.train_split='train' has no documents.*validation_percent"),
    (dict(validation_percent=150), "data.validation_percent=150"),
    (dict(max_documents=-1), "data.max_documents=-1"),
    (dict(worker_count=2), "data.worker_count=2"),
])
def test_config_errors_name_the_key(tmp_path, kw, match):
  with pytest.raises(data.DataError, match=match):
    data.check_data_config(make_cfg(tmp_path, **kw))


def test_call_argument_errors(small_corpus):
  cfg, _, _ = small_corpus
  with pytest.raises(data.DataError, match="seq_len=0"):
    data.make_train_iterator(cfg, seq_len=0, batch_size=2, seed=0)
  with pytest.raises(data.DataError, match="batch_size=6 is not divisible by the process count 4"):
    data.make_train_iterator(cfg, seq_len=4, batch_size=6, seed=0, process_count=4)
  with pytest.raises(data.DataError, match="split='test'"):
    data.make_eval_batches(cfg, seq_len=4, batch_size=2, num_batches=1, split="test")
  with pytest.raises(data.DataError, match=r"process_index=2 is not in \[0, process_count=2\)"):
    data.make_train_iterator(cfg, seq_len=4, batch_size=4, seed=0, process_index=2, process_count=2)
