"""The Llama baseline in the same trainer as Megalodon: `--config.model.family=llama` on a shipped config, meshes of
8 simulated devices against one device (losses to 1e-5), exact resume, samples through its KV cache, loading its
checkpoint for inference, and the planner's TPU compile of its train step.
"""

import importlib
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from megalodon_jax.training import trainer
from megalodon_jax.training.metrics import read_metrics
from megalodon_jax.training.train_config import TrainConfig


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def llama_config(data_dir: str, **overrides):
  """configs/tiny.py with model.family=llama: 4 query heads sharing 2 key/value heads (so tensor=2 splits both)."""
  cfg = importlib.import_module("megalodon_jax.configs.tiny").get_config()
  cfg.model.family = "llama"
  cfg.model.num_layers = 2
  cfg.model.num_heads = 4
  cfg.model.num_kv_heads = 2
  cfg.data.data_dir = data_dir
  cfg.data.max_documents = 60
  cfg.seq_len = 64
  cfg.batch_size = 8
  cfg.total_steps = 8
  cfg.optimizer.warmup_steps = 2
  cfg.log_every = 1
  cfg.eval_every = 0
  cfg.num_samples = 0
  cfg.checkpoint_every = 4
  cfg.tensorboard = False
  cfg.progress_bar = "off"
  cfg.async_checkpointing = False
  cfg.update_from_flattened_dict(overrides)
  return cfg


def losses(workdir) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in read_metrics(os.path.join(str(workdir), "metrics.jsonl")) if "loss" in r}


def _run(cfg, workdir, devices, **kwargs):
  trainer.train_and_evaluate(cfg, str(workdir), devices=devices, **kwargs)
  return losses(workdir)


def test_a_shipped_config_runs_as_llama_naming_the_fields_it_ignores(caplog):
  cfg = importlib.import_module("megalodon_jax.configs.tiny").get_config()
  cfg.model.family = "llama"
  with caplog.at_level(logging.INFO, logger="megalodon_jax"):
    typed = TrainConfig.of(cfg)
  assert typed.family == "llama"
  m = typed.model_config(256)
  # Width, depth, heads, FFN size, vocabulary and norm settings come from the shipped config.
  assert (m.num_layers, m.model_dim, m.num_heads, m.ffn_hidden_dim, m.vocab_size, m.norm_eps) == (2, 64, 2, 128, 256,
                                                                                                 1e-5)
  lines = [r.getMessage() for r in caplog.records if "ignores" in r.getMessage()]
  assert len(lines) == 1, lines
  for name in ("z_dim=32", "value_dim=128", "cema_ndim=8", "chunk_size=64", "norm_num_groups=8"):
    assert name in lines[0]
  # And the other way round: a Llama-only field set on a Megalodon run is named too.
  cfg.model.family = "megalodon"
  cfg.model.num_kv_heads = 1
  with caplog.at_level(logging.INFO, logger="megalodon_jax"):
    TrainConfig.of(cfg)
  assert any("num_kv_heads=1" in r.getMessage() for r in caplog.records)


@pytest.fixture(scope="module")
def one_device_losses(tmp_path_factory, data_dir):
  cfg = llama_config(data_dir, **{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1})
  return _run(cfg, tmp_path_factory.mktemp("llama_one"), jax.devices()[:1])


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 4, 1), (2, 2, 2)], ids=str)
def test_llama_meshes_of_8_devices_match_one_device(tmp_path, data_dir, one_device_losses, mesh):
  cfg = llama_config(data_dir, **{"mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2]})
  got = _run(cfg, tmp_path, jax.devices())
  assert sorted(got) == sorted(one_device_losses) == list(range(1, 9))
  for step, loss in one_device_losses.items():
    assert abs(got[step] - loss) <= 1e-5 * abs(loss), (step, got[step], loss)
  assert one_device_losses[8] < one_device_losses[1]


def test_llama_resumes_exactly_samples_and_loads_for_inference(tmp_path, data_dir):
  """Train 8 steps with evaluation and samples (generation through the KV cache), resume a copy from step 4: the
  losses are the uninterrupted run's, bitwise; the checkpoint loads as a LlamaLM giving the trained logits."""
  from megalodon_jax.checkpoints.model_io import load_checkpoint  # pylint: disable=import-outside-toplevel
  from megalodon_jax.llama.model import LlamaLM  # pylint: disable=import-outside-toplevel

  starts = []
  cfg = llama_config(data_dir, eval_every=4, eval_batches=1, num_samples=1, sample_len=8)
  straight = _run(cfg, tmp_path / "straight", jax.devices()[:2], on_start=starts.append)
  shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "8")
  resumed = _run(cfg, tmp_path / "resumed", jax.devices()[:2], on_start=starts.append)
  assert starts == [0, 4]
  assert resumed == straight and sorted(straight) == list(range(1, 9))
  evals = [r for r in read_metrics(str(tmp_path / "straight" / "metrics.jsonl")) if "eval_loss" in r]
  assert evals and all(np.isfinite(r["eval_loss"]) for r in evals)

  model, config, step = load_checkpoint(str(tmp_path / "straight"))
  assert isinstance(model, LlamaLM) and step == 8 and config.num_kv_heads == 2
  ids = np.arange(16, dtype=np.int32)[None] % config.vocab_size
  full = np.asarray(model(ids))
  pieces, cache = [], model.init_cache(1, max_length=16)
  for a, b in ((0, 5), (5, 6), (6, 16)):
    logits, cache = model(ids[:, a:b], cache=cache)
    pieces.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=2e-5, rtol=2e-5)


def test_planner_compiles_the_llama_train_step_for_tpu(tmp_path):
  """The planner's real XLA:TPU compile of the Llama step (v5e-4, splash attention chosen for TPU): it fits, and
  the step time estimate is positive."""
  from megalodon_jax.aot import planner, programs, topology  # pylint: disable=import-outside-toplevel
  from megalodon_jax.training.program import TrainProgram  # pylint: disable=import-outside-toplevel
  from pallas_kernels.platform import target_platform  # pylint: disable=import-outside-toplevel

  cfg = importlib.import_module("megalodon_jax.configs.tiny").get_config()
  cfg.model.family = "llama"
  cfg.model.vocab_size = 32000
  cfg.seq_len = 256
  target = topology.resolve("v5e-4")
  with target_platform(target.platform):
    run = TrainProgram.build(cfg, list(target.devices), vocab_size=32000)
  with jax.set_mesh(run.mesh), target_platform(target.platform):
    program = programs.train_program(run)
  report = planner.compile_program(program, target, run.mesh, {"remat": run.model_config.remat_policy},
                                   dump_dir=str(tmp_path))
  assert report.compiled and report.fits, report.error
  assert report.temp_gib > 0


def test_planner_compiles_llama_generation_with_a_kv_cache_of_the_training_length():
  """megalodon-aot's prefill and decode programs for a Llama: the KV cache holds the training length or the prefill
  piece, the longer (its keys and values are LlamaConfig.kv_cache_bytes of that per sequence), and both programs
  compile for TPU."""
  from megalodon_jax.aot import planner, programs, topology  # pylint: disable=import-outside-toplevel
  from megalodon_jax.training.program import TrainProgram  # pylint: disable=import-outside-toplevel
  from pallas_kernels.platform import target_platform  # pylint: disable=import-outside-toplevel

  cfg = importlib.import_module("megalodon_jax.configs.tiny").get_config()
  cfg.model.family = "llama"
  cfg.model.num_heads = 4
  cfg.model.num_kv_heads = 2
  target = topology.resolve("v5e-4")
  with target_platform(target.platform):
    run = TrainProgram.build(cfg, list(target.devices), vocab_size=256)
  with jax.set_mesh(run.mesh), target_platform(target.platform):
    progs = programs.inference_programs(run)
  assert [p.name for p in progs] == ["prefill", "decode"]
  m = run.model_config
  per_seq = progs[0].shape["cache_bytes_per_seq"]
  context = max(cfg.seq_len, progs[0].shape["seq_len"])
  kv = m.kv_cache_bytes(context)
  assert kv <= per_seq <= kv + 4 * context + 16  # plus one int32 document id per slot and the counters
  for program in progs:
    report = planner.compile_program(program, target, run.mesh, {"remat": m.remat_policy})
    assert report.compiled and report.fits, report.error
