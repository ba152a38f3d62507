"""Tokenizers: byte and SentencePiece round trips, ids and EOS, config errors naming their key."""

import pickle

import ml_collections
import numpy as np
import pytest
import sentencepiece as spm

from megalodon_jax.data import ByteTokenizer, DataError, SentencePieceTokenizer, make_tokenizer

TEXTS = ["plain ascii", "Grüße, naïve café — 東京 🐍", ""]


def _cfg(**kw):
  c = ml_collections.ConfigDict(dict(tokenizer="bytes", tokenizer_path=""))
  c.update(kw)
  return c


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
  """A tiny SentencePiece model trained on the fly (vocab 64, default </s> = 2)."""
  prefix = tmp_path_factory.mktemp("sp") / "tiny"
  lines = [f"the quick brown fox {i} jumps over the lazy dog number {i * 7}" for i in range(300)]
  lines.append("Grüße, naïve café")
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=64,
                                 model_type="unigram", character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
  return str(prefix) + ".model"


@pytest.mark.parametrize("text", TEXTS)
def test_bytes_round_trip_and_ids(text):
  tok = make_tokenizer(_cfg())
  assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 256 and tok.eos_id is None
  ids = tok.encode(text)
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, list(text.encode("utf-8")))
  np.testing.assert_array_equal(tok.encode_bytes(text.encode("utf-8")), ids)
  assert tok.decode(ids) == text
  assert tok.decode(list(ids)) == text


def test_bytes_decode_invalid_utf8_is_replaced_and_range_checked():
  tok = ByteTokenizer()
  cut = np.asarray(list("é".encode("utf-8"))[:1] + [ord("a")], np.int32)  # a lone lead byte
  assert tok.decode(cut) == "\ufffda"
  with pytest.raises(ValueError, match="255"):
    tok.decode([300])


def test_sentencepiece_round_trip_vocab_eos(sp_model):
  tok = make_tokenizer(_cfg(tokenizer="sentencepiece", tokenizer_path=sp_model))
  ref = spm.SentencePieceProcessor(model_file=sp_model)
  assert isinstance(tok, SentencePieceTokenizer)
  assert tok.vocab_size == ref.vocab_size() == 64
  assert tok.eos_id == ref.eos_id() == 2
  text = "the lazy fox 42 jumps over the dog"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.ndim == 1
  np.testing.assert_array_equal(ids, ref.encode(text))
  assert tok.decode(ids) == text
  assert tok.decode(np.asarray(ids, np.int64)) == text
  np.testing.assert_array_equal(tok.encode_bytes(text.encode("utf-8")), ids)
  # Invalid UTF-8 is replaced before encoding (U+FFFD), never an exception.
  assert tok.encode_bytes(b"fox \xff dog").size > 0
  # The pipeline may pickle tokenizers; the copy must encode identically.
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(tok)).encode(text), ids)


def test_sentencepiece_without_eos(tmp_path):
  prefix = tmp_path / "noeos"
  lines = [f"alpha beta gamma {i}" for i in range(100)]
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=30,
                                 eos_id=-1, hard_vocab_limit=False, minloglevel=2)
  tok = SentencePieceTokenizer(str(prefix) + ".model")
  assert tok.eos_id is None


@pytest.mark.parametrize("kw, key", [
    (dict(tokenizer="wordpiece"), "data.tokenizer="),
    (dict(tokenizer="sentencepiece"), "data.tokenizer_path is empty"),
    (dict(tokenizer="sentencepiece", tokenizer_path="/no/such/tokenizer.model"), "data.tokenizer_path="),
])
def test_config_errors_name_the_key(kw, key):
  with pytest.raises(DataError, match=key):
    make_tokenizer(_cfg(**kw))


def test_not_a_model_file(tmp_path):
  bad = tmp_path / "bad.model"
  bad.write_text("not a model")
  with pytest.raises(DataError, match="data.tokenizer_path=.*not a SentencePiece model"):
    make_tokenizer(_cfg(tokenizer="sentencepiece", tokenizer_path=str(bad)))
