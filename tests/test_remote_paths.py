"""Every file the trainer, evaluate, generate and convert read or write goes through etils.epath, so gs:// works:
tested against the emulated bucket of `gcs_emulator.fake_gcs` (gs://b/x is <root>/b/x on disk), which also fails a
test that leaves a local "gs:" folder behind (a gs:// path handed to `os`).
"""

import dataclasses
import json
import os
import time

import jax
import numpy as np
import ml_collections
import pytest
import sentencepiece as spm
from etils import epath
from flax import nnx

from gcs_emulator import _stray_gs_folders, fake_gcs, local_path  # pylint: disable=unused-import
from megalodon_jax import paths
from megalodon_jax.checkpoints.model_io import save_params_checkpoint
from megalodon_jax.checkpoints.params import load_params
from megalodon_jax.cli import convert as convert_cli
from megalodon_jax.cli import evaluate as evaluate_cli
from megalodon_jax.cli import generate as generate_cli
from megalodon_jax.config import MegalodonConfig
from megalodon_jax.data import check_data_config, jsonl, make_tokenizer, text_files
from megalodon_jax.errors import CheckpointError, DataError
from megalodon_jax.model import MegalodonLM
from megalodon_jax.model_state import split_model
from megalodon_jax.training import trainer
from megalodon_jax.training.metrics import read_metrics
from megalodon_jax.training.workdir_lock import LOCK_FILE_NAME, WorkdirLock
from test_metrics import _tensorboard_view
from test_train import small_config

CFG = MegalodonConfig(num_layers=1, model_dim=32, z_dim=16, value_dim=32, ffn_hidden_dim=64, chunk_size=8,
                      vocab_size=256, norm_num_groups=4, cema_ndim=4, dtype="float32")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def model():
  m = MegalodonLM(CFG, rngs=nnx.Rngs(0))
  m.eval()
  return m


def _flat(params) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _assert_same_params(a, b):
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


# ------------------------------------------------------------------------------------------------ the emulator

def test_emulator_maps_gs_urls_into_the_bucket_folder_and_has_no_append(fake_gcs):
  f = epath.Path("gs://b/run/x.txt")
  f.write_text("hi")
  assert open(os.path.join(fake_gcs, "b", "run", "x.txt")).read() == "hi"
  assert [p.name for p in epath.Path("gs://b").iterdir()] == ["run"] and f.is_file() and f.parent.is_dir()
  with pytest.raises(NotImplementedError):
    f.open("a")
  assert paths.glob_files("gs://b/**/*.txt") == ["gs://b/run/x.txt"] == paths.list_files("gs://b")
  assert os.listdir(".") == []  # the test's fresh working directory


def test_the_stray_folder_check_sees_what_os_makes_of_a_gs_url(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert not _stray_gs_folders(str(tmp_path))
  os.makedirs("gs://b/run")  # what the emulator's teardown check guards against
  assert _stray_gs_folders(str(tmp_path)) == [str(tmp_path / "gs:")]


# ------------------------------------------------------------------------------------------------ the trainer

@pytest.fixture(scope="module")
def straight_losses(tmp_path_factory, data_dir):
  """An uninterrupted local run: the reference of the interrupted remote one."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  trainer.train_and_evaluate(_train_config(data_dir), workdir, devices=jax.devices()[:1])
  return read_metrics(os.path.join(workdir, "metrics.jsonl"))


def _train_config(data_dir, **overrides):
  return small_config(data_dir, eval_every=4, eval_batches=1, num_samples=1, sample_len=8, **overrides)


def test_trainer_workdir_on_gcs_resumes_exactly_and_init_from_reads_it(fake_gcs, data_dir, straight_losses):
  workdir, root = "gs://b/run", local_path(fake_gcs, "gs://b/run")
  cfg = _train_config(data_dir, tensorboard=True)
  # Stopped after step 5 as by a SIGTERM (the trainer's preemption path saves the step and returns).
  with pytest.MonkeyPatch.context() as preempt:  # its own: fake_gcs's patches must stay
    preempt.setattr(trainer.PreemptionFlag, "check", lambda self, step: step == 5)
    trainer.train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])
  assert sorted(os.listdir(os.path.join(root, "checkpoints"))) == ["4", "5"]
  assert max(r["step"] for r in read_metrics(os.path.join(root, "metrics.jsonl"))) == 5
  trainer.train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])

  assert {"config.json", "metrics.jsonl", "samples.jsonl", "shardings.txt", "tensorboard",
          "checkpoints"} <= set(os.listdir(root))
  assert json.loads(open(os.path.join(root, "config.json")).read())["total_steps"] == 8
  assert "# mesh" in open(os.path.join(root, "shardings.txt")).read()
  assert read_metrics("gs://b/run/metrics.jsonl") == read_metrics(os.path.join(root, "metrics.jsonl"))
  got = read_metrics(os.path.join(root, "metrics.jsonl"))
  loss = lambda records: {r["step"]: r["loss"] for r in records if "loss" in r}  # noqa: E731
  assert sorted(loss(got)) == list(range(1, 9)) and loss(got) == loss(straight_losses)  # bitwise
  evals = lambda records: {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}  # noqa: E731
  assert evals(got) == evals(straight_losses)
  samples = [json.loads(line) for line in open(os.path.join(root, "samples.jsonl"))]
  assert [s["step"] for s in samples] == [4, 8] and all(s["text"] for s in samples)
  scalars, texts, _ = _tensorboard_view(root)
  assert scalars["loss"] == pytest.approx(loss(got), rel=1e-6) and set(texts["sample_0/text_summary"]) == {4, 8}
  assert sorted(os.listdir(os.path.join(root, "checkpoints"))) == ["4", "5", "8"]  # checkpoint_keep 3
  assert os.path.isfile(os.path.join(root, "checkpoints", "8", "commit_success.txt"))  # orbax's GCS atomicity

  # init_from a gs:// run: its first eval is the source run's last.
  trainer.train_and_evaluate(_train_config(data_dir, total_steps=4, init_from="gs://b/run/checkpoints"),
                             "gs://b/run2", devices=jax.devices()[:1])
  first = read_metrics("gs://b/run2/metrics.jsonl")[0]
  assert first["step"] == 0 and first["eval_loss"] == pytest.approx(evals(got)[8], rel=1e-6)
  assert os.listdir(".") == []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # reads that end after the failure
def test_trainer_on_gcs_takes_the_lock_and_sets_a_damaged_step_aside(fake_gcs, data_dir, straight_losses, caplog):
  """The workdir lock and the damaged-step fallback on gs://: a held lock refuses the run (nothing written), a
  stale one (another host, old heartbeat) is taken over, and a truncated newest step is renamed aside in the bucket
  while the run resumes from the previous step and ends bit for bit like the uninterrupted run."""
  workdir, root = "gs://b/held", local_path(fake_gcs, "gs://b/held")
  cfg = _train_config(data_dir)
  holder = WorkdirLock(workdir).acquire()  # a live run (this process)
  with pytest.raises(CheckpointError, match=rf"in use by another training run \(host .*, pid {os.getpid()}, started "):
    trainer.train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])
  assert sorted(os.listdir(root)) == [LOCK_FILE_NAME]
  holder.release()
  epath.Path(f"{workdir}/{LOCK_FILE_NAME}").write_text(json.dumps(
      {"format": 1, "host": "another-host", "pid": 1, "proc_start_ticks": None, "started_at": "2026-01-01T00:00:00Z",
       "run_id": "0" * 32, "heartbeat": time.time() - 3600}))
  with pytest.MonkeyPatch.context() as preempt:  # stopped after step 5, as by a SIGTERM
    preempt.setattr(trainer.PreemptionFlag, "check", lambda self, step: step == 5)
    trainer.train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])
  assert "took over the lock" in caplog.text and "another-host" in caplog.text
  step5 = os.path.join(root, "checkpoints", "5", "state")
  data = [os.path.join(d, f) for d, _, fs in os.walk(step5) for f in fs if os.path.basename(d) == "d"]
  victim = max(data, key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 3)

  trainer.train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])
  names = sorted(os.listdir(os.path.join(root, "checkpoints")))
  aside = [n for n in names if n.startswith("5.corrupt-")]
  assert len(aside) == 1 and os.path.isfile(os.path.join(root, "checkpoints", aside[0], "state", "_METADATA"))
  assert "resumed from step 4" in caplog.text
  got = read_metrics(os.path.join(root, "metrics.jsonl"))
  loss = lambda records: {r["step"]: r["loss"] for r in records if "loss" in r}  # noqa: E731
  assert sorted(loss(got)) == list(range(1, 9)) and loss(got) == loss(straight_losses)  # bitwise
  assert not os.path.exists(os.path.join(root, LOCK_FILE_NAME))
  assert os.listdir(".") == []


# ------------------------------------------------------------------------------------------------ data files

def test_text_files_on_gcs_are_the_local_documents(fake_gcs, tmp_path):
  local = tmp_path / "corpus"
  for name, text in {"a.txt": "first\nsecond\n", "sub/b.txt": "x" * 50 + "\nyy\n", "sub/.hidden": "no",
                     "c.md": "not matched"}.items():
    (local / name).parent.mkdir(parents=True, exist_ok=True)
    (local / name).write_text(text)
    epath.Path(f"gs://b/corpus/{name}").write_text(text)
  for pattern in ("{}/**/*.txt", "{}/**/*", "{}", "{}/sub/b.txt,{}/a.txt"):
    here = text_files.text_files_documents(pattern.format(local, local), 20.0, 0)
    there = text_files.text_files_documents(pattern.format("gs://b/corpus", "gs://b/corpus"), 20.0, 0)
    names = [f.name[len(str(local)):] for f in here.files]
    assert names == [f.name[len("gs://b/corpus"):] for f in there.files] and "/sub/.hidden" not in names
    for a, b in zip(here.files, there.files):  # the whole file, and both sides of the position rule's cut
      assert a.size == b.size
      for part in ("", "head", "tail"):
        assert (text_files.read_part(dataclasses.replace(a, part=part), 20.0) ==
                text_files.read_part(dataclasses.replace(b, part=part), 20.0))


def test_jsonl_files_on_gcs_decompress_like_local_ones(fake_gcs, tmp_path):
  import gzip  # pylint: disable=import-outside-toplevel
  import zstandard  # pylint: disable=import-outside-toplevel
  raw = b"".join(json.dumps({"text": f"doc {i}"}).encode() + b"\n" for i in range(5))
  for name, data in (("a.jsonl", raw), ("b.jsonl.gz", gzip.compress(raw)),
                     ("c.jsonl.zst", zstandard.ZstdCompressor().compress(raw))):
    epath.Path(f"gs://b/j/{name}").write_bytes(data)
    with jsonl.open_lines(f"gs://b/j/{name}") as lines:
      assert b"".join(lines) == raw, name


def test_sentencepiece_model_on_gcs_and_a_remote_data_dir_is_refused(fake_gcs, tmp_path):
  prefix = tmp_path / "sp"
  lines = [f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)]
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=40,
                                 model_type="unigram", hard_vocab_limit=False, minloglevel=2)
  epath.Path("gs://b/tok/sp.model").write_bytes((tmp_path / "sp.model").read_bytes())
  sp = lambda path: ml_collections.ConfigDict(dict(tokenizer="sentencepiece", tokenizer_path=path))  # noqa: E731
  remote, here = make_tokenizer(sp("gs://b/tok/sp.model")), make_tokenizer(sp(str(prefix) + ".model"))
  text = "the lazy fox 17"
  assert remote.vocab_size == here.vocab_size and list(remote.encode(text)) == list(here.encode(text))
  assert remote.model_bytes() == (tmp_path / "sp.model").read_bytes()
  with pytest.raises(DataError, match="data.tokenizer_path="):
    make_tokenizer(sp("gs://b/tok/no.model"))
  with pytest.raises(DataError, match="data.data_dir='gs://b/tfds': .* must be a local folder"):
    check_data_config(ml_collections.ConfigDict(dict(dataset="stdlib", data_dir="gs://b/tfds")))


# ------------------------------------------------------------------------------------------------ the tools

def _cli(main, capsys, *argv):
  rc = main(list(argv))
  out, err = capsys.readouterr()
  return rc, out, err


def test_evaluate_reads_and_writes_gcs(fake_gcs, model, capsys, tmp_path):
  save_params_checkpoint("gs://b/params", model)  # the remote branch of model_io.atomic_output
  docs = [b"long context evaluation streams documents; " * n for n in (2, 3)]
  for i, d in enumerate(docs):
    epath.Path(f"gs://b/docs/d{i}.txt").write_bytes(d)
    (tmp_path / f"d{i}.txt").write_bytes(d)
  save_params_checkpoint(str(tmp_path / "params"), model)
  flags = ("--segment_len", "32", "--context_lengths", "32")
  rc, _, err = _cli(evaluate_cli.main, capsys, "--checkpoint", "gs://b/params", "--text_files", "gs://b/docs/*.txt",
                    "--output", "gs://b/out/report.json", "--plot", "gs://b/out/loss.png", *flags)
  assert rc == 0, err
  remote = json.loads(epath.Path("gs://b/out/report.json").read_text())
  assert open(local_path(fake_gcs, "gs://b/out/loss.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  rc, _, err = _cli(evaluate_cli.main, capsys, "--checkpoint", str(tmp_path / "params"), "--text_files",
                    str(tmp_path / "d*.txt"), "--output", str(tmp_path / "report.json"), *flags)
  assert rc == 0, err
  here = json.loads((tmp_path / "report.json").read_text())
  assert remote["documents"] == here["documents"] == 2 and remote["tokens"] == here["tokens"]
  assert remote["loss"] == here["loss"] and remote["by_context_length"] == here["by_context_length"]


def test_generate_prompt_file_and_output_jsonl_on_gcs(fake_gcs, model, capsys):
  save_params_checkpoint("gs://b/params", model)
  epath.Path("gs://b/prompts/p.txt").write_text("hello world")
  args = ("--checkpoint", "gs://b/params", "--max_new_tokens", "6", "--temperature", "0")
  rc, out, err = _cli(generate_cli.main, capsys, *args, "--prompt_file", "gs://b/prompts/p.txt",
                      "--output_jsonl", "gs://b/out/gen.jsonl")
  assert rc == 0, err
  rows = [json.loads(line) for line in epath.Path("gs://b/out/gen.jsonl").read_text().splitlines()]
  assert len(rows) == 1 and rows[0]["prompt"] == "hello world" and rows[0]["tokens"] == 6
  rc, same, err = _cli(generate_cli.main, capsys, *args, "--prompt", "hello world")
  assert rc == 0, err
  assert out == same and rows[0]["completion"] + "\n" == same  # greedy: the same completion as a local prompt


def test_convert_exports_to_gcs_and_imports_back(fake_gcs, model, capsys):
  save_params_checkpoint("gs://b/params", model)
  for fmt in ("official", "safetensors"):
    out = f"gs://b/export_{fmt}"
    rc, _, err = _cli(convert_cli.main, capsys, "to-pytorch", "--checkpoint", "gs://b/params", "--out", out,
                      "--format", fmt)
    assert rc == 0, err
    rc, _, err = _cli(convert_cli.main, capsys, "from-pytorch", "--torch", out, "--out", f"gs://b/imported_{fmt}")
    assert rc == 0, err
    _, abstract, _, _ = split_model(nnx.eval_shape(lambda: MegalodonLM(CFG, rngs=nnx.Rngs(1))))
    _assert_same_params(load_params(f"gs://b/imported_{fmt}", abstract), split_model(model)[1])
  # A remote --out holding a file no export writes is refused even with --overwrite (and the file is kept); an
  # earlier export is refused, then replaced with --overwrite.
  export = ("to-pytorch", "--checkpoint", "gs://b/params", "--out", "gs://b/export_official")
  epath.Path("gs://b/export_official/stale.txt").write_text("old")
  rc, _, err = _cli(convert_cli.main, capsys, *export, "--overwrite")
  assert rc == 2 and "stale.txt" in err and epath.Path("gs://b/export_official/stale.txt").read_text() == "old"
  epath.Path("gs://b/export_official/stale.txt").unlink()
  rc, _, err = _cli(convert_cli.main, capsys, *export)
  assert rc == 2 and "--overwrite" in err
  rc, _, err = _cli(convert_cli.main, capsys, *export, "--overwrite")
  assert rc == 0, err
  assert sorted(os.listdir(local_path(fake_gcs, "gs://b/export_official"))) == ["consolidated.pth", "params.json"]
  # --torch naming the file (its params.json is found beside it) and --config on gs:// too.
  rc, _, err = _cli(convert_cli.main, capsys, "from-pytorch", "--torch", "gs://b/export_official/consolidated.pth",
                    "--config", "gs://b/export_official/params.json", "--out", "gs://b/imported_file")
  assert rc == 0, err


def test_metrics_logger_sync_uploads_at_once(fake_gcs):
  """Remote logs are uploaded at most every 5 s, except by `sync` (the trainer calls it at every checkpoint), so a
  run killed after a checkpoint has its logs up to that checkpoint."""
  from megalodon_jax.training.metrics import MetricsLogger
  import io
  logger = MetricsLogger("gs://b/logs", tensorboard=False, stream=io.StringIO())
  remote = os.path.join(fake_gcs, "b", "logs", "metrics.jsonl")
  logger.log(1, {"loss": 2.0})  # the first write uploads
  logger.log(2, {"loss": 1.5})  # within 5 s: held back
  assert [r["step"] for r in read_metrics(remote)] == [1]
  logger.sync()
  assert [r["step"] for r in read_metrics(remote)] == [1, 2]
  logger.close()
