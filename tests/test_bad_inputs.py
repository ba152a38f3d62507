"""Bad input is refused with one `error:` line and exit status 2 before anything expensive (issue 20): a prompt
that is not UTF-8, a binary file named as a text corpus, a SentencePiece path with the byte tokenizer.

Each case of the issue runs the exact command as a subprocess (`cli_harness`); the thresholds and smaller
variations run in-process.
"""

from __future__ import annotations

import json
import os
import random
import types

import pytest
from flax import nnx

from cli_harness import module_command, run_cli, train_command, tree_digest
from megalodon_jax import data
from megalodon_jax.checkpoints.model_io import save_params_checkpoint
from megalodon_jax.cli import generate
from megalodon_jax.config import MegalodonConfig
from megalodon_jax.data import jsonl, text_files
from megalodon_jax.errors import ConfigError, DataError
from megalodon_jax.model import MegalodonLM

CFG = MegalodonConfig(num_layers=1, model_dim=32, z_dim=16, value_dim=32, ffn_hidden_dim=64, chunk_size=8,
                      vocab_size=256, norm_num_groups=4, cema_ndim=4, dtype="float32")
TEXT = "Plain English text, with a few accents: café, naïve, Zürich.\n"


@pytest.fixture(scope="module")
def params_checkpoint(tmp_path_factory) -> str:
  """A params-only checkpoint of an untrained byte-level model (what from-pytorch writes)."""
  out = str(tmp_path_factory.mktemp("ckpt") / "params")
  save_params_checkpoint(out, MegalodonLM(CFG, rngs=nnx.Rngs(0)))
  return out


def refused(cmd: list[str], root: str) -> str:
  """Runs `cmd`: exit status 2, exactly one stderr line (the `error:` line), nothing under `root` changed."""
  before = tree_digest(root)
  result = run_cli(cmd)
  assert result.returncode == 2, result.stderr[-3000:]
  line = result.one_error_line()
  assert "Traceback" not in result.stderr
  assert tree_digest(root) == before
  return line


# ---------------------------------------------------------------- prompts that are not UTF-8


def test_generate_refuses_a_prompt_that_is_not_utf8(params_checkpoint, tmp_path):
  output = tmp_path / "out.jsonl"
  prompt = os.fsdecode(b"ok \xff\xfe")  # what Python makes of these argv bytes: surrogate escapes
  line = refused(module_command("generate", "--checkpoint", params_checkpoint, "--prompt", prompt,
                                "--output_jsonl", str(output)), str(tmp_path))
  assert line == ("error: --prompt #1: byte 3 (0xff) is not valid UTF-8; prompts are UTF-8 text (pass token ids "
                  "with --prompt_ids instead)"), line
  assert not output.exists()


def test_prompt_files_that_are_not_utf8_are_refused_before_loading(tmp_path, capsys):
  bad = tmp_path / "latin1.txt"
  bad.write_bytes("déjà vu".encode("latin-1"))
  missing = str(tmp_path / "no_checkpoint")  # never read: the prompts fail first
  for flag in ("--prompt_file", "--prompt_lines"):
    assert generate.main(["--checkpoint", missing, flag, str(bad)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {flag} {bad}: byte 1 (0xe9) is not valid UTF-8; prompts are UTF-8 text (pass token ids " \
                  f"with --prompt_ids instead)\n", err
  # a valid multi-byte prompt reaches the checkpoint (and fails there): the check counts bytes, not characters
  assert generate.main(["--checkpoint", missing, "--prompt", "Zürich"]) == 2
  assert "does not exist" in capsys.readouterr().err


def test_byte_tokenizer_with_a_tokenizer_path_is_refused_by_generate(params_checkpoint, tmp_path, capsys):
  model = tmp_path / "sp.model"
  model.write_bytes(b"not read")
  assert generate.main(["--checkpoint", params_checkpoint, "--tokenizer", "bytes", "--tokenizer_path", str(model),
                        "--prompt", "hi"]) == 2
  assert "--tokenizer_path" in capsys.readouterr().err


# ---------------------------------------------------------------- text corpora that are not text


def _train(tmp_path, *overrides: str) -> list[str]:
  return train_command("--config", "tiny", "--workdir", str(tmp_path / "work"),
                       f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.total_steps=2",
                       "--config.optimizer.warmup_steps=1", *overrides)


@pytest.mark.parametrize("kind", ["nul_bytes", "random_bytes"])
def test_train_refuses_a_binary_text_file_before_compiling(tmp_path, kind):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  (corpus / "notes.txt").write_text(TEXT * 20)
  rng = random.Random(0)
  if kind == "nul_bytes":  # an executable's shape: text around NUL-padded headers
    blob = b"\x7fELF\x02\x01\x01\x00\x00\x00" + TEXT.encode() * 20
  else:
    blob = bytes(rng.randrange(1, 256) for _ in range(20_000))  # no NUL: the UTF-8 check has to catch it
  (corpus / "blob.bin").write_bytes(blob)
  line = refused(_train(tmp_path, "--config.data.dataset=text_files", f"--config.data.path={corpus}"), str(tmp_path))
  assert f"data.path: {os.path.realpath(corpus / 'blob.bin')} is not a text file" in line, line
  assert ("NUL bytes (the first at byte 7)" if kind == "nul_bytes" else "invalid UTF-8 sequences") in line, line
  assert not (tmp_path / "work").exists() and not (tmp_path / "tfds").exists()


def test_train_refuses_a_tokenizer_path_with_the_byte_tokenizer(tmp_path):
  model = tmp_path / "tokenizer.model"
  model.write_bytes(b"a SentencePiece model, never read")
  line = refused(_train(tmp_path, f"--config.data.tokenizer_path={model}"), str(tmp_path))
  assert "data.tokenizer_path=" in line and "data.tokenizer='bytes'" in line, line
  assert not (tmp_path / "work").exists()


def _text_files_config(tmp_path, path: str) -> types.SimpleNamespace:
  return types.SimpleNamespace(dataset="text_files", path=path, data_dir=str(tmp_path / "tfds"),
                               validation_percent=5, max_documents=0, tokenizer="bytes", tokenizer_path="")


def test_a_corpus_with_a_few_stray_bytes_passes_the_check(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(3):
    (corpus / f"doc{i}.txt").write_text(TEXT * 50)
  stray = bytearray((TEXT * 50).encode())
  stray[10], stray[500] = 0xFF, 0xE9  # 2 invalid bytes in ~3,300: below 1 per 100
  (corpus / "doc3.txt").write_bytes(bytes(stray))
  data.check_data_config(_text_files_config(tmp_path, str(corpus)))
  # the same file with more than 1 invalid sequence per 100 bytes is refused
  many = bytes(b if i % 50 else 0xFF for i, b in enumerate(stray))
  (corpus / "doc3.txt").write_bytes(many)
  with pytest.raises(DataError, match=r"doc3\.txt is not a text file: \d+ invalid UTF-8 sequences"):
    data.check_data_config(_text_files_config(tmp_path, str(corpus)))


def test_text_problem_threshold_and_cut_characters():
  body = b"a" * 1000
  assert text_files.text_problem(b"\xff" * 10 + body[10:]) is None  # 10 in 1,000: exactly the limit
  assert "11 invalid UTF-8 sequences" in text_files.text_problem(b"\xff" * 11 + body[11:])
  assert "NUL bytes (the first at byte 3)" in text_files.text_problem(b"abc\x00def")
  cut = "é".encode()[:1]
  assert text_files.text_problem(body + cut, complete=False) is None  # a head may end inside a character
  assert text_files.text_problem(b"ab" + cut) is not None  # a whole file may not
  assert text_files.text_problem(b"") is None and text_files.text_problem("ok \ufffd".encode() * 50) is None


def test_tokenizer_path_with_bytes_is_a_config_error_in_the_data_check(tmp_path):
  cfg = _text_files_config(tmp_path, str(tmp_path))
  cfg.tokenizer_path = "x.model"
  with pytest.raises(ConfigError, match=r"data\.tokenizer_path='x\.model' .* data\.tokenizer='bytes'"):
    data.check_data_config(cfg)


def test_jsonl_text_fields_must_be_text(tmp_path):
  path = tmp_path / "c.jsonl"
  for record, words in (({"text": "a\x00b"}, "NUL character at index 1"),
                        ({"text": "a\ud800"}, "lone surrogate")):
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps(record) + "\n")
    f = text_files.DocFile(str(path), str(path), path.stat().st_size, 0)
    with pytest.raises(DataError, match=f"c.jsonl:2: field 'text' holds a {words}"):
      list(jsonl._records(f, "text"))  # pylint: disable=protected-access
