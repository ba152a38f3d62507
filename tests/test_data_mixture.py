"""Data mixtures (`data.mixture`): shares follow the weights, each source keeps its own row streams, the global
batches are the same for 1, 2 and 4 processes, resume is exact, new weights on resume are logged and followed, bad
settings fail before anything is built, and a tiny run reports the evaluation loss per source.

Judges: the single-source iterators of the project (each mixture row must be the next window of the same row of
exactly one source's own stream, which attributes every row to a source), the documented rule (a golden-ratio Weyl
sequence, recomputed here in floating point), and for the trainer a plain forward of the saved model over each
source's own evaluation batches. Shares are counted in rows; every row is `seq_len` tokens of one source, so the
token shares are the same.
"""

import hashlib
import logging
import math
import random
import shutil

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from batches import assert_same, global_batches
from cli_harness import run_cli, train_command

from megalodon_jax import data
from megalodon_jax.checkpoints.model_io import load_checkpoint
from megalodon_jax.configs import default as default_config
from megalodon_jax.configs import tiny as tiny_config
from megalodon_jax.errors import ConfigError
from megalodon_jax.training import data_state, trainer
from megalodon_jax.training.metrics import read_metrics
from megalodon_jax.training.train_config import TrainConfig, check_inputs

SEED, BATCH, SEQ = 5, 8, 16
ALPHABET = "xyz \n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """The stdlib corpus (first 40 files) and 12 small text files of "xyz \\n", prepared once; returns the data
  config of the 0.75 / 0.25 mixture and the single-source configs by label."""
  root = tmp_path_factory.mktemp("mixture")
  rng = random.Random(0)
  (root / "files").mkdir()
  for i in range(12):
    (root / "files" / f"{i:02d}.txt").write_text("".join(rng.choice(ALPHABET) for _ in range(rng.randrange(300, 900))))
  cfg = default_config.get_config().data
  cfg.update(dict(data_dir=str(root / "tfds"), max_documents=40))
  txt = f"txt:1 dataset=text_files path={root / 'files'} validation_percent=20"
  mixed = mixture_config(cfg, f"stdlib:3; {txt}")
  data.prepare(mixed)
  singles = {"stdlib": mixture_config(cfg, "").copy_and_resolve_references(),
             "txt": mixture_config(cfg, "")}
  singles["txt"].update(dict(dataset="text_files", path=str(root / "files"), validation_percent=20))
  return mixed, singles, txt


def mixture_config(base, mixture, **changes):
  cfg = base.copy_and_resolve_references()
  cfg.update(dict(mixture=mixture, **changes))
  return cfg


def processes(cfg, count, seed=SEED):
  return [data.make_train_iterator(cfg, seq_len=SEQ, batch_size=BATCH, seed=seed, process_index=p,
                                   process_count=count) for p in range(count)]


class Attribution:
  """Attributes every row of mixture batches to the source whose own row stream (the single-source iterator of
  the same seed and batch size) has it as its next window; fails when no source or both do."""

  def __init__(self, singles, labels=("stdlib", "txt")):
    self.labels = labels
    self.streams = {s: [] for s in labels}
    self.iterators = {s: processes(singles[s], 1)[0] for s in labels}
    self.used = {s: [0] * BATCH for s in labels}

  def _window(self, label, row, k):
    stream = self.streams[label]
    while len(stream) <= k:
      stream.append(next(self.iterators[label])["inputs"])
    return stream[k][row]

  def __call__(self, batches):
    """[[label of each row] per batch]."""
    out = []
    for b in batches:
      labels = []
      for row in range(BATCH):
        hits = [s for s in self.labels if np.array_equal(b["inputs"][row], self._window(s, row, self.used[s][row]))]
        assert len(hits) == 1, f"row {row} matches {hits}"
        self.used[hits[0]][row] += 1
        labels.append(hits[0])
      out.append(labels)
    return out


def shares(attributed):
  rows = [label for batch in attributed for label in batch]
  return {s: rows.count(s) / len(rows) for s in set(rows)}


def documented_rule(weights, seed, first_row, count):
  """The module docstring's rule in floating point: u_g = frac(s + g / phi), s from the seed's hash; the source
  is the interval of the cumulative weights (label order) holding u_g."""
  s = int.from_bytes(hashlib.sha256(f"megalodon-data/mixture/{seed}".encode()).digest()[:8], "little") / 2 ** 64
  inv_phi = (math.sqrt(5) - 1) / 2
  bounds = np.cumsum(weights)[:-1]
  return [int(np.searchsorted(bounds, (s + g * inv_phi) % 1.0, side="right"))
          for g in range(first_row, first_row + count)]


def test_shares_follow_the_weights_and_sources_keep_their_streams(corpus):
  mixed, singles, _ = corpus
  (it,) = processes(mixed, 1)
  attributed = Attribution(singles)(global_batches([it], 200))
  got = shares(attributed)
  assert abs(got["stdlib"] - 0.75) < 0.02 and abs(got["txt"] - 0.25) < 0.02, got
  want = documented_rule([0.75, 0.25], SEED, 0, 200 * BATCH)
  assert [label for batch in attributed for label in batch] == [("stdlib", "txt")[i] for i in want]
  assert data.plan(mixed).weights == {"stdlib": 0.75, "txt": 0.25}  # 3 : 1, normalised


def test_global_batches_equal_for_1_2_4_processes(corpus):
  mixed, _, _ = corpus
  reset = mixture_config(mixed, mixed.mixture, document_boundaries="reset")
  want = global_batches(processes(reset, 1), 30)
  assert set(want[0]) == {"inputs", "targets", "segment_ids", "positions", "target_mask"}
  for count in (2, 4):
    assert_same(global_batches(processes(reset, count), 30), want)


@pytest.mark.parametrize("k", [1, 13])
def test_resume_is_exact_on_any_process_count(corpus, k):
  mixed, _, _ = corpus
  straight = global_batches(processes(mixed, 1), k + 20)
  two = processes(mixed, 2)
  assert_same(global_batches(two, k), straight[:k])
  saved = data.merge_states([it.get_state() for it in reversed(two)])
  for count in (1, 4):
    resumed = processes(mixed, count)
    for it in resumed:
      it.set_state(saved)
    assert_same(global_batches(resumed, 20), straight[k:])
  (one,) = processes(mixed, 1)  # the trainer's path: the state gathered (one process) and restored
  global_batches([one], k)
  again = processes(mixed, 1)[0]
  again.set_state(data_state.restored_data_state(data_state.gather_data_state(one.get_state()), "/ckpt", k))
  assert_same(global_batches([again], 20), straight[k:])


def test_new_weights_on_resume_are_logged_and_followed(corpus, caplog):
  mixed, singles, txt = corpus
  (first,) = processes(mixed, 1)
  before = global_batches([first], 50)
  turned = mixture_config(mixed, f"stdlib:1; {txt.replace('txt:1', 'txt:3')}")
  (resumed,) = processes(turned, 1)
  with caplog.at_level(logging.WARNING, logger="megalodon_jax"):
    resumed.set_state(first.get_state())
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("weights change on resume at batch 50 from {stdlib: 0.75, txt: 0.25} to {stdlib: 0.25, txt: 0.75}"
             in w for w in warnings), warnings
  after = global_batches([resumed], 150)
  attribute = Attribution(singles)  # one attribution over both parts: each source continues where it was
  attribute(before)
  attributed = attribute(after)
  got = shares(attributed)
  assert abs(got["txt"] - 0.75) < 0.02, got
  want = documented_rule([0.25, 0.75], SEED, 50 * BATCH, 150 * BATCH)
  assert [label for batch in attributed for label in batch] == [("stdlib", "txt")[i] for i in want]


def test_a_new_source_on_resume_starts_at_its_beginning(corpus, caplog):
  mixed, singles, _ = corpus
  (first,) = processes(mixed, 1)
  global_batches([first], 10)
  only_stdlib = mixture_config(mixed, "stdlib:1")
  (resumed,) = processes(only_stdlib, 1)
  with caplog.at_level(logging.WARNING, logger="megalodon_jax"):
    resumed.set_state(first.get_state())  # txt is left out: logged, stdlib continues
  assert "to {stdlib: 1}" in caplog.text
  (back,) = processes(mixed, 1)
  back.set_state(resumed.get_state())
  assert "txt starting at the beginning" in caplog.text
  first_txt = processes(singles["txt"], 1)[0]
  window = next(first_txt)["inputs"]
  batch = next(back)
  picks = documented_rule([0.75, 0.25], SEED, 10 * BATCH, BATCH)
  for row, pick in enumerate(picks):
    if pick == 1:
      np.testing.assert_array_equal(batch["inputs"][row], window[row])


def test_states_of_other_data_are_refused(corpus):
  mixed, singles, _ = corpus
  (single,) = processes(singles["stdlib"], 1)
  (it,) = processes(mixed, 1)
  with pytest.raises(data.DataError, match="recorded for one dataset .*not a data.mixture"):
    it.set_state(single.get_state())
  with pytest.raises(data.DataError, match="recorded for other data"):
    single.set_state(it.get_state())
  fewer = mixture_config(mixed, mixed.mixture.replace("stdlib:3", "stdlib:3 max_documents=30"))
  data.prepare(fewer)
  with pytest.raises(data.DataError, match=r"stdlib\.documents: saved 38, now 2\d"):
    processes(fewer, 1)[0].set_state(it.get_state())
  with pytest.raises(data.DataError, match="seed: saved 5, now 6"):
    processes(mixed, 1, seed=6)[0].set_state(it.get_state())
  with pytest.raises(data.DataError, match=r"names several sources \(stdlib, txt\).*--data mixture="):
    data.sources.open_split(data.plan(mixed), "validation", "eval_split")  # megalodon-evaluate reads one source


@pytest.mark.parametrize("mixture, message", [
    ("stdlib:0; txt:1 dataset=text_files", "source 'stdlib': weight '0' must be a number > 0"),
    ("stdlib:-1", "weight '-1' must be a number > 0"),
    ("stdlib:nan", "weight 'nan' must be a number > 0"),
    ("stdlib", "expected LABEL:WEIGHT first"),
    ("stdlib:1; stdlib:2", "label 'stdlib' is used twice"),
    ("code:1", "source 'code': its label is no dataset"),
    ("code:1 dataset=wikipedia", "source 'code': data.dataset='wikipedia' is unknown"),
    ("stdlib:1 tokenizer=sentencepiece", "tokenizer is one for the whole run"),
    ("stdlib:1 max_document=3", "unknown data field 'max_document' .did you mean max_documents"),
    ("stdlib:1 max_documents=many", "max_documents='many' must be a number"),
    ("stdlib:1 add_eos=maybe", "add_eos='maybe' must be true or false"),
    ("txt:1 dataset=text_files path=/no/such/files", "source 'txt': data.path"),
    (";", "names no source"),
])
def test_bad_mixtures_are_config_errors_before_anything_is_built(corpus, mixture, message):
  mixed, _, _ = corpus
  cfg = tiny_config.get_config()
  cfg.data = mixture_config(mixed, mixture)
  with pytest.raises(ConfigError, match=message):
    check_inputs(TrainConfig.of(cfg))


def test_the_command_line_refuses_a_bad_mixture_with_one_error_line(corpus, tmp_path):
  mixed, _, txt = corpus
  result = run_cli(train_command("--config", "tiny", "--workdir", str(tmp_path / "w"),
                                 f"--config.data.data_dir={mixed.data_dir}",
                                 f"--config.data.mixture=stdlib:3; {txt.replace('txt:1', 'txt:-1')}"))
  assert result.returncode == 2
  assert result.one_error_line() == "error: data.mixture source 'txt': weight '-1' must be a number > 0"
  assert not (tmp_path / "w").exists()


def test_a_run_reports_the_evaluation_loss_per_source(corpus, tmp_path):
  mixed, singles, _ = corpus
  cfg = tiny_config.get_config()
  cfg.data = mixed
  cfg.model.num_layers = 1
  cfg.model.chunk_size = 16
  cfg.update(dict(seq_len=SEQ, batch_size=BATCH, total_steps=4, log_every=1, eval_every=2, eval_batches=2,
                  num_samples=0, checkpoint_every=2, tensorboard=False, progress_bar="off",
                  async_checkpointing=False))
  cfg.optimizer.warmup_steps = 1
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])
  straight = read_metrics(f"{workdir}/metrics.jsonl")
  records = {r["step"]: r for r in straight if "eval_loss" in r}
  assert sorted(records) == [0, 2, 4]
  shutil.rmtree(f"{workdir}/checkpoints/4")  # stopped after step 2's checkpoint: the same command resumes there
  trainer.train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])
  resumed = read_metrics(f"{workdir}/metrics.jsonl")
  assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]
  for key in ("loss", "eval_loss", "eval_loss/stdlib", "eval_loss/txt"):  # the mixture's rows, bit for bit
    assert [r.get(key) for r in resumed] == [r.get(key) for r in straight], key
  model, _, step = load_checkpoint(workdir)
  assert step == 4
  model.eval()
  forward = nnx.jit(lambda m, ids: m(ids))  # a plain forward, not the trainer's eval step (loss in pieces)
  for label, single in singles.items():  # the saved model's loss on the source's own evaluation batches
    batches = data.make_eval_batches(single, seq_len=SEQ, batch_size=BATCH, num_batches=2)
    assert not hasattr(batches, "sources")  # a run on one dataset gets no per-source keys
    nll = [np.asarray(optax.softmax_cross_entropy_with_integer_labels(forward(model, b["inputs"]), b["targets"]),
                      np.float64) for b in batches]
    want = float(np.mean(nll))
    assert records[4][f"eval_loss/{label}"] == pytest.approx(want, rel=2e-5)
    assert records[4][f"eval_bpb/{label}"] == pytest.approx(want / math.log(2), rel=2e-5)
  for r in records.values():  # overall: token-weighted over both sources' batches (2 each, equal tokens)
    assert r["eval_loss"] == pytest.approx((r["eval_loss/stdlib"] + r["eval_loss/txt"]) / 2, rel=1e-6)
  assert records[4]["eval_loss/txt"] < records[0]["eval_loss/txt"]
