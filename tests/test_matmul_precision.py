"""`MegalodonConfig.matmul_precision` reaches every dot the model traces (forward, cached decode, LM head, loss,
gradients), read from the lowered StableHLO's `precision_config`, and is validated."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from megalodon_jax.config import ConfigError, MegalodonConfig
from megalodon_jax.model import MegalodonLM
from megalodon_jax.training.loss import chunked_lm_loss

# cema_impl="sequential" has no einsum of its own, so every dot below is one the setting governs (the other CEMA
# implementations' einsums are pinned to HIGHEST).
SMALL = dict(vocab_size=40, model_dim=32, num_layers=2, num_heads=2, z_dim=16, value_dim=32, ffn_hidden_dim=48,
             cema_ndim=4, chunk_size=8, norm_num_groups=4, cema_impl="sequential", attention_impl="xla")
_PRECISION = re.compile(r"precision = \[(\w+), (\w+)\]")


def _model(precision: str, **extra) -> MegalodonLM:
  return MegalodonLM(MegalodonConfig(**{**SMALL, **extra}, matmul_precision=precision), rngs=nnx.Rngs(0))


def _dot_precisions(fn, *args) -> list[str]:
  """The precision of every dot_general in the StableHLO of `jax.jit(fn)(*args)` (one entry per dot)."""
  text = jax.jit(fn).lower(*args).as_text()
  dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
  assert dots, "no dot_general in the program"
  out = []
  for line in dots:
    m = _PRECISION.search(line)
    out.append("DEFAULT" if m is None else m.group(1))  # no precision_config means DEFAULT
    assert m is None or m.group(1) == m.group(2), line
  return out


def _programs(model: MegalodonLM):
  """(name, fn, args) of the forward, a cached decode step, and the gradient of the chunked training loss."""
  graphdef, state = nnx.split(model)
  ids = jnp.arange(24, dtype=jnp.int32).reshape(2, 12) % SMALL["vocab_size"]

  def forward(state, ids):
    return nnx.merge(graphdef, state)(ids)

  def decode(state, ids):
    m = nnx.merge(graphdef, state)
    logits, _ = m(ids[:, :1], cache=m.init_cache(ids.shape[0]))
    return logits

  param_graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_grad(params, rest, ids):
    def loss(params):
      m = nnx.merge(param_graphdef, params, rest)
      total, count = chunked_lm_loss(m.head, m.features(ids[:, :-1]), ids[:, 1:], max_piece=4)
      return total / count
    return jax.grad(loss)(params)

  return [("forward", forward, (state, ids)), ("decode", decode, (state, ids)),
          ("loss_grad", loss_grad, (params, rest, ids))]


@pytest.mark.parametrize("precision,expected", [("highest", "HIGHEST"), ("high", "HIGH"), ("default", "DEFAULT")])
def test_every_model_dot_has_the_configured_precision(precision, expected):
  for name, fn, args in _programs(_model(precision)):
    found = _dot_precisions(fn, *args)
    assert set(found) == {expected}, f"{name}: {found}"


def test_default_follows_jax_own_setting():
  """"default" sets nothing: a surrounding jax setting applies (and "highest" overrides a lower one)."""
  _, forward, args = _programs(_model("default"))[0]
  with jax.default_matmul_precision("highest"):
    assert set(_dot_precisions(forward, *args)) == {"HIGHEST"}
  _, forward, args = _programs(_model("highest"))[0]
  with jax.default_matmul_precision("bfloat16"):
    assert set(_dot_precisions(forward, *args)) == {"HIGHEST"}


def test_cema_einsums_stay_highest_under_default():
  _, forward, args = _programs(_model("default", cema_impl="chunked"))[0]
  found = _dot_precisions(forward, *args)
  assert "HIGHEST" in found and "DEFAULT" in found, found  # CEMA pinned, the projections follow the setting


def test_float32_results_do_not_depend_on_the_setting_on_cpu():
  """On CPU float32 products are exact at any precision: the setting must not change the logits."""
  ids = jnp.arange(24, dtype=jnp.int32).reshape(2, 12) % SMALL["vocab_size"]
  a = _model("default")(ids)
  b = _model("highest")(ids)
  if jax.default_backend() == "cpu":
    assert jnp.array_equal(a, b)


@pytest.mark.parametrize("bad", ["fp32", "HIGHEST", "float32", None, 3])
def test_bad_values_are_rejected(bad):
  with pytest.raises(ConfigError, match=r"MegalodonConfig\.matmul_precision=.*'default', 'high', 'highest'"):
    MegalodonConfig(**SMALL, matmul_precision=bad)
