"""Portable SentencePiece tokenizers: the model file is copied into the run directory, every checkpoint and every
export, and generation from a moved run (the original file gone) and from exports uses that copy."""

import importlib
import json
import os
import shutil

import jax
import pytest
import sentencepiece as spm

from megalodon_jax.checkpoints import tokenizer_copy
from megalodon_jax.cli import convert as convert_cli
from megalodon_jax.cli import evaluate as evaluate_cli
from megalodon_jax.cli import generate as generate_cli
from megalodon_jax.cli import train as train_cli
from megalodon_jax.errors import CheckpointError, ConfigError
from megalodon_jax.inference.loading import load_model
from megalodon_jax.training import trainer

TEXT = "def main(argv):\n    return parse(argv)"


def _train_sp(prefix, lines, vocab):
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=vocab,
                                 model_type="unigram", character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
  return str(prefix) + ".model"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 2-step tiny run with a SentencePiece tokenizer trained here; returns (workdir, model path, reference ids)."""
  root = tmp_path_factory.mktemp("sp_run")
  lines = [f"def f{i}(x):\n    return x * {i} + parse(argv)" for i in range(400)]
  sp_path = _train_sp(root / "sp", lines, 96)
  cfg = importlib.import_module("megalodon_jax.configs.tiny").get_config()
  cfg.update_from_flattened_dict({
      "data.tokenizer": "sentencepiece", "data.tokenizer_path": sp_path, "data.data_dir": str(root / "tfds"),
      "data.max_documents": 30, "model.num_layers": 1, "model.chunk_size": 16, "seq_len": 32, "batch_size": 2,
      "total_steps": 2, "optimizer.warmup_steps": 1, "eval_every": 0, "num_samples": 0, "checkpoint_every": 2,
      "tensorboard": False, "progress_bar": "off", "async_checkpointing": False, "log_every": 1})
  workdir = str(root / "run")
  trainer.train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])
  ref = spm.SentencePieceProcessor(model_file=sp_path).encode(TEXT)
  return workdir, sp_path, ref, cfg


def test_run_directory_and_checkpoints_carry_the_model(run, tmp_path):
  workdir, sp_path, ref, _ = run
  with open(sp_path, "rb") as f:
    original = f.read()
  copy = tokenizer_copy.read_copy(workdir)
  assert copy is not None and spm.SentencePieceProcessor(model_proto=copy).encode(TEXT) == ref
  assert spm.SentencePieceProcessor(model_proto=original).serialized_model_proto() == copy
  # Moved elsewhere, with the original file gone: generation uses the copy in the step's meta item.
  moved = str(tmp_path / "elsewhere")
  shutil.copytree(workdir, moved)
  os.remove(os.path.join(moved, tokenizer_copy.TOKENIZER_FILE))  # the meta item alone must suffice
  hidden = sp_path + ".hidden"
  os.rename(sp_path, hidden)
  try:
    loaded = load_model(moved)
    assert loaded.tokenizer.encode(TEXT).tolist() == ref
    assert any("stored with the checkpoint" in n for n in loaded.notes)
    assert generate_cli.main(["--checkpoint", moved, "--prompt", TEXT, "--max_new_tokens", "3",
                              "--temperature", "0"]) == 0
    # evaluate tokenizes its documents with the same copy: the token count is the SentencePiece one.
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text(TEXT)
    out = tmp_path / "eval.json"
    assert evaluate_cli.main(["--checkpoint", moved, "--text_files", str(docs / "*.txt"), "--no_eos",
                              "--context_lengths", "16", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["tokens"] == len(ref) - 1
  finally:
    os.rename(hidden, sp_path)


def test_a_moved_run_resumes_training_with_its_copy(run, tmp_path, caplog):
  workdir, sp_path, _, cfg = run
  moved = str(tmp_path / "moved")
  shutil.copytree(workdir, moved)
  resumed = cfg.copy_and_resolve_references()
  resumed.total_steps = 3
  resumed.data.tokenizer_path = str(tmp_path / "gone" / "sp.model")  # the path of the machine the run came from
  with caplog.at_level("INFO", logger="megalodon_jax"):
    trainer.train_and_evaluate(resumed, moved, devices=jax.devices()[:1])
  assert "using the run directory's copy" in caplog.text and "resumed from" in caplog.text
  assert sorted(os.listdir(os.path.join(moved, "checkpoints"))) == ["2", "3"]
  assert tokenizer_copy.read_copy(moved) == tokenizer_copy.read_copy(workdir)
  assert resumed.data.tokenizer_path.endswith("gone/sp.model")  # the caller's config is left as it was
  # train.py's checks before jax starts read the same copy, so the command line resumes the moved run too.
  assert train_cli.check_run(resumed, moved).data.tokenizer_path == os.path.join(moved, "tokenizer.model")
  # Without a copy in the run directory the missing file is still an error, before anything is written.
  bare = str(tmp_path / "bare")
  with pytest.raises(ConfigError, match="does not exist"):
    trainer.train_and_evaluate(resumed, bare, devices=jax.devices()[:1])
  with pytest.raises(ConfigError, match="does not exist"):
    train_cli.check_run(resumed, bare)
  assert not os.path.exists(bare)


def test_exports_carry_the_model(run, tmp_path):
  workdir, _, ref, _ = run
  out = str(tmp_path / "torch")
  assert convert_cli.main(["to-pytorch", "--checkpoint", workdir, "--out", out]) == 0
  assert tokenizer_copy.read_copy(out) == tokenizer_copy.read_copy(workdir)
  assert load_model(out).tokenizer.encode(TEXT).tolist() == ref  # PyTorch files: the copy beside them
  back = str(tmp_path / "back")
  assert convert_cli.main(["from-pytorch", "--torch", out, "--out", back]) == 0
  assert tokenizer_copy.read_copy(back) == tokenizer_copy.read_copy(workdir)
  assert load_model(back).tokenizer.encode(TEXT).tolist() == ref
  # An explicit --tokenizer_path still wins over the stored copy.
  other = _train_sp(tmp_path / "other", [f"word{i} other text" for i in range(200)], 40)
  assert load_model(back, tokenizer_path=other).tokenizer.encode(TEXT).tolist() == \
      spm.SentencePieceProcessor(model_file=other).encode(TEXT)


def test_a_run_directory_of_another_tokenizer_is_refused(run, tmp_path):
  workdir, _, _, cfg = run
  target = str(tmp_path / "reuse")
  shutil.copytree(workdir, target)
  with open(os.path.join(target, tokenizer_copy.TOKENIZER_FILE), "wb") as f:
    f.write(b"not the same model")
  before = sorted(os.listdir(target))
  with pytest.raises(CheckpointError, match="another tokenizer model"):
    trainer.train_and_evaluate(cfg, target, devices=jax.devices()[:1])
  assert sorted(os.listdir(target)) == before


def test_damaged_stored_copy_is_reported():
  meta = tokenizer_copy.embed({"step": 1}, b"\x00model bytes")
  assert tokenizer_copy.embedded(meta, "m") == b"\x00model bytes"
  meta["tokenizer_model"]["sha256"] = "0" * 64
  with pytest.raises(CheckpointError, match="damaged"):
    tokenizer_copy.embedded(meta, "m")
  assert tokenizer_copy.embedded({"step": 1}, "m") is None
