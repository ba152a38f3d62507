"""`TrainProgram` is the one public train program, and a model family plugs into it by registration alone.

The toy family below is a second, independent model (an embedding and a linear head): registered in `families`, it
is validated by the typed config, built, sharded, initialised and trained by the same program the trainer uses,
with no change to the program or the trainer; its loss is checked against a float64 NumPy evaluation of the same
parameters.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from megalodon_jax import families
from megalodon_jax.errors import ConfigError
from megalodon_jax.training.program import TrainProgram
from megalodon_jax.training.train_config import TrainConfig


@dataclasses.dataclass(frozen=True)
class ToyConfig:
  """A bigram model's config; vocab_size -1: the tokenizer's (so it is its own training section)."""
  vocab_size: int = -1
  width: int = 16
  chunk_size: int = 1  # no chunks: any length splits anywhere
  family: str = "toy"

  def with_vocab(self, tokenizer_vocab_size: int) -> "ToyConfig":
    return dataclasses.replace(self, vocab_size=tokenizer_vocab_size if self.vocab_size == -1 else self.vocab_size)

  def num_params(self) -> int:
    return 2 * self.vocab_size * self.width

  def official_kwargs(self) -> dict:
    return dataclasses.asdict(self)


class ToyLM(nnx.Module):
  """logits = embed[ids] @ head: no attention, no cache state."""

  def __init__(self, config: ToyConfig, *, rngs: nnx.Rngs):
    self.config = config
    init = nnx.initializers.normal(0.5)
    self.embed = nnx.Param(init(rngs.params(), (config.vocab_size, config.width)), logical_axes=("vocab", "embed"))
    self.out = nnx.Param(init(rngs.params(), (config.width, config.vocab_size)), logical_axes=("embed", "vocab"))

  def features(self, input_ids, *, positions=None):
    del positions
    return self.embed[...][input_ids]

  def head(self, features):
    return (features @ self.out[...]).astype(jnp.float32)

  def init_cache(self, batch_size: int, max_length=None):
    return ()

  def __call__(self, input_ids, cache=None):
    logits = self.head(self.features(input_ids))
    return logits if cache is None else (logits, cache)


def train_step_flops(config: ToyConfig, batch: int, seq_len: int, *, causal_attention: bool = False) -> float:
  del causal_attention
  return 3 * 2 * batch * seq_len * config.width * config.vocab_size


TOY = families.ModelFamily("toy", section=f"{__name__}:ToyConfig",
                           module=f"{__name__}:ToyLM", flops=__name__)


@pytest.fixture
def toy_family(monkeypatch):
  monkeypatch.setitem(families.FAMILIES, "toy", TOY)


def toy_config(**changes):
  cfg = importlib.import_module("megalodon_jax.configs.tiny").get_config().to_dict()
  cfg.update(model={"family": "toy", "width": 16}, seq_len=16, batch_size=8, total_steps=50,
             optimizer={**cfg["optimizer"], "lr": 0.1, "warmup_steps": 0, "clip": 0.0, "weight_decay": 0.0})
  cfg.update(changes)
  return cfg


def test_a_registered_family_trains_in_the_train_program(toy_family):
  program = TrainProgram.build(toy_config(), jax.devices(), vocab_size=32)
  assert isinstance(program.model_config, ToyConfig) and program.model_config.vocab_size == 32
  state = program.fresh_state()
  # Parameters sharded from their own metadata (embed's "embed" axis over fsdp = 8 devices), moments alike.
  assert state.params["embed"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  mu = state.opt_state[0].mu  # clip 0: adamw's (ScaleByAdamState, decay, schedule) alone
  assert mu["embed"].sharding.spec == state.params["embed"].sharding.spec

  rng = np.random.default_rng(0)
  ids = rng.integers(0, 32, (8, 17))
  batch = program.global_batch({"inputs": ids[:, :-1], "targets": ids[:, 1:]})
  embed = np.asarray(state.params["embed"][...], np.float64)
  out = np.asarray(state.params["out"][...], np.float64)
  logits = embed[ids[:, :-1]] @ out
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  want = np.mean(log_z - np.take_along_axis(logits, ids[:, 1:, None], -1)[..., 0])

  evaluated = program.eval_step(state, batch)
  np.testing.assert_allclose(float(evaluated["loss_sum"] / evaluated["tokens"]), want, rtol=1e-5)
  first = None
  for _ in range(30):
    state, metrics = program.train_step(state, batch)
    first = float(metrics["loss"]) if first is None else first
  assert abs(first - want) <= 1e-5 * want
  assert float(metrics["loss"]) < 0.5 * first  # it learns the fixed batch
  assert int(state.step) == 30
  assert program.train_step_flops() == train_step_flops(program.model_config, 8, 16)


def test_family_and_model_fields_are_validated_by_key(toy_family):
  with pytest.raises(ConfigError, match=r"--config\.model\.family='tyo': unknown model family \(did you mean toy\?\); "
                                        r"registered: megalodon, llama, toy"):
    TrainConfig.of(toy_config(model={"family": "tyo"}))
  with pytest.raises(ConfigError, match=r"unknown config key --config\.model\.num_layer\b"):
    TrainConfig.of(toy_config(model={"family": "toy", "num_layer": 2}))


def test_train_state_keeps_the_checkpoint_layout():
  """A TrainState saves as the dict of the runs written before it existed, and comes back from one."""
  program = TrainProgram.build(importlib.import_module("megalodon_jax.configs.tiny").get_config(), jax.devices()[:1],
                               vocab_size=256)
  tree = program.abstract_state.to_tree()
  assert list(tree) == ["step", "params", "buffers", "opt_state", "rng"]
  back = type(program.abstract_state).from_tree(tree)
  assert jax.tree.structure(back) == jax.tree.structure(program.abstract_state)


def test_the_trainer_runs_and_resumes_a_registered_family(toy_family, tmp_path):
  """The trainer loop, unchanged, trains the toy family, checkpoints it and resumes it: the resumed run's losses are
  the uninterrupted run's, bitwise."""
  from megalodon_jax.training import trainer  # pylint: disable=import-outside-toplevel
  from megalodon_jax.training.metrics import read_metrics  # pylint: disable=import-outside-toplevel

  starts = []

  def run(workdir, total_steps):
    cfg = toy_config(total_steps=total_steps, checkpoint_every=2, log_every=1, eval_every=2, eval_batches=1,
                     num_samples=1, sample_len=4, tensorboard=False, progress_bar="off", async_checkpointing=False)
    cfg["data"] = {**cfg["data"], "data_dir": str(tmp_path / "tfds"), "max_documents": 40}
    trainer.train_and_evaluate(cfg, str(workdir), devices=jax.devices()[:2], on_start=starts.append)
    return {r["step"]: r["loss"] for r in read_metrics(str(workdir / "metrics.jsonl")) if "loss" in r}

  straight = run(tmp_path / "straight", 4)
  shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")  # as if stopped after the save of step 2
  resumed = run(tmp_path / "resumed", 4)
  assert starts == [0, 2]  # the second run resumed from the checkpoint of step 2
  assert sorted(straight) == sorted(resumed) == [1, 2, 3, 4]
  assert resumed == straight
  assert straight[4] < straight[1]
  meta = json.loads((tmp_path / "straight" / "config.json").read_text())
  assert meta["model"] == {"vocab_size": -1, "width": 16, "chunk_size": 1, "family": "toy"}

