"""The functional train and eval steps: next-token cross-entropy, gradient accumulation, one optimizer update.

The model is split once into a static graph and plain state (`split_model`); the jitted steps take and return a
`TrainState` pytree, so `jax.jit` can place every leaf with explicit in/out shardings and donate the old state.

The model's dropout RNG variables (`nnx.RngState`, typed keys) are not part of the state: dropout randomness is a
pure function of (rng, step), the step re-seeding the dropout stream with `fold_in(rng, step)`, so a resumed run
draws exactly the masks of an uninterrupted one and nothing random needs saving beyond `rng`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from megalodon_jax.model_state import merge_model
from megalodon_jax.training.loss import chunked_lm_loss, cross_entropy  # noqa: F401  (re-exported)



@struct.dataclass
class TrainState:
  """What a training step reads and writes, and what a checkpoint's `state` item holds (as `to_tree()`).

  step: () int32 updates applied.  params: nnx.State of the trainable Params (float32 master copy, `logical_axes`
  metadata).  buffers: nnx.State of the other saved variables (RoPE frequencies, TimestepNorm priors).
  opt_state: the optax state; its moments are Params too, carrying their parameter's `logical_axes`, so they shard
  like it (training/sharding.state_shardings).  rng: (2,) uint32 base key data.
  """

  step: Any
  params: Any
  buffers: Any
  opt_state: Any
  rng: Any

  def to_tree(self) -> dict[str, Any]:
    """The checkpoint layout: {"step", "params", "buffers", "opt_state", "rng"} (unchanged since the state was a
    dict, so runs saved before TrainState existed resume)."""
    return {f: getattr(self, f) for f in self.__dataclass_fields__}

  @classmethod
  def from_tree(cls, tree: dict[str, Any]) -> "TrainState":
    return cls(**tree)

# Positions whose logits exist at once in the loss: (B_local, 2048, V) float32 is 500 MiB at V = 32000, B = 2.
DEFAULT_LOSS_PIECE = 2048


def batch_loss(model: nnx.Module, batch: dict[str, jax.Array], loss_piece: int) -> tuple[jax.Array, jax.Array]:
  """(loss_sum, token_count) of a batch: {"inputs", "targets"} (B, L) int32, plus, for
  document_boundaries="reset", "positions" (the model restarts where it is 0) and "target_mask" (which targets count).
  """
  features = model.features(batch["inputs"], positions=batch.get("positions"))
  return chunked_lm_loss(model.head, features, batch["targets"], loss_piece, batch.get("target_mask"))


def _loss_fn(params: nnx.State, graphdef: nnx.GraphDef, buffers: nnx.State, rng_vars: nnx.State,
             batch: dict[str, jax.Array], dropout_key: jax.Array, loss_piece: int):
  """Mean token loss of one micro-batch (B, L), with its summed loss and token count (for exact accumulation)."""
  model = merge_model(graphdef, params, buffers, rng_vars)
  if _has_dropout(model):
    nnx.reseed(model, dropout=dropout_key)
  loss_sum, count = batch_loss(model, batch, loss_piece)
  return loss_sum / jnp.maximum(count, 1.0), (loss_sum, count)  # a micro-batch may count no target


def _has_dropout(model: nnx.Module) -> bool:
  return max(getattr(model.config, name, 0.0) for name in ("dropout", "hidden_dropout", "attention_dropout")) > 0


def init_state(params: nnx.State, buffers: nnx.State, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  """The train state at step 0. Call under `jax.jit` with out_shardings for a sharded init.

  rng: (2,) uint32 key data (`jax.random.key_data`), saved with the state.
  """
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, buffers=buffers, opt_state=tx.init(params),
                    rng=rng)


def make_train_step(graphdef: nnx.GraphDef, rng_vars: nnx.State, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, grad_accum_steps: int,
                    loss_piece: int = DEFAULT_LOSS_PIECE) -> Callable[[TrainState, dict[str, jax.Array]],
                                                                      tuple[TrainState, dict]]:
  """Builds `train_step(state, batch) -> (new_state, metrics)` (not yet jitted).

  batch: {"inputs": (B, L) int32, "targets": (B, L) int32} (plus "positions" and "target_mask" with
  document_boundaries="reset", see `batch_loss`), B divisible by `grad_accum_steps`; the micro-batches are
  consecutive slices of B/grad_accum_steps rows, their gradients combined as a token-weighted mean (a plain mean
  when every micro-batch counts all its tokens) and applied in one update.

  A non-finite loss or gradient leaves params and optimizer state unchanged (the step counter still advances)
  so the state the loop holds, and therefore any checkpoint, is always the last good one; the loop stops on
  seeing the non-finite loss in the metrics.

  loss_piece: positions whose logits are formed at once (training/loss.py); 0 = the whole sequence.

  metrics: loss (mean nats/token), grad_norm (global L2 norm before clipping), learning_rate (used by this
  update), all () float32.
  """
  grad_fn = jax.value_and_grad(_loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
    params, buffers, step = state.params, state.buffers, state.step
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)
    weighted = "target_mask" in batch  # token counts differ between micro-batches
    if grad_accum_steps == 1:
      (_, (loss_sum, count)), grads = grad_fn(params, graphdef, buffers, rng_vars, batch, key, loss_piece)
      loss = loss_sum / count
    else:
      b = batch["inputs"].shape[0] // grad_accum_steps
      micro = jax.tree.map(lambda x: x.reshape(grad_accum_steps, b, *x.shape[1:]), batch)

      def accumulate(carry, xs):
        g_acc, l_acc, n_acc = carry
        m, k = xs
        (_, (l_sum, n)), g = grad_fn(params, graphdef, buffers, rng_vars, m, k, loss_piece)
        # A micro-batch's mean-loss gradient weighs by its token count when counts differ.
        g_acc = jax.tree.map(lambda a, x: a + (x.astype(jnp.float32) * n if weighted else x.astype(jnp.float32)),
                             g_acc, g)
        return (g_acc, l_acc + l_sum, n_acc + n), None

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      keys = jax.random.split(key, grad_accum_steps)
      start = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
      (g_sum, loss_sum, count), _ = jax.lax.scan(accumulate, start, (micro, keys))
      norm = jnp.maximum(count, 1.0) if weighted else grad_accum_steps
      grads = jax.tree.map(lambda g, p: (g / norm).astype(p.dtype), g_sum, params)
      loss = loss_sum / count

    # The barrier keeps the optimizer's fusions from reading the layer scan's stacked gradients through per-layer
    # slices: each layer's update is then the same kernel, which XLA:TPU lowers once instead of once per layer.
    grads = jax.lax.optimization_barrier(grads)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt = tx.update(grads, state.opt_state, params)
    new_params = optax.apply_updates(params, updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    new_state = state.replace(step=step + 1, params=keep(new_params, params),
                              opt_state=keep(new_opt, state.opt_state))
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(step)}
    return new_state, metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, rng_vars: nnx.State,
                   loss_piece: int = DEFAULT_LOSS_PIECE) -> Callable[[TrainState, dict[str, jax.Array]], dict]:
  """Builds `eval_step(state, batch) -> {"loss_sum", "tokens"}` (() float32 each); dropout is off in eval."""

  def eval_step(state: TrainState, batch: dict[str, jax.Array]) -> dict:
    model = merge_model(graphdef, state.params, state.buffers, rng_vars)
    model.eval()
    loss_sum, count = batch_loss(model, batch, loss_piece)
    return {"loss_sum": loss_sum, "tokens": count}

  return eval_step
