"""Long-context evaluation (inference/evaluation.py, long_context.py) and the `megalodon_jax.evaluate` CLI.

References: float64 NLL from one full forward (no cache) per row or block; the official evaluation driver
(`megalodon/inference.py`, docs/streaming.md#evaluation) transcribed step by step with explicit cache surgery,
fed one token per call (any split gives the same outputs; only where the statistics are replaced matters).
"""

import functools
import json
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from megalodon_jax.checkpoints.model_io import save_params_checkpoint
from megalodon_jax.cli import evaluate as evaluate_cli
from megalodon_jax.config import MegalodonConfig
from megalodon_jax.errors import InferenceError
from megalodon_jax.inference import evaluation
from megalodon_jax.inference.evaluation import Evaluator, NormWindow
from megalodon_jax.inference.long_context import evaluate_documents
from megalodon_jax.model import MegalodonLM

CFG = MegalodonConfig(num_layers=2, model_dim=32, z_dim=16, value_dim=32, ffn_hidden_dim=64, chunk_size=8,
                      vocab_size=256, norm_num_groups=4, cema_ndim=4, dropout=0.1, dtype="float32")
SEGMENT = 32
REF_LEN = 136  # one padded buffer for every reference forward (the model is causal): one shape


@pytest.fixture(scope="module")
def model():
  m = MegalodonLM(CFG, rngs=nnx.Rngs(0))
  m.eval()
  return m


# Reference programs, jitted once per model structure (eager calls of the model are far slower than a compile).
@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids):
  return nnx.merge(graphdef, state)(ids)


@functools.partial(jax.jit, static_argnums=0)
def _step(graphdef, state, ids, cache):
  return nnx.merge(graphdef, state)(ids, cache=cache)


def _lse_nll(logits, targets):
  logits = np.asarray(logits, np.float64)
  top = logits.max(-1)
  return top + np.log(np.exp(logits - top[:, None]).sum(-1)) - logits[np.arange(targets.size), targets]


def _ref_nll(model, x, y):
  """float64 NLL of targets y given inputs x (1-D, len <= REF_LEN) from one full forward without a cache."""
  buf = np.zeros((1, REF_LEN), np.int32)  # causal model: padding after the tokens changes nothing before them
  buf[0, :x.size] = x
  graphdef, state = nnx.split(model)
  return _lse_nll(np.asarray(_forward(graphdef, state, jnp.asarray(buf)))[0, :x.size], y)


def _documents():
  rng = np.random.default_rng(0)
  text = np.frombuffer(b"long context evaluation streams documents through the cache; " * 8, np.uint8)
  # 65, 129, 97 tokens: 64, 128, 96 scored (whole 32-token segments, so few shapes compile; 96 gives a partial
  # 64-token block); 1: skipped (nothing to predict).
  # ASCII, so the documents survive the data pipeline's UTF-8 text features unchanged.
  return [np.concatenate([text[:n // 2], rng.integers(32, 127, n - n // 2)]).astype(np.int64)
          for n in (65, 129, 97, 1)]


def test_any_segment_size_gives_the_full_forward_loss(model):
  docs = _documents()[:2]
  x = np.stack([docs[1][:-1], np.roll(docs[1][:-1], 7)])
  y = np.stack([docs[1][1:], np.roll(docs[1][1:], 7)])
  ref = np.stack([_ref_nll(model, x[i], y[i]) for i in range(2)])
  for seg in (SEGMENT, 20):  # 20: pieces that start and end inside attention chunks
    got = Evaluator(model, segment_len=seg).rows_nll(x, y)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert abs(got.astype(np.float64).sum() / ref.sum() - 1) < 1e-5


def test_documents_by_position_and_context_length(model):
  docs = _documents()
  evaluator = Evaluator(model, segment_len=SEGMENT)
  res = evaluate_documents(evaluator, docs, context_lengths=[32, 64, 1000])
  assert res.documents == 3 and res.skipped_documents == 1 and res.longest_document == 129
  full, by_len = [], {32: [], 64: []}
  for d in docs[:3]:
    x, y = d[:-1], d[1:]
    full.append(_ref_nll(model, x, y))
    for length in by_len:
      by_len[length] += [_ref_nll(model, x[s:s + length], y[s:s + length]) for s in range(0, x.size, length)]
  full_nll = np.concatenate(full)
  assert res.full.tokens == full_nll.size == 64 + 128 + 96
  np.testing.assert_allclose(res.full.loss, full_nll.mean(), rtol=1e-5)
  for length, parts in by_len.items():
    want = np.concatenate(parts)
    assert res.by_context[length].tokens == want.size == full_nll.size  # the same scored tokens for every L
    np.testing.assert_allclose(res.by_context[length].loss, want.mean(), rtol=1e-5)
  # L = 1000 covers every document: exactly the full-context losses. L = 32 differs (restarts cost context).
  assert res.by_context[1000].nll == pytest.approx(res.full.nll, rel=1e-12)
  assert abs(res.by_context[32].loss - res.full.loss) > 1e-4
  positions = np.concatenate([np.arange(1, d.size) for d in docs[:3]])
  buckets = np.floor(np.log2(positions)).astype(int)
  np.testing.assert_array_equal(res.position_tokens[:8], np.bincount(buckets, minlength=8))
  np.testing.assert_allclose(res.position_nll[:8], np.bincount(buckets, weights=full_nll, minlength=8), rtol=1e-5)
  # With an EOS prepended, a one-token document is scored too, and every first token gets a prediction.
  res_eos = evaluate_documents(evaluator, docs, eos_id=0)
  assert res_eos.documents == 4 and res_eos.full.tokens == 65 + 129 + 97 + 1


def _official_driver(model, tokens, window: NormWindow):
  """`megalodon/inference.py` with its TimestepNorm truncation, transcribed, feeding one token per model call."""
  graphdef, state = nnx.split(model)
  c = model.config.chunk_size

  def feed(ids, cache):
    outs = []
    for t in range(ids.shape[1]):
      out, cache = _step(graphdef, state, jnp.asarray(ids[:, t:t + 1]), cache)
      outs.append(np.asarray(out[0]))
    return np.concatenate(outs), cache

  ids = tokens[None, :-1].astype(np.int32)
  length = ids.shape[1]
  n_chunks = length // c
  prev_pos = n_chunks * c
  cache = model.init_cache(1)
  logits = []
  for ch in range(0, n_chunks, window.step_chunks):
    s, e = ch * c, min(ch + window.step_chunks, n_chunks) * c
    out, cache = feed(ids[:, s:e], cache)
    logits.append(out)
    if window.truncate_chunks * c <= e and (e < n_chunks * c or prev_pos < length):
      ss = e - (window.truncate_chunks - window.step_chunks) * c
      _, fresh = feed(ids[:, ss:e], model.init_cache(1))
      cache = cache._replace(layers=cache.layers._replace(norm=fresh.layers.norm),
                             final_norm=fresh.final_norm)
  if prev_pos < length:
    out, _ = feed(ids[:, prev_pos:], cache)
    logits.append(out)
  return _lse_nll(np.concatenate(logits), tokens[1:])


def test_window_option_follows_the_official_driver(model, monkeypatch):
  window = NormWindow()
  tokens = np.random.default_rng(1).integers(0, 256, 13 * 8 + 6)  # 13 whole chunks (an odd last step) + 5 more
  x, y = tokens[None, :-1], tokens[None, 1:]
  evaluator = Evaluator(model, window=window)
  called = set()
  for name in ("_segment", "_window_norms"):  # record which compiled programs the window schedule runs
    program = getattr(evaluation, name)
    monkeypatch.setattr(evaluation, name, lambda *a, _n=name, _p=program: called.add(_n) or _p(*a))
  got = evaluator.rows_nll(x, y)[0]
  monkeypatch.undo()
  np.testing.assert_allclose(got, _official_driver(model, tokens, window), rtol=1e-4, atol=1e-4)
  plain = Evaluator(model, segment_len=SEGMENT).rows_nll(x, y)[0]
  assert np.abs(got - plain)[8 * 8:].max() > 1e-3  # after 8 chunks the statistics differ: the option acts
  np.testing.assert_allclose(got[:8 * 8], plain[:8 * 8], rtol=1e-4, atol=1e-4)  # and not before
  assert called == {"_segment", "_window_norms"}


def test_evaluator_bad_input(model):
  ev = Evaluator(model, segment_len=SEGMENT)
  with pytest.raises(InferenceError, match="outside the vocabulary"):
    ev.rows_nll(np.array([[1, 300]]), np.array([[2, 3]]))
  with pytest.raises(InferenceError, match="equal"):
    ev.rows_nll(np.zeros((1, 3)), np.zeros((1, 4)))
  with pytest.raises(InferenceError, match="context lengths"):
    evaluate_documents(ev, [np.arange(5)], context_lengths=[0])
  with pytest.raises(InferenceError, match="no document"):
    evaluate_documents(ev, [np.arange(1), np.arange(0)])
  with pytest.raises(InferenceError, match="step_chunks"):
    NormWindow(truncate_chunks=2, step_chunks=2)


# ---------------------------------------------------------------------------------------------------------------
# The command line.


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
  root = tmp_path_factory.mktemp("eval")
  save_params_checkpoint(str(root / "params"), model)
  docs = _documents()
  for i, d in enumerate(docs):
    (root / f"doc{i}.txt").write_bytes(d.astype(np.uint8).tobytes())
  return str(root / "params"), str(root)


def _cli(capsys, *argv):
  try:
    rc = evaluate_cli.main(list(argv))
  except SystemExit as e:
    rc = e.code
  out, err = capsys.readouterr()
  return rc, out, err


def test_cli_report_and_plot(model, files, capsys, tmp_path):
  params, root = files
  out_json, png = tmp_path / "report.json", tmp_path / "loss.png"
  rc, out, err = _cli(capsys, "--checkpoint", params, "--text_files", f"{root}/doc*.txt", "--segment_len",
                      str(SEGMENT), "--context_lengths", "64,32", "--output", str(out_json), "--plot", str(png))
  assert rc == 0, err
  rep = json.loads(out_json.read_text())
  res = evaluate_documents(Evaluator(model, segment_len=SEGMENT), _documents(), context_lengths=[32, 64])
  assert rep["documents"] == 3 and rep["skipped_documents"] == 1 and rep["tokens"] == res.full.tokens
  assert rep["loss"] == pytest.approx(res.full.loss, rel=1e-6)
  assert rep["bpb"] == pytest.approx(rep["loss"] / math.log(2)) and rep["ppl"] == pytest.approx(math.exp(rep["loss"]))
  assert [r["context_length"] for r in rep["by_context_length"]] == [32, 64, None]
  assert rep["by_context_length"][0]["loss"] == pytest.approx(res.by_context[32].loss, rel=1e-6)
  assert sum(p["tokens"] for p in rep["by_position"]) == rep["tokens"]
  assert rep["window"] == {"enabled": False} and rep["segment_len"] == SEGMENT and not rep["eos_prepended"]
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "bpb by context length" in err and out == ""
  # The window option, reported as used; printed to stdout without --output.
  rc, out, err = _cli(capsys, "--checkpoint", params, "--text_files", f"{root}/doc1.txt", "--window")
  assert rc == 0, err
  rep = json.loads(out)
  assert rep["window"] == {"enabled": True, "truncate_chunks": 8, "step_chunks": 2, "window_tokens": 48}


def test_cli_split_of_a_data_config(model, files, capsys, tmp_path):
  """--split reads a prepared data split; --data overrides the (here absent) recorded training data config."""
  from megalodon_jax.data.text_files import text_files_documents  # pylint: disable=import-outside-toplevel
  params, root = files
  spec = f"{root}/doc[012].txt"
  # The split hashes the (temporary) paths: pick the percentage that holds out exactly the lowest-hashing file.
  names = [f.name for f in text_files_documents(spec, 0, 0).files]
  percent = (min(zlib.crc32(n.encode()) % 10_000 for n in names) + 1) / 100
  held_out = text_files_documents(spec, percent, 0).split("validation")  # the data package's own split rule
  assert len(held_out) == 1
  rc, out, err = _cli(capsys, "--checkpoint", params, "--split", "validation", "--data", "dataset=text_files",
                      "--data", f"path={spec}", "--data", f"data_dir={tmp_path}", "--data",
                      f"validation_percent={percent}", "--segment_len", str(SEGMENT))
  assert rc == 0, err
  rep = json.loads(out)
  docs = [np.frombuffer(open(f.path, "rb").read(), np.uint8).astype(np.int64) for f in held_out]
  res = evaluate_documents(Evaluator(model, segment_len=SEGMENT), docs)
  assert rep["source"] == {"split": "validation", "dataset": "text_files"}
  assert rep["documents"] == res.documents and rep["loss"] == pytest.approx(res.full.loss, rel=1e-6)


@pytest.mark.parametrize("args,message", [
    (["--checkpoint", "/nonexistent/ckpt", "--text_files", "TEXT"], "does not exist"),
    (["--split", "validation", "--data", "bogus=1"], "unknown data setting"),
    (["--text_files", "/nonexistent/*.txt"], "matches no file"),
    (["--text_files", "TEXT", "--context_lengths", "4k"], "comma-separated integers"),
    (["--text_files", "TEXT", "--context_lengths", "0"], "must be >= 1"),
    (["--text_files", "TEXT", "--window", "--segment_len", "64"], "does not apply with --window"),
    (["--text_files", "TEXT", "--output", "/nonexistent/dir/r.json"], "does not exist"),
    (["--text_files", "TEXT", "--split", "validation"], "not allowed with argument"),
    (["--text_files", "TEXT", "--tokenizer", "sentencepiece"], "tokenizer_path is empty"),
])
def test_cli_bad_input_is_one_line_and_status_2(files, capsys, args, message):
  params, root = files
  args = [a.replace("TEXT", f"{root}/doc0.txt") for a in args]
  if "--checkpoint" not in args:
    args = ["--checkpoint", params] + args
  rc, out, err = _cli(capsys, *args)
  assert rc == 2 and out == ""
  lines = err.splitlines()
  assert lines[-1].startswith("error: ") and message in lines[-1], err
  assert all(line.startswith("note: ") for line in lines[:-1]), err
