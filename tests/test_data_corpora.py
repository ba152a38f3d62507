"""Real-corpus inputs: a single text file split by position, JSONL (plain, gzip, zstd) prepared to array_record.

References are written out independently in the tests: the documented cut rule over explicit line starts, and the
records the test itself wrote.
"""

import gzip
import importlib
import json
import logging
import os
import random
import zlib

import jax
import numpy as np
import pytest
import zstandard

from megalodon_jax.configs import default as default_config
from megalodon_jax import data
from megalodon_jax.data import sources
from megalodon_jax.data.jsonl import held_out_count
from megalodon_jax.data.text_files import line_cut, text_files_documents
from megalodon_jax.training import trainer
from megalodon_jax.training.metrics import read_metrics


def make_cfg(data_dir, **kw):
  c = default_config.get_config().data
  c.data_dir = str(data_dir)
  c.update(kw)
  return c


def plays(n_lines, seed=0):
  """A tinyshakespeare-like text: short speaker lines and verses, ASCII and a few multi-byte characters."""
  rng = random.Random(seed)
  words = ["thou", "art", "the", "king", "of", "naught", "my", "lord", "wherefore", "fair", "Verona", "café", "¿qué?"]
  out = []
  for i in range(n_lines):
    out.append(f"{rng.choice(['ROMEO', 'JULIET', 'LEAR'])}:" if i % 5 == 0 else
               " ".join(rng.choice(words) for _ in range(rng.randrange(1, 9))))
  return "\n".join(out) + "\n"


def reference_cut(data: bytes, percent: float) -> int:
  """The documented rule, over an explicit list of line starts."""
  size = len(data)
  if size < 2:
    return size
  nominal = min(max(size - round(size * percent / 100), 1), size - 1)
  starts = [i + 1 for i, b in enumerate(data) if b == ord("\n") and 1 <= i + 1 <= size - 1]
  after = [s for s in starts if s >= nominal]
  if after:
    return min(after)
  before = [s for s in starts if s < nominal]
  if before:
    return max(before)
  cut = nominal
  while cut > 1 and (data[cut] & 0xC0) == 0x80:
    cut -= 1
  return cut


# ---------------- one file: the position rule ----------------


def test_line_cut_matches_the_documented_rule():
  rng = random.Random(3)
  cases = [b"", b"a", b"ab", b"\n\n", b"abc\n", b"\nabc", "ééééé".encode(), b"x" * 50 + b"\n" + b"y" * 3]
  for _ in range(300):
    cases.append(bytes(rng.choice(b"ab\n\xc3\xa9") for _ in range(rng.randrange(0, 40))))
  for d in cases:
    for p in (1, 5, 10, 50, 99):
      cut = line_cut(d, p)
      assert cut == reference_cut(d, p), (d, p)
      if len(d) >= 2:
        assert 1 <= cut <= len(d) - 1  # both parts non-empty


def test_single_file_splits_by_position_at_a_line_boundary(tmp_path, caplog):
  text = plays(3000).encode()
  path = tmp_path / "input.txt"
  path.write_bytes(text)
  docs = text_files_documents(str(path), 5, 0)
  assert docs.rule == "position"
  cfg = make_cfg(tmp_path / "tfds", dataset="text_files", path=str(path), validation_percent=5)
  with caplog.at_level(logging.INFO, logger="megalodon_jax.data.sources"):
    data.prepare(cfg)
  assert "last 5% of each file's bytes" in caplog.text
  train = sources.open_split(cfg, "train", "train_split")
  val = sources.open_split(cfg, "validation", "eval_split")
  assert len(train) == len(val) == 1
  head, tail = train[0], val[0]
  assert head + tail == text  # nothing lost, nothing shared
  assert head.endswith(b"\n")  # validation starts at a line start
  assert abs(len(tail) - 0.05 * len(text)) < 200  # about 5%, moved to the next line start (lines < 80 bytes)


def test_many_files_keep_the_hash_rule(tmp_path):
  folder = tmp_path / "d"
  folder.mkdir()
  for i in range(60):
    (folder / f"{i:03d}.txt").write_text(f"document {i}\n")
  docs = text_files_documents(str(folder), 10, 0)
  assert docs.rule == "hash" and docs.split("train") and docs.split("validation")
  assert not any(f.part for f in docs.split("train") + docs.split("validation"))
  # Three files that the hash rule (written out: crc32 of the resolved path) would all keep for training at 5%:
  # every file is then cut in two instead.
  kept = [p for p in sorted(folder.iterdir())
          if zlib.crc32(os.path.realpath(p).encode()) % 10_000 >= 500][:3]
  few = text_files_documents(",".join(map(str, kept)), 5, 0)
  assert few.rule == "position" and [f.part for f in few.split("validation")] == ["tail"] * 3
  assert few.config_name != text_files_documents(",".join(map(str, kept)), 0, 0).config_name


def test_single_file_corpus_trains_and_evaluates_with_the_tiny_config(tmp_path):
  path = tmp_path / "input.txt"
  path.write_text(plays(6000, seed=1))
  cfg = importlib.import_module("megalodon_jax.configs.tiny").get_config()
  cfg.update_from_flattened_dict({
      "data.dataset": "text_files", "data.path": str(path), "data.data_dir": str(tmp_path / "tfds"),
      "model.num_layers": 1, "model.chunk_size": 32, "seq_len": 64, "batch_size": 8, "total_steps": 6,
      "optimizer.warmup_steps": 2, "log_every": 1, "eval_every": 3, "eval_batches": 2, "num_samples": 0,
      "checkpoint_every": 6, "tensorboard": False, "progress_bar": "off", "async_checkpointing": False})
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])
  records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
  assert set(evals) == {0, 3, 6} and all(np.isfinite(list(evals.values())))
  assert evals[6] < evals[0]


# ---------------- JSONL ----------------


def write_jsonl(path, records, compression):
  payload = "".join(json.dumps(r) + "\n" for r in records).encode()
  if compression == "gz":
    payload = gzip.compress(payload)
  elif compression == "zst":
    payload = zstandard.ZstdCompressor().compress(payload)
  path.write_bytes(payload)


@pytest.mark.parametrize("compression", ["plain", "gz", "zst"])
def test_jsonl_records_are_read_in_file_and_line_order(tmp_path, compression):
  suffix = {"plain": ".jsonl", "gz": ".jsonl.gz", "zst": ".jsonl.zst"}[compression]
  folder = tmp_path / "corpus"
  folder.mkdir()
  expected = []
  for f in range(3):
    texts = [f"file {f} record {i}: " + "é" * i for i in range(5 + f)]
    write_jsonl(folder / f"part{f}{suffix}", [{"id": i, "body": t} for i, t in enumerate(texts)], compression)
    expected += texts
  cfg = make_cfg(tmp_path / "tfds", dataset="jsonl", path=str(folder / f"*{suffix}"), text_key="body",
                 validation_percent=0)
  data.prepare(cfg)
  train = sources.open_split(cfg, "train", "train_split")
  assert [train[i].decode() for i in range(len(train))] == expected
  batches = data.make_eval_batches(cfg, split="train", seq_len=8, batch_size=2, num_batches=3)
  want = np.frombuffer("".join(expected).encode(), np.uint8)[:3 * 2 * 9].reshape(3, 2, 9)
  np.testing.assert_array_equal(np.stack([b["inputs"] for b in batches]), want[..., :-1])


def test_jsonl_single_file_holds_out_its_last_records(tmp_path):
  path = tmp_path / "one.jsonl"
  texts = [f"record {i}" for i in range(40)]
  write_jsonl(path, [{"text": t} for t in texts], "plain")
  cfg = make_cfg(tmp_path / "tfds", dataset="jsonl", path=str(path), validation_percent=10)
  data.prepare(cfg)
  train = sources.open_split(cfg, "train", "train_split")
  val = sources.open_split(cfg, "validation", "eval_split")
  assert [val[i].decode() for i in range(len(val))] == texts[-4:]
  assert [train[i].decode() for i in range(len(train))] == texts[:-4]
  assert [held_out_count(n, 10) for n in (0, 1, 2, 9, 40)] == [0, 0, 1, 1, 4]


def test_jsonl_many_files_split_by_path_hash(tmp_path):
  folder = tmp_path / "corpus"
  folder.mkdir()
  for f in range(40):
    write_jsonl(folder / f"{f:02d}.jsonl", [{"text": f"f{f} r{i}"} for i in range(3)], "plain")
  # The documented hash rule, written out: crc32 of the resolved path, mod 10000, below percent * 100.
  held = {f for f in range(40) if zlib.crc32(os.path.realpath(folder / f"{f:02d}.jsonl").encode()) % 10_000 < 2000}
  assert 0 < len(held) < 40
  cfg = make_cfg(tmp_path / "tfds", dataset="jsonl", path=str(folder), validation_percent=20)
  data.prepare(cfg)
  val = sources.open_split(cfg, "validation", "eval_split")
  assert [val[i].decode() for i in range(len(val))] == [f"f{f} r{i}" for f in sorted(held) for i in range(3)]


@pytest.mark.parametrize("line,message", [
    ('{"text": "ok"}\n{"text": "fine"}\n{"text": broken}\n', r"bad\.jsonl:3: not a JSON object"),
    ('{"text": "ok"}\n\n[1, 2]\n', r"bad\.jsonl:3: a JSON list, not an object"),
    ('{"text": "ok"}\n{"body": "x"}\n', r"bad\.jsonl:2: no field data.text_key='text'; the record has \['body'\]"),
    ('{"text": 5}\n', r"bad\.jsonl:1: field 'text' holds a int, not a string"),
])
def test_malformed_jsonl_names_file_and_line_before_training(tmp_path, line, message):
  (tmp_path / "bad.jsonl").write_text(line)
  cfg = make_cfg(tmp_path / "tfds", dataset="jsonl", path=str(tmp_path / "bad.jsonl"), validation_percent=0)
  with pytest.raises(data.DataError, match=message):
    data.prepare(cfg)


def test_truncated_compressed_jsonl_is_a_data_error(tmp_path):
  path = tmp_path / "cut.jsonl.gz"
  path.write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:60])
  cfg = make_cfg(tmp_path / "tfds", dataset="jsonl", path=str(path), validation_percent=0)
  with pytest.raises(data.DataError, match=r"cut\.jsonl\.gz: cannot be read"):
    data.prepare(cfg)
