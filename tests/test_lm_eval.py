"""The `megalodon` lm-evaluation-harness model (megalodon_jax/lm_eval/) and `python -m megalodon_jax.lm_eval`.

Local YAML tasks over small jsonl files (no download) run through `lm_eval.simple_evaluate`; the per-sample
answers it logs are judged against references that do not go through the model class: float64 log-softmax of one
full forward without a cache (loglikelihood, rolling), the project's streaming evaluation (`long_context`,
another segment length) for documents many segments long, and greedy decoding by re-running the full forward
(generate_until). Both families: a byte-level Megalodon and a Llama baseline with a SentencePiece tokenizer stored
in its checkpoint.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import lm_eval
import numpy as np
import pytest
import sentencepiece as spm
from flax import nnx
from lm_eval.tasks import TaskManager

from megalodon_jax.checkpoints.model_io import save_params_checkpoint
from megalodon_jax.cli import lm_eval as lm_eval_cli
from megalodon_jax.config import MegalodonConfig
from megalodon_jax.data.tokenizers import ByteTokenizer
from megalodon_jax.errors import InferenceError
from megalodon_jax.inference.evaluation import Evaluator
from megalodon_jax.inference.long_context import evaluate_documents
from megalodon_jax.lm_eval.model import MegalodonHarnessModel
from megalodon_jax.lm_eval.options import BYTE_PREFIX_TOKEN, HarnessOptions
from megalodon_jax.lm_eval.scoring import Scored, score_rows
from megalodon_jax.llama.config import LlamaConfig
from megalodon_jax.llama.model import LlamaLM
from megalodon_jax.model import MegalodonLM
from tests.tracing import count_traces

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Chunks of 32: rows of up to 16 inputs run as a partial chunk (width 16), longer ones in whole 32-token segments.
CFG = MegalodonConfig(num_layers=2, model_dim=32, z_dim=16, value_dim=32, ffn_hidden_dim=64, chunk_size=32,
                      vocab_size=256, norm_num_groups=4, cema_ndim=4, dropout=0.1, dtype="float32")
SEGMENT = 32  # the harness model's segment: the long rolling document spans many of them
REF_LEN = 512  # one padded buffer for every reference forward (causal model): one shape

MC = [{"question": "The capital of France is", "choices": [" Paris", " Rome", " a city by the river"], "answer": 0},
      {"question": "Two plus two equals", "choices": [" four", " five"], "answer": 0},
      {"question": "", "choices": ["empty contexts start from the prefix token"], "answer": 0}]
ROLLING = [{"text": "Megalodon streams documents of any length through its constant-size cache. " * 5},
           {"text": "a short one"}]
GEN = [{"prompt": "Once upon", "target": "x"}, {"prompt": "The model said", "target": "y"}]  # one prefill piece
GEN_TOKENS = 16


def _write_tasks(root, until):
  """Three local tasks (multiple choice, rolling, generation) over jsonl files in `root`; returns root."""
  for name, rows in (("mc", MC), ("roll", ROLLING), ("gen", GEN)):
    (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  head = ("dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root}/{name}.jsonl\n  cache_dir: {root}/hf\n"
          "test_split: test\n")
  tasks = {
      "mc": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
            "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n",
      "roll": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
              "metric_list:\n  - metric: word_perplexity\n",
      "gen": f"output_type: generate_until\ndoc_to_text: '{{{{prompt}}}}'\ndoc_to_target: '{{{{target}}}}'\n"
             f"generation_kwargs:\n  until: {json.dumps(until)}\n  max_gen_toks: {GEN_TOKENS}\n"
             f"metric_list:\n  - metric: exact_match\n",
  }
  for name, body in tasks.items():
    text = f"task: tiny_{name}\n" + head.format(root=root, name=name) + body
    (root / f"tiny_{name}.yaml").write_text(text, encoding="utf-8")
  return root


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids):
  return nnx.merge(graphdef, state)(ids)


def _logprobs(model, ids):
  """float64 log-probabilities of ids[1:] given what precedes them, from one full forward without a cache."""
  model.eval()
  buf = np.zeros((1, REF_LEN), np.int32)
  buf[0, :len(ids)] = ids
  logits = np.asarray(_forward(*nnx.split(model), jnp.asarray(buf)), np.float64)[0, :len(ids) - 1]
  top = logits.max(-1)
  lse = top + np.log(np.exp(logits - top[:, None]).sum(-1))
  picked = logits[np.arange(len(ids) - 1), ids[1:]]
  return picked - lse, picked >= top


def _greedy(model, prompt, n):
  seq = list(prompt)
  for _ in range(n):
    buf = np.zeros((1, REF_LEN), np.int32)
    buf[0, :len(seq)] = seq
    seq.append(int(np.asarray(_forward(*nnx.split(model), jnp.asarray(buf)))[0, len(seq) - 1].argmax()))
  return seq[len(prompt):]


@pytest.fixture(scope="module")
def megalodon(tmp_path_factory):
  """(model, params-only checkpoint path): random weights, byte vocabulary (no tokenizer recorded: bytes assumed)."""
  model = MegalodonLM(CFG, rngs=nnx.Rngs(0))
  path = str(tmp_path_factory.mktemp("lm_eval_ckpt") / "params")
  save_params_checkpoint(path, model)
  model.eval()
  return model, path


def _samples(results, task):
  return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def test_tasks_through_simple_evaluate_match_the_references(megalodon, tmp_path):
  model, path = megalodon
  # The stop string: a character that greedy decoding of the first prompt produces after a few tokens.
  free = ByteTokenizer().decode(_greedy(model, list(GEN[0]["prompt"].encode()), GEN_TOKENS))
  stop = next(ch for ch in free[3:] if ch.isprintable() and ch != "\ufffd")
  root = _write_tasks(tmp_path, [stop])
  lm = MegalodonHarnessModel(checkpoint=path, segment_len=SEGMENT, batch_size=4)
  with count_traces("_segment") as traces:
    out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc", "tiny_roll", "tiny_gen"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(root), include_defaults=False))
  assert traces["_segment"] <= 2  # 4 rows of 16 or of 32 tokens per call, whatever the requests' lengths
  # loglikelihood: every choice's log-probability and greedy flag from the full forward. lm_eval puts its target
  # delimiter (" ") before the choice; a trailing space of a context would move into the continuation.
  for sample in _samples(out, "tiny_mc"):
    for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
      ctx = list(context.encode()) or [BYTE_PREFIX_TOKEN]
      lp, top = _logprobs(model, ctx + list(continuation.encode()))
      logprob, greedy = resp[0]
      assert abs(logprob - lp[len(ctx) - 1:].sum()) <= 1e-5, (context, continuation)
      assert greedy == bool(top[len(ctx) - 1:].all())
  # loglikelihood_rolling: the streaming evaluation (another segment length) and the full forward.
  for doc, sample in zip(ROLLING, _samples(out, "tiny_roll")):
    ids = np.frombuffer(doc["text"].encode(), np.uint8).astype(np.int64)
    streamed = evaluate_documents(Evaluator(model, segment_len=2 * SEGMENT), [ids], eos_id=BYTE_PREFIX_TOKEN)
    assert streamed.full.tokens == ids.size
    got = sample["resps"][0][0]
    assert abs(got + streamed.full.nll) <= 1e-5 * max(1.0, streamed.full.nll)
    assert abs(got - _logprobs(model, [BYTE_PREFIX_TOKEN, *ids])[0].sum()) <= 1e-5 * max(1.0, abs(got))
  assert len(ROLLING[0]["text"]) > 10 * SEGMENT  # the long document spans many segments
  # generate_until: greedy decoding, cut before the stop string (the first prompt meets it).
  for doc, sample in zip(GEN, _samples(out, "tiny_gen")):
    text = ByteTokenizer().decode(_greedy(model, list(doc["prompt"].encode()), GEN_TOKENS))
    want = text.split(stop)[0]
    assert sample["resps"][0][0] == want
  assert _samples(out, "tiny_gen")[0]["resps"][0][0] == free[:free.index(stop)]
  assert out["results"]["tiny_mc"]["acc,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
  assert lm.get_model_info()["family"] == "megalodon"


def test_greedy_flag_and_empty_continuations(megalodon):
  model, _ = megalodon
  context = list(b"Two plus two equals")
  greedy = _greedy(model, context, 3)
  other = [(greedy[0] + 1) % 256, *greedy[1:]]
  rows = [np.array(context + greedy), np.array(context + other), np.array(context)]
  got = score_rows(Evaluator(model, segment_len=SEGMENT), rows, [3, 3, 0], rows_per_call=4)
  assert got[0].greedy and not got[1].greedy and got[2] == Scored(0.0, True)
  for res, row in zip(got, rows[:2]):
    assert abs(res.logprob - _logprobs(model, row)[0][-3:].sum()) <= 1e-5


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """(model, checkpoint path, SentencePiece processor): a Llama baseline whose checkpoint carries its tokenizer."""
  root = tmp_path_factory.mktemp("lm_eval_llama")
  lines = [d["question"] + c for d in MC for c in d["choices"]] + [d["text"] for d in ROLLING]
  lines += [f"the quick brown fox {i} jumps over the lazy dog number {i * 7}" for i in range(200)]
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(root / "sp"), vocab_size=64,
                                 model_type="unigram", character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
  proto = (root / "sp.model").read_bytes()
  sp = spm.SentencePieceProcessor(model_proto=proto)
  cfg = LlamaConfig(num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, ffn_hidden_dim=64,
                    vocab_size=sp.vocab_size())
  model = LlamaLM(cfg, rngs=nnx.Rngs(1))
  save_params_checkpoint(str(root / "params"), model, tokenizer_model=proto)
  model.eval()
  return model, str(root / "params"), sp


def test_llama_with_its_sentencepiece_tokenizer(llama, tmp_path):
  model, path, sp = llama
  root = _write_tasks(tmp_path, ["\n"])
  lm = MegalodonHarnessModel(checkpoint=path, segment_len=SEGMENT, batch_size=4)
  assert lm.prefix_token == sp.eos_id() and lm.get_model_info()["family"] == "llama"
  out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc", "tiny_roll", "tiny_gen"], log_samples=True,
                                task_manager=TaskManager(include_path=str(root), include_defaults=False))
  # The continuation's tokens: what encoding context + continuation adds after the context's tokens.
  for sample in _samples(out, "tiny_mc"):
    for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
      ctx = sp.encode(context) or [sp.eos_id()]
      cont = sp.encode(context + continuation)[len(ctx):] if context else sp.encode(continuation)
      lp, _ = _logprobs(model, ctx + cont)
      assert abs(resp[0][0] - lp[len(ctx) - 1:].sum()) <= 1e-5, (context, continuation)
  for doc, sample in zip(ROLLING, _samples(out, "tiny_roll")):
    ids = np.asarray(sp.encode(doc["text"]), np.int64)
    streamed = evaluate_documents(Evaluator(model, segment_len=2 * SEGMENT), [ids], eos_id=sp.eos_id())
    assert abs(sample["resps"][0][0] + streamed.full.nll) <= 1e-5 * max(1.0, streamed.full.nll)
  assert len(sp.encode(ROLLING[0]["text"])) > 4 * SEGMENT  # the KV cache is sized to the whole document
  for doc, sample in zip(GEN, _samples(out, "tiny_gen")):  # greedy, ended by the EOS (a stop id)
    tokens = _greedy(model, sp.encode(doc["prompt"]), GEN_TOKENS)
    tokens = tokens[:tokens.index(sp.eos_id())] if sp.eos_id() in tokens else tokens
    assert sample["resps"][0][0] == sp.decode(tokens).split("\n")[0]
  assert all(s["resps"][0][0] for s in _samples(out, "tiny_gen"))  # text was generated


def _cli_env():
  return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
          "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def test_cli_runs_a_local_task_and_writes_results(megalodon, tmp_path):
  model, path = megalodon
  (tmp_path / "tasks").mkdir()
  root = _write_tasks(tmp_path / "tasks", ["\n"])
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "megalodon_jax.lm_eval", "--model", "megalodon", "--model_args",
         f"checkpoint={path},segment_len={SEGMENT},batch_size=4", "--tasks", "tiny_mc", "--include_path", str(root),
         "--output_path", str(out), "--limit", "2", "--log_samples"]
  proc = subprocess.run(cmd, cwd=REPO, env=_cli_env(), capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(next(out.rglob("results_*.json")).read_text())
  assert results["results"]["tiny_mc"]["acc,none"] in (0.0, 0.5, 1.0)
  assert results["config"]["model"] == "megalodon" and results["config"]["family"] == "megalodon"
  samples = [json.loads(line) for line in next(out.rglob("samples_tiny_mc_*.jsonl")).read_text().splitlines()]
  assert len(samples) == 2  # --limit 2
  for sample in samples:
    pairs = [(a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()]  # {"gen_args_0": {"arg_0": ...}}
    for (context, continuation), resp in zip(pairs, sample["resps"]):
      ctx = list(context.encode()) or [BYTE_PREFIX_TOKEN]
      lp, _ = _logprobs(model, ctx + list(continuation.encode()))
      assert abs(float(resp[0][0]) - lp[len(ctx) - 1:].sum()) <= 1e-5


@pytest.mark.parametrize("model_args, message", [
    ("checkpoint={missing}", "does not exist"),
    ("batch_size=2", "checkpoint=PATH is required"),
    ("checkpoint={ckpt},bogus=1", "bogus: not arguments of the megalodon model"),
    ("checkpoint={ckpt},segment_len=0", "segment_len=0: must be >= 1"),
    ("checkpoint={ckpt},step=x", "step='x': expected an integer"),
])
def test_cli_bad_model_args_are_one_error_line(megalodon, tmp_path, capsys, model_args, message):
  args = model_args.format(missing=tmp_path / "nope", ckpt=megalodon[1])
  assert lm_eval_cli.main(["--model_args", args, "--tasks", "tiny_mc"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_cli_reports_a_bad_checkpoint_before_jax(tmp_path):
  script = ("import sys; from megalodon_jax.cli.lm_eval import main; rc = main(sys.argv[1:]); "
            "print(rc, any(m in sys.modules for m in ('jax', 'flax', 'orbax', 'torch')))")
  proc = subprocess.run([sys.executable, "-c", script, "--model", "megalodon", "--model_args",
                         f"checkpoint={tmp_path / 'missing'}", "--tasks", "tiny_mc"], cwd=REPO, env=_cli_env(),
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.stdout.split() == ["2", "False"], proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(f"error: checkpoint {tmp_path / 'missing'} does not exist")


def test_options_parse():
  opts = HarnessOptions.parse({"checkpoint": 7, "batch_size": "auto:4", "max_batch_size": 8, "device": "cuda",
                               "prefix_token": "3"})
  assert opts.checkpoint == "7" and opts.batch_size is None and opts.prefix_token == 3
  assert opts.rows_per_call(16) == 8
  assert HarnessOptions.parse({"checkpoint": "x", "batch_size": 2}).rows_per_call(16) == 2
  assert HarnessOptions.parse({"pretrained": "runs/x"}).checkpoint == "runs/x"  # lm_eval's usual name
  with pytest.raises(InferenceError, match="not both"):
    HarnessOptions.parse({"pretrained": "a", "checkpoint": "b"})
  with pytest.raises(InferenceError, match="batch_size=0"):
    HarnessOptions.parse({"checkpoint": "x", "batch_size": 0})
