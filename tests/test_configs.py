"""Every shipped config loads, describes the model it claims, and is validated before anything runs."""

import importlib

import pytest

from megalodon_jax.config import preset
from megalodon_jax.errors import ConfigError
from megalodon_jax.training.train_config import TrainConfig, check_inputs

CONFIGS = ["default", "tiny", "enwik8", "mega200m", "mega1_3b", "megalodon_7b", "llama2_7b", "megalodon_1m_stdlib"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_builds_a_model_config(name):
  cfg = importlib.import_module(f"megalodon_jax.configs.{name}").get_config()
  vocab = 32000 if cfg.data.tokenizer == "sentencepiece" else 256
  model = TrainConfig.of(cfg).model_config(vocab)
  assert model.vocab_size == vocab
  assert cfg.seq_len <= model.chunk_size or cfg.seq_len % model.chunk_size == 0


@pytest.mark.parametrize("name, preset_name", [("mega200m", "mega200M"), ("mega1_3b", "mega1.3B"),
                                               ("megalodon_7b", "megalodon_7b")])
def test_large_configs_have_the_official_shapes_and_the_paper_recipe(name, preset_name):
  cfg = importlib.import_module(f"megalodon_jax.configs.{name}").get_config()
  model = TrainConfig.of(cfg).model_config(32000)
  assert model.num_params() == preset(preset_name).num_params()
  assert model.official_kwargs() == preset(preset_name).official_kwargs()
  o = cfg.optimizer
  assert (o.lr, o.warmup_steps, o.scheduler, o.b1, o.b2, o.weight_decay, o.clip) == \
      (3.5e-4, 2500, "cosine", 0.9, 0.95, 0.1, 1.0)
  if name == "megalodon_7b":  # paper §4.1: 32K context, chunk 4096, RoPE base 1e5, 4M tokens per step
    assert (cfg.seq_len, model.chunk_size, model.rope_base) == (32768, 4096, 1e5)
    assert cfg.seq_len * cfg.batch_size == 4 * 1024 * 1024


@pytest.mark.parametrize("name", ["mega200m", "mega1_3b", "megalodon_7b", "llama2_7b"])
def test_large_configs_ask_for_their_tokenizer_and_dataset(name):
  cfg = importlib.import_module(f"megalodon_jax.configs.{name}").get_config()
  config = TrainConfig.of(cfg)
  config.check_devices(128)
  with pytest.raises(ConfigError, match=r"data\.(tokenizer_path|name)"):
    check_inputs(config)


def test_llama2_7b_is_llama2_with_megalodon_7b_run_settings():
  """Llama2-7B (6,738,415,616 parameters) on Megalodon-7B's mesh, batch, dtype, remat and scanned blocks, at 4K."""
  llama = TrainConfig.of(importlib.import_module("megalodon_jax.configs.llama2_7b").get_config())
  mega = TrainConfig.of(importlib.import_module("megalodon_jax.configs.megalodon_7b").get_config())
  m = llama.model_config(32000)
  assert llama.family == "llama" and m.num_params() == 6_738_415_616
  assert (m.num_layers, m.model_dim, m.num_heads, m.kv_heads, m.ffn_hidden_dim, m.vocab_size) == \
      (32, 4096, 32, 32, 11008, 32000)
  assert (m.norm_eps, m.effective_rope_base, m.share_emb) == (1e-5, 10000.0, False)
  mm = mega.model_config(32000)
  assert (m.dtype, m.param_dtype, m.remat_policy, m.scan_layers) == (mm.dtype, mm.param_dtype, mm.remat_policy,
                                                                     mm.scan_layers)
  assert (llama.mesh, llama.batch_size, llama.seq_len) == (mega.mesh, mega.batch_size, 4096)


def test_enwik8_without_the_file_or_network_names_manual_dir(tmp_path, monkeypatch):
  from megalodon_jax import data
  from megalodon_jax.data import enwik8
  cfg = importlib.import_module("megalodon_jax.configs.enwik8").get_config()
  cfg.data.manual_dir = str(tmp_path / "missing")
  cfg.data.data_dir = str(tmp_path / "tfds")
  check_inputs(TrainConfig.of(cfg))  # a missing file is not a config error: prepare() may still download it
  monkeypatch.setattr(enwik8, "_url", "http://127.0.0.1:9/enwik8.zip")  # no network: refused at once
  with pytest.raises(data.DataError, match=r"data\.manual_dir=.*enwik8\.zip"):
    data.prepare(cfg.data)


def test_model_errors_name_the_config_key():
  cfg = importlib.import_module("megalodon_jax.configs.tiny").get_config()
  cfg.model.norm_num_groups = 7
  with pytest.raises(ConfigError, match=r"--config\.model\.norm_num_groups=7: does not divide"):
    TrainConfig.of(cfg)
  cfg = importlib.import_module("megalodon_jax.configs.tiny").get_config()
  cfg.model.vocab_size = 100
  with pytest.raises(ConfigError, match=r"--config\.model\.vocab_size=100: is smaller"):
    TrainConfig.of(cfg).model_config(256)


def test_megalodon_1m_stdlib_is_the_head_to_head_cpu_recipe():
  """The reproducible Megalodon is the run of benchmarks/head_to_head.py's CPU protocol at its chosen rate (seed
  0): every field the benchmark sets, read from the benchmark's own protocol, is the same in the config file."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  import importlib.util  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "head_to_head.py")
  spec = importlib.util.spec_from_file_location("head_to_head_under_test", path)
  h2h = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = h2h  # its dataclasses look their module up
  spec.loader.exec_module(h2h)
  protocol = h2h.PROTOCOLS["cpu"]
  want = TrainConfig.of(h2h.train_config("megalodon", protocol.megalodon, protocol, lr=4e-3, steps=protocol.steps,
                                         seed=0, data_dir="", manual_dir=""))
  got = TrainConfig.of(importlib.import_module("megalodon_jax.configs.megalodon_1m_stdlib").get_config())
  assert got.model == want.model
  assert got.optimizer == want.optimizer
  for name in ("seq_len", "batch_size", "total_steps", "seed", "eval_every", "eval_batches"):
    assert getattr(got, name) == getattr(want, name), name
  for name in ("dataset", "tokenizer", "max_documents"):
    assert getattr(got.data, name) == getattr(want.data, name), name
  assert 4e-3 in protocol.lrs and dataclasses.is_dataclass(got.model)
