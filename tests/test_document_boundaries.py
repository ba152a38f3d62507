"""document_boundaries="reset" through the whole model: a packed window of several documents gives the logits,
loss and gradients of running each document separately from an empty state (the independent reference: the
model's plain no-boundary path, itself checked against the official fixtures), for the XLA CEMA paths and the
Pallas kernels (interpret mode) of CEMA and attention. Float32, 1e-5 relative."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from megalodon_jax.config import MegalodonConfig
from megalodon_jax.model import MegalodonLM
from megalodon_jax.training.loss import chunked_lm_loss

TINY = dict(num_layers=2, model_dim=32, z_dim=16, value_dim=32, ffn_hidden_dim=64, vocab_size=64, norm_num_groups=4,
            cema_ndim=4, num_heads=2, chunk_size=16, dtype="float32", matmul_precision="highest")
# Document lengths of two packed rows of 48 tokens (chunks of 16). Attention chunks are fixed by the window (as in
# the official model), so a document run alone has the same chunks only if it starts at a chunk start or ends
# inside the chunk it starts in; every document here does one or the other (docs/model.md#attention). Row 0:
# boundaries inside chunks and at chunk starts, 1-token documents; row 1: a document from a chunk start (16) over
# a chunk boundary (32), boundaries inside chunks.
LENGTHS = [[5, 11, 1, 1, 14, 16], [3, 13, 20, 2, 10]]
L = 48


def _rel(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def packed_positions() -> np.ndarray:
  rows = []
  for lengths in LENGTHS:
    assert sum(lengths) == L
    rows.append(np.concatenate([np.arange(n) for n in lengths]))
  return np.stack(rows).astype(np.int32)


def spans(r):
  start = 0
  for n in LENGTHS[r]:
    yield start, start + n
    start += n


def build(cema_impl="sequential", attention_impl="xla", **kw):
  model = MegalodonLM(MegalodonConfig(**TINY, cema_impl=cema_impl, attention_impl=attention_impl, **kw),
                      rngs=nnx.Rngs(3))
  model.eval()
  # Non-zero norm weights and priors so that every restarted quantity matters.
  for blk in model.layers:
    blk.mega.timenorm.weight[...] = jax.random.normal(jax.random.key(1), blk.mega.timenorm.weight.shape) * 0.1
  return model


IDS = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(2, L)), jnp.int32)
# Each position's next token (the last one wraps around; its target is masked as if a new document followed).
TARGETS = jnp.concatenate([IDS[:, 1:], IDS[:, :1]], axis=1)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, positions=None):
  return nnx.merge(graphdef, state)(IDS, positions=positions)


# The reference of every case: each document run alone, from an empty state, through the sequential CEMA
# recurrence and XLA attention without positions (the plain path, checked against the official fixtures; all
# implementations agree to float32 rounding there, tests/test_cema.py and test_pallas_*.py). The model is causal
# (CEMA, the cumulative timestep norm and chunk-causal attention only look back), so a document alone in a row of
# L tokens, right-padded, gives the same outputs at its own positions: the 11 documents run as one (11, L) batch,
# one program instead of one per document length.
REFERENCE = ("sequential", "xla")
DOCS = [(r, a, b) for r in range(2) for a, b in spans(r)]


def _documents_alone():
  """(11, L) ids (each document from position 0, then padding), next-token targets and their 0/1 weights."""
  ids, targets, weights = (np.zeros((len(DOCS), L), np.int32) for _ in range(3))
  ids_np = np.asarray(IDS)
  for i, (r, a, b) in enumerate(DOCS):
    ids[i, :b - a] = ids_np[r, a:b]
    targets[i, :b - a - 1] = ids_np[r, a + 1:b]  # a document's own targets: tokens a+1..b-1 predicted from a..b-2
    weights[i, :b - a - 1] = 1
  return jnp.asarray(ids), jnp.asarray(targets), jnp.asarray(weights)


def _split_params(model):
  return nnx.split(model, nnx.Param, ...)


@functools.lru_cache(maxsize=None)
def _reference():
  """(graphdef, params, rest) of the reference model, built once for every case."""
  return _split_params(build(*REFERENCE))


@functools.lru_cache(maxsize=None)
def reference_logits() -> np.ndarray:
  graphdef, params, rest = _reference()
  alone = np.asarray(jax.jit(lambda p, ids: nnx.merge(graphdef, p, rest)(ids))(params, _documents_alone()[0]))
  out = np.zeros((2, L, TINY["vocab_size"]), np.float64)
  for i, (r, a, b) in enumerate(DOCS):
    out[r, a:b] = alone[i, :b - a]
  return out


# Every CEMA implementation's resets are checked against separate runs, values and gradients, in
# test_cema_resets.py; here the model wiring: the default XLA paths (chunked on accelerators, fft on CPU), the
# sequential reference, and the Pallas kernels of both CEMA and attention together.
CASES = [("chunked", "xla"), ("fft", "xla"), ("sequential", "xla"), ("pallas", "pallas")]


@pytest.mark.parametrize("cema_impl,attention_impl", CASES)
def test_packed_logits_equal_each_document_alone(cema_impl, attention_impl):
  model = build(cema_impl, attention_impl)
  graphdef, state = nnx.split(model)
  packed = _forward(graphdef, state, jnp.asarray(packed_positions()))
  assert _rel(packed, reference_logits()) <= 1e-5
  assert _rel(_forward(graphdef, state), packed) > 1e-3  # without boundaries the later documents see the earlier ones


@functools.lru_cache(maxsize=None)
def reference_loss_and_grads():
  """The loss summed over the documents run alone, each predicting only its own next tokens, and its gradients
  (the reference model's parameters are every case's: the same config but for the implementations, the same
  seed; the test checks it)."""
  graphdef, params, rest = _reference()
  ids, targets, weights = _documents_alone()

  def separate_loss(params):
    m = nnx.merge(graphdef, params, rest)
    return chunked_lm_loss(m.head, m.features(ids), targets, 0, weights)[0]

  return jax.jit(jax.value_and_grad(separate_loss))(params)


def _target_mask():
  pos = packed_positions()
  nxt = np.concatenate([pos[:, 1:], np.zeros((2, 1), np.int32)], axis=1)  # the next token's position (0: new doc)
  return jnp.asarray(nxt != 0, jnp.int32)


@pytest.mark.parametrize("cema_impl,attention_impl", [("chunked", "xla"), ("pallas", "pallas")])
def test_packed_loss_and_gradients_equal_the_documents_summed(cema_impl, attention_impl):
  """The masked loss skips each document's first target (predicted from the previous document); its sum and
  gradients equal those of the documents run alone, each predicting only its own next tokens."""
  model = build(cema_impl, attention_impl)
  graphdef, params, rest = _split_params(model)
  positions = jnp.asarray(packed_positions())
  mask = _target_mask()

  def packed_loss(params):
    m = nnx.merge(graphdef, params, rest)
    return chunked_lm_loss(m.head, m.features(IDS, positions=positions), TARGETS, 16, mask)[0]

  assert int(jnp.sum(mask)) == sum(b - a - 1 for r in range(2) for a, b in spans(r))
  v0, g0 = jax.jit(jax.value_and_grad(packed_loss))(params)
  v1, g1 = reference_loss_and_grads()
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(_reference()[1]), strict=True):
    np.testing.assert_array_equal(a, b)  # the same model but for its implementations
  assert _rel(v0, v1) <= 1e-5
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree_util.tree_leaves_with_path(g1)):
    assert _rel(a, b) <= 1e-5, jax.tree_util.keystr(path)


def test_streaming_across_a_boundary_equals_the_full_forward():
  model = build("chunked", "xla")
  positions = jnp.asarray(packed_positions())
  graphdef, state = nnx.split(model)
  full = _forward(graphdef, state, positions)
  # jitted: op by op, every op of the model was dispatched again for each piece length (minutes on CI)
  step = jax.jit(lambda s, ids, c, p: nnx.merge(graphdef, s)(ids, cache=c, positions=p))
  cache, outs, start = model.init_cache(2), [], 0
  for n in (3, 1, 13, 15, 16):  # pieces ending exactly at, just before and just after document boundaries
    logits, cache = step(state, IDS[:, start:start + n], cache, positions[:, start:start + n])
    outs.append(logits)
    start += n
  assert _rel(jnp.concatenate(outs, axis=1), full) <= 1e-5


def test_carry_path_is_unchanged_and_all_continuations_equal_no_boundaries():
  graphdef, state = nnx.split(build("chunked", "xla"))
  plain = _forward(graphdef, state)
  # A window that starts mid-document and never restarts: positions without a 0 give the no-boundary result.
  cont = jnp.asarray(np.arange(5, 5 + L)[None].repeat(2, 0), jnp.int32)
  assert _rel(_forward(graphdef, state, cont), plain) <= 1e-6
