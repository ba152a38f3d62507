"""Generation (inference/generation.py, sampling.py, detokenize.py) and the `megalodon_jax.generate` CLI.

References: greedy decoding by re-running the full forward on the growing sequence; NumPy top-k / top-p filters;
the softmax of the filtered logits for sampling frequencies.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from megalodon_jax.checkpoints.model_io import save_params_checkpoint
from megalodon_jax.cli import generate as generate_cli
from megalodon_jax.config import MegalodonConfig
from megalodon_jax.data.tokenizers import ByteTokenizer
from megalodon_jax.errors import InferenceError
from megalodon_jax.inference.detokenize import TextStream
from megalodon_jax.inference.generation import Generator, prefill_plan, prefilled_length
from megalodon_jax.inference.sampling import Sampler, filter_logits, sample_logits
from megalodon_jax.model import MegalodonLM
from tests.tracing import count_traces

# dropout > 0: generation must switch it off (eval mode) to match the deterministic reference.
# Byte vocabulary so that the CLI tests can use the same model (and its compiled programs) with the byte tokenizer.
CFG = MegalodonConfig(num_layers=2, model_dim=32, z_dim=16, value_dim=32, ffn_hidden_dim=64, chunk_size=8,
                      vocab_size=256, norm_num_groups=4, cema_ndim=4, dropout=0.1, dtype="float32")
TEXTS = ["abc", "hello world", "the quick brown fox j"]  # 3, 11 and 21 bytes: P0 = 3, the others cross chunks
PROMPTS = [list(t.encode()) for t in TEXTS]
NEW = 12


@pytest.fixture(scope="module")
def model():
  return MegalodonLM(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def gen(model):
  return Generator(model, prefill_piece=16, block_size=5)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids):
  return nnx.merge(graphdef, state)(ids)


def _greedy_reference(model, prompt, n):
  """Greedy decoding by re-running the full forward (no cache) on the growing sequence."""
  model.eval()
  graphdef, state = nnx.split(model)
  seq = list(prompt)
  buf = np.zeros((1, 64), np.int32)  # causal model: one padded buffer serves every step (one compile)
  for _ in range(n):
    buf[0, :len(seq)] = seq
    logits = np.asarray(_forward(graphdef, state, jnp.asarray(buf)))
    seq.append(int(logits[0, len(seq) - 1].argmax()))
  return seq[len(prompt):]


def test_prefill_plan():
  assert prefill_plan(0, 8, 16) == []
  assert prefill_plan(37, 8, 16) == [16, 16, 4, 1]
  assert prefill_plan(100, 8, 32) == [32, 32, 32, 4]
  assert prefill_plan(63, 8, 16) == [16, 16, 16, 8, 4, 2, 1]
  for n in range(200):
    plan = prefill_plan(n, 8, 32)
    assert sum(plan) == n and set(plan) <= {32, 16, 8, 4, 2, 1}


def test_prefilled_length_leaves_the_sub_grain_tail_to_decode():
  assert [prefilled_length(n, 256) for n in (0, 31, 32, 1023, 4096)] == [0, 0, 32, 992, 4096]
  assert [prefilled_length(n, 8) for n in (7, 8, 37)] == [0, 8, 32]  # grain: the chunk when it is smaller


def test_greedy_batch_equals_full_forward_decoding(model, gen):
  out = gen.generate(PROMPTS, max_new_tokens=NEW, sampler=Sampler(temperature=0.0))
  for prompt, comp in zip(PROMPTS, out):
    assert comp.tokens == _greedy_reference(model, prompt, NEW)
    assert comp.finish_reason == "length"


def test_first_token_from_the_prefill_logits_equals_full_forward_decoding(model, gen):
  """The shortest prompt a multiple of the grain (here the chunk, 8): the whole of it is prefilled (16 tokens, one
  piece of two chunks from an empty cache) and its first token is sampled from the prefill's last logits."""
  prompts = [[(7 * i + 3) % 256 for i in range(16)], [(5 * i + 1) % 256 for i in range(21)]]
  assert prefilled_length(16, CFG.chunk_size) == 16
  out = gen.generate(prompts, max_new_tokens=NEW, sampler=Sampler(temperature=0.0))
  for prompt, comp in zip(prompts, out):
    assert comp.tokens == _greedy_reference(model, prompt, NEW)


def test_prompts_below_min_prefill_are_fed_by_decode_steps_alone(model):
  """min_prefill: a batch whose shortest prompt is shorter is fed by decode steps only (no prefill program is
  traced), with the same greedy continuations as the full-forward reference; at or above it, prefill runs."""
  gen = Generator(model, prefill_piece=16, block_size=5, min_prefill=12)
  prompts = [[(7 * i + 3) % 256 for i in range(11)], [(5 * i + 1) % 256 for i in range(16)]]
  with count_traces("_prefill") as traces:
    out = gen.generate(prompts, max_new_tokens=NEW, sampler=Sampler(temperature=0.0))
    assert traces["_prefill"] == 0
    # Shortest prompt 12 tokens: 8 of them (the grain) prefilled. Five rows (batch bucket 8), a shape no other test
    # of this model runs, so that the program is traced here.
    gen.generate([p + [9] for p in prompts] * 2 + [[1] * 12], max_new_tokens=2, sampler=Sampler(temperature=0.0))
    assert traces["_prefill"] == 1
  for prompt, comp in zip(prompts, out):
    assert comp.tokens == _greedy_reference(model, prompt, NEW)


def test_last_only_logits_are_the_last_row_of_the_full_logits(model):
  model.eval()
  ids = jnp.asarray([[(3 * i + 2) % 256 for i in range(19)]], jnp.int32)
  full, cache_full = model(ids, cache=model.init_cache(1))
  last, cache_last = model(ids, cache=model.init_cache(1), last_only=True)
  assert last.shape == (1, 1, CFG.vocab_size)
  np.testing.assert_allclose(np.asarray(last), np.asarray(full[:, -1:]), rtol=1e-6, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, cache_full, cache_last)


def test_rows_do_not_depend_on_later_rows_or_block_size(model, gen):
  sampler = Sampler(temperature=1.0, top_k=10, top_p=0.9)
  together = gen.generate(PROMPTS, max_new_tokens=NEW, sampler=sampler, seed=3)
  other = Generator(model, prefill_piece=8, block_size=7)  # batch bucket 2 instead of 4, other block size
  pair = other.generate(PROMPTS[:2], max_new_tokens=NEW, sampler=sampler, seed=3)
  assert [c.tokens for c in together[:2]] == [c.tokens for c in pair]
  reseeded = gen.generate(PROMPTS, max_new_tokens=NEW, sampler=sampler, seed=4)
  assert [c.tokens for c in reseeded] != [c.tokens for c in together]


def test_stop_ids_end_rows_independently(gen):
  greedy = Sampler(temperature=0.0)
  free = [c.tokens for c in gen.generate(PROMPTS, max_new_tokens=NEW, sampler=greedy)]
  stop0 = free[0][4]
  cut0 = free[0].index(stop0)
  out = gen.generate(PROMPTS, max_new_tokens=NEW, sampler=greedy, stop_ids=[[stop0], [], [free[2][0]]])
  assert out[0].tokens == free[0][:cut0] and out[0].finish_reason == "stop"
  assert out[1].tokens == free[1] and out[1].finish_reason == "length"
  assert out[2].tokens == [] and out[2].finish_reason == "stop"
  # One list for all rows; streaming yields each row's tokens in order, block by block.
  updates = list(gen.stream(PROMPTS, max_new_tokens=NEW, sampler=greedy, stop_ids=[stop0]))
  rows = [sum((u.new_tokens[i] for u in updates), []) for i in range(3)]
  for i in range(3):
    want = free[i][:free[i].index(stop0)] if stop0 in free[i] else free[i]
    assert rows[i] == want
  assert all(updates[-1].finished) and not all(updates[0].finished)


def test_compiles_once_per_shape_bucket():
  """Prompt lengths, batch sizes inside one bucket, budgets, seeds and sampling settings reuse the programs.

  Counted as traces of the jitted programs, on a model structure that no other test traces.
  """
  # ffn_hidden_dim=40: a structure of its own, so no earlier test (in this file or another) compiled it.
  gen = Generator(MegalodonLM(CFG.replace(num_layers=1, ffn_hidden_dim=40), rngs=nnx.Rngs(0)), prefill_piece=16,
                  block_size=5)
  with count_traces("_decode", "_prefill") as traces:
    gen.generate(PROMPTS, max_new_tokens=3, sampler=Sampler(temperature=0.0))
    # Batch bucket 4, prompt bucket 32, 4 stop slots, 5 steps: one decode program.
    assert traces["_decode"] == 1
    # Batch 3-4 -> 4 rows, longest prompt 17-32 -> 32 columns: the same decode program as PROMPTS.
    batches = [[[4] * 18, [5] * 30, [6] * 31, [7] * 22], [[8] * 19, [9] * 19, [1] * 32]]
    gen.generate(batches[0], max_new_tokens=9, sampler=Sampler(0.5, 3, 0.7), seed=1)
    gen.generate(batches[1], max_new_tokens=2, sampler=Sampler(1.0), stop_ids=[5, 6], seed=2)
    assert traces["_decode"] == 1
  # Prefill: one program per distinct piece length (batch 4 throughout), each traced once.
  # The tokens below the grain (here the chunk, 8) go through decode steps: no piece shorter than a chunk.
  pieces = {n for rows in [PROMPTS] + batches
            for n in prefill_plan(prefilled_length(min(map(len, rows)), 8), 8, 16)}
  assert pieces <= {16, 8}
  assert traces["_prefill"] == len(pieces)


def _np_filter(logits, temperature, top_k, top_p):
  """Reference: keep-mask of temperature / top-k / top-p (smallest set of top tokens reaching top_p)."""
  x = logits / temperature
  keep = np.ones_like(x, bool)
  if top_k:
    kth = np.sort(x, axis=-1)[:, -top_k][:, None]
    keep &= x >= kth
  if top_p < 1:
    for r in range(x.shape[0]):
      z = np.where(keep[r], x[r], -np.inf)
      p = np.exp(z - z.max())
      p /= p.sum()
      order = np.argsort(-p, kind="stable")
      cum = np.cumsum(p[order])
      n = int(np.searchsorted(cum, top_p) + 1)  # tokens needed to reach top_p
      allowed = np.zeros_like(keep[r])
      allowed[order[:n]] = True
      keep[r] &= allowed
  return keep


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 1.0), (0.7, 0, 0.8), (1.3, 12, 0.5), (1.0, 1, 1.0),
                                                     (1.0, 0, 0.05)])
def test_filters_match_numpy(temperature, top_k, top_p):
  logits = np.random.default_rng(top_k).normal(size=(6, 40)).astype(np.float32) * 2
  filtered = filter_logits(jnp.asarray(logits), *Sampler(temperature, top_k, top_p).as_arrays())
  got = np.isfinite(np.asarray(filtered))
  np.testing.assert_array_equal(got, _np_filter(logits.astype(np.float64), temperature, top_k, top_p))


def test_sampling_frequencies_follow_the_filtered_softmax():
  logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -1.0], np.float32)
  sampler = Sampler(temperature=0.8, top_k=5, top_p=0.9)
  n = 20000
  keys = jax.random.split(jax.random.key(0), n)
  draws = np.asarray(sample_logits(jnp.tile(jnp.asarray(logits), (n, 1)), keys, *sampler.as_arrays()))
  keep = _np_filter(logits[None].astype(np.float64), 0.8, 5, 0.9)[0]
  p = np.where(keep, np.exp(logits / 0.8), 0.0)
  p /= p.sum()
  freq = np.bincount(draws, minlength=6) / n
  assert set(np.nonzero(freq)[0]) <= set(np.nonzero(keep)[0])
  assert np.abs(freq - p).sum() < 0.03, (freq, p)


def test_bad_inputs(gen):
  with pytest.raises(InferenceError, match="no prompts"):
    gen.generate([], max_new_tokens=3)
  with pytest.raises(InferenceError, match="prompt 1 is empty"):
    gen.generate([[1], []], max_new_tokens=3)
  with pytest.raises(InferenceError, match=r"token id 256 at index 2 is outside the vocabulary \[0, 256\)"):
    gen.generate([[1, 2, 256]], max_new_tokens=3)
  with pytest.raises(InferenceError, match="token id -1"):
    gen.generate([[-1]], max_new_tokens=3)
  with pytest.raises(InferenceError, match="max_new_tokens"):
    gen.generate([[1]], max_new_tokens=0)
  with pytest.raises(InferenceError, match="stop_ids"):
    gen.generate([[1]], max_new_tokens=2, stop_ids=[999])
  with pytest.raises(InferenceError, match="per-row"):
    gen.generate([[1], [2]], max_new_tokens=2, stop_ids=[[1]])
  with pytest.raises(ValueError, match="top_p"):
    Sampler(top_p=0.0)
  with pytest.raises(ValueError, match="temperature"):
    Sampler(temperature=-1.0)
  with pytest.raises(ValueError, match="top_k"):
    Sampler(top_k=-2)
  with pytest.raises(InferenceError, match="prefill_piece"):
    Generator(gen.model, prefill_piece=12)


class _WordTokenizer:
  """A non-byte tokenizer whose pieces depend on their neighbours (a space before every word but the first)."""
  vocab_size = 4
  eos_id = None
  words = ["alpha", "beta", "gamma", "delta"]

  def decode(self, ids):
    return " ".join(self.words[int(i)] for i in ids)


def test_text_stream_never_splits_characters():
  text = "naïve ✓ café – 漢字 end"
  data = text.encode("utf-8")
  stream = TextStream(ByteTokenizer())
  pieces = [stream.push(list(data[i:i + 1])) for i in range(len(data))] + [stream.flush()]
  assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
  broken = TextStream(ByteTokenizer())
  assert broken.push([0xE2, 0x9C]) == "" and broken.flush() == "\ufffd"  # a cut-off character, shown at the end
  words = TextStream(_WordTokenizer())
  assert "".join([words.push([0]), words.push([2, 1]), words.push([]), words.push([3]), words.flush()]) == (
      "alpha gamma beta delta")


# ---------------------------------------------------------------------------------------------------------------
# The command line, on a params-only checkpoint and on the same weights as an official consolidated.pth.


@pytest.fixture(scope="module")
def checkpoints(model, tmp_path_factory):
  from megalodon_jax.convert import torch_files  # pylint: disable=import-outside-toplevel
  from megalodon_jax.convert.official import to_official_state_dict  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("gen_ckpt")
  save_params_checkpoint(str(root / "params"), model)
  torch_files.write_official(str(root / "pth"), to_official_state_dict(model), CFG)
  return str(root / "params"), str(root / "pth" / "consolidated.pth")


def _cli(capsys, *argv):
  """(exit status, stdout, stderr) of the CLI run in-process; argparse's own exits count as statuses too."""
  try:
    rc = generate_cli.main(list(argv))
  except SystemExit as e:
    rc = e.code
  out, err = capsys.readouterr()
  return rc, out, err


def test_cli_streams_completions(model, gen, checkpoints, capsys, tmp_path):
  params, pth = checkpoints
  greedy = [ByteTokenizer().decode(c.tokens) for c in gen.generate(PROMPTS, max_new_tokens=NEW,
                                                                     sampler=Sampler(temperature=0.0))]
  # One prompt: streamed as produced, then a newline. The tokenizer is assumed from the 256-token vocabulary.
  rc, out, err = _cli(capsys, "--checkpoint", params, "--prompt", TEXTS[0], "--max_new_tokens", str(NEW),
                      "--temperature", "0", "--block_size", "5", "--prefill_piece", "16")
  assert rc == 0, err
  assert out == ByteTokenizer().decode(_greedy_reference(model, PROMPTS[0], NEW)) + "\n"
  assert "byte tokenizer" in err
  # Several prompts (one per line) from the official .pth: each printed once finished; JSON lines written.
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("\n".join([TEXTS[0], "", TEXTS[1], TEXTS[2]]) + "\n")
  jsonl = tmp_path / "out.jsonl"
  rc, out, err = _cli(capsys, "--checkpoint", pth, "--prompt_lines", str(prompts), "--max_new_tokens", str(NEW),
                      "--temperature", "0", "--block_size", "5", "--prefill_piece", "16", "--output_jsonl",
                      str(jsonl), "--echo")
  assert rc == 0, err
  for i in range(3):
    assert f"=== completion {i} (length) ===\n{TEXTS[i]}{greedy[i]}\n" in out
  rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
  assert [r["prompt"] for r in rows] == TEXTS and [r["completion"] for r in rows] == greedy
  assert all(r["tokens"] == NEW and r["finish_reason"] == "length" for r in rows)


@pytest.mark.parametrize("args,message", [
    (["--checkpoint", "/nonexistent/ckpt", "--prompt", "x"], "does not exist"),
    (["--prompt", ""], "prompt 0 is empty"),
    (["--prompt_file", "/nonexistent/prompt.txt"], "cannot read the prompt file"),
    (["--prompt_ids", "1,2,300"], "token id 300 at index 2 is outside the vocabulary [0, 256)"),
    (["--prompt_ids", "1,x"], "comma-separated integer"),
    (["--prompt", "x", "--top_p", "1.5"], "top_p must be in"),
    (["--prompt", "x", "--max_new_tokens", "0"], "max_new_tokens"),
    (["--prompt", "x", "--bogus_flag"], "unrecognized arguments"),
    ([], "no prompt given"),
])
def test_cli_bad_input_is_one_line_and_status_2(checkpoints, capsys, args, message):
  if "--checkpoint" not in args:
    args = ["--checkpoint", checkpoints[0]] + args
  rc, out, err = _cli(capsys, *args)
  assert rc == 2 and out == ""
  lines = err.splitlines()
  assert lines[-1].startswith("error: ") and message in lines[-1], err
  assert all(line.startswith("note: ") for line in lines[:-1]), err  # the error itself is one line


def test_cli_unreadable_prompt_file(checkpoints, capsys, tmp_path):
  folder = tmp_path / "a_folder"
  os.mkdir(folder)
  rc, _, err = _cli(capsys, "--checkpoint", checkpoints[0], "--prompt_file", str(folder))
  assert rc == 2 and "cannot read the prompt file" in err
