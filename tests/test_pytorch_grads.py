"""Gradients of the PyTorch model against the JAX model's, for the same official weights and batch.

One backward pass of the mean next-token cross-entropy, float32, a multi-chunk sequence. Every trainable
parameter is compared through the official key map (`state_dict_entries`; JAX kernels are transposed).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

import fixtures
from megalodon_jax import MegalodonConfig
from megalodon_jax.convert.official import from_official_state_dict, state_dict_entries
from megalodon_jax.pytorch import Mega, ModelConf

REL_TOL = 1e-3  # ||g_torch - g_jax|| / ||g_jax|| per parameter
WORST = {}  # name -> worst relative error, printed with -s


@functools.cache
def _fixture(name):
  return fixtures.load(name)


def _torch_grads(fx, ids):
  model = Mega(ModelConf.from_dict(fx.conf), init=False)
  model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in fx.state_dict.items()}, strict=True)
  model.train()  # the fixtures have no dropout, so train mode computes the same function
  ids_t = torch.from_numpy(ids)
  logits, _ = model(ids_t)
  loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids_t[:, 1:].reshape(-1))
  loss.backward()
  return float(loss.detach()), {k: p.grad.double().numpy() for k, p in model.named_parameters()}


def _jax_grads(fx, ids):
  config = MegalodonConfig.from_official(fx.conf, matmul_precision="highest")
  model = from_official_state_dict(fx.state_dict, config)
  ids_j = jnp.asarray(ids)

  def loss_fn(m):
    logits = m(ids_j)[:, :-1]
    targets = ids_j[:, 1:]
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.mean(log_z - picked)

  loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)  # compiled: much faster than op by op
  flat = dict(nnx.to_flat_state(grads))
  out = {}
  for e in state_dict_entries(config):
    if e.path not in flat:
      continue  # buffers (rope.freqs, TimestepNorm priors) have no gradient
    g = np.asarray(flat[e.path][...], np.float64)
    out[e.key] = g.T if e.transpose else g
  return float(loss), out


@pytest.mark.parametrize("name", ["tiny_swiglu", "tiny_tied"])
def test_every_parameter_gradient_matches_jax(name):
  fx = _fixture(name)
  ids = fx.input_ids
  assert ids.shape[1] > 2 * fx.conf["chunk_size"]  # several attention chunks
  loss_t, g_t = _torch_grads(fx, ids)
  loss_j, g_j = _jax_grads(fx, ids)
  assert abs(loss_t - loss_j) <= 1e-5 * abs(loss_j), (loss_t, loss_j)
  # The same trainable set: every official parameter key, the tied head counted once (as embed.weight).
  expected = {k for k in fx.state_dict if not k.endswith(("prior_count", "prior_mean", "prior_logv", "rope.freqs"))}
  if fx.conf.get("share_emb"):
    expected.discard("output.output.weight")
  assert set(g_t) == expected
  assert set(g_j) >= expected
  errors = {}
  for k in sorted(expected):
    assert g_t[k].shape == g_j[k].shape, k
    ref = np.linalg.norm(g_j[k])
    assert ref > 0, f"{k}: zero JAX gradient, the comparison would be vacuous"
    errors[k] = np.linalg.norm(g_t[k] - g_j[k]) / max(ref, 1e-30)
  worst = max(errors, key=errors.get)
  WORST[name] = (worst, errors[worst])
  print(f"{name}: worst gradient relative error {errors[worst]:.3g} ({worst}); loss {loss_t:.6f}")
  bad = {k: f"{v:.3g}" for k, v in errors.items() if not v <= REL_TOL}
  assert not bad, f"gradients differ beyond {REL_TOL}: {bad}"
  # The parameter types this covers (so a config change cannot silently drop one).
  kinds = {k.split(".", 2)[-1] if k.startswith("layers.") else k for k in expected}
  for kind in ("mega.cema.alpha", "mega.cema.delta", "mega.cema.theta", "mega.cema.gamma", "mega.cema.omega",
               "mega.timenorm.weight", "mega.gamma", "mega.beta", "mega.rmsnorm.weight", "mega.wz.weight",
               "mega.wh2.weight", "nffn.norm.weight", "nffn.fc1.weight", "nffn.fc2.weight",
               "output.final_norm.bias", "embed.weight"):
    assert kind in kinds, kind
  if name == "tiny_swiglu":
    assert {"nffn.fc3.weight", "nffn.alpha", "output.output.weight"} <= kinds
