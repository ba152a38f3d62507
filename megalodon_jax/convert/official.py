"""Official PyTorch state dict ⇄ MegalodonLM (docs/export.md#official-key-map).

Every official key maps to one variable of the NNX model; torch Linear weights (out, in) become our kernels
(in, out). Buffers travel too: `rope.freqs` and the TimestepNorm priors (`prior_count` is int64 there).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from megalodon_jax.config import MegalodonConfig
from megalodon_jax.errors import StateDictError
from megalodon_jax.model import MegalodonLM


class Entry(NamedTuple):
  key: str  # official state-dict key
  path: tuple  # path of the variable in nnx.state(model)
  transpose: bool  # torch Linear weight (out, in) <-> kernel (in, out)
  shape: tuple  # official shape
  dtype: Any  # official dtype (NumPy)


def state_dict_entries(config: MegalodonConfig) -> list[Entry]:
  """The official keys of a model with this config, in the official order, with where each lives in ours."""
  c = config
  D, Z, E, F, N, G = c.model_dim, c.z_dim, c.value_dim, c.ffn_hidden_dim, c.cema_ndim, c.norm_num_groups
  f32, i64 = np.dtype(np.float32), np.dtype(np.int64)
  out: list[Entry] = []

  def add(key, path, shape, transpose=False, dtype=f32):
    out.append(Entry(key, tuple(path), transpose, tuple(shape), dtype))

  def timestep_norm(prefix, path):
    add(f"{prefix}.weight", path + ("weight",), (D,))
    add(f"{prefix}.bias", path + ("bias",), (D,))
    add(f"{prefix}.prior_count", path + ("prior_count",), (), dtype=i64)
    add(f"{prefix}.prior_mean", path + ("prior_mean",), (G,))
    add(f"{prefix}.prior_logv", path + ("prior_logv",), (G,))

  def linear(prefix, path, din, dout, bias):
    add(f"{prefix}.weight", path + ("kernel",), (dout, din), transpose=True)
    if bias:
      add(f"{prefix}.bias", path + ("bias",), (dout,))

  add("embed.weight", ("embed", "weight"), (c.vocab_size, D))
  add("rope.freqs", ("rope_freqs",), (c.z_head_dim // 2,))
  for i in range(c.num_layers):
    m, p = f"layers.{i}.mega", ("layers", i, "mega")
    add(f"{m}.gamma", p + ("gamma",), (2, Z))
    add(f"{m}.beta", p + ("beta",), (2, Z))
    timestep_norm(f"{m}.timenorm", p + ("timenorm",))
    for name, shape in (("alpha", (D, N, 1)), ("delta", (D, N, 1)), ("theta", (D, 1, 1)), ("gamma", (D, N, 2)),
                        ("omega", (D, 1))):
      add(f"{m}.cema.{name}", p + ("cema", name), shape)
    if c.norm_affine:
      add(f"{m}.rmsnorm.weight", p + ("rmsnorm", "weight"), (D,))
    linear(f"{m}.wv", p + ("wv",), D, E, True)
    linear(f"{m}.wz", p + ("wz",), D, Z, True)
    linear(f"{m}.wr", p + ("wr",), D, E, True)
    linear(f"{m}.wh1", p + ("wh1",), D, D, True)
    linear(f"{m}.wh2", p + ("wh2",), E, D, False)
    f, q = f"layers.{i}.nffn", ("layers", i, "nffn")
    if c.rescale_nffn:
      add(f"{f}.alpha", q + ("alpha",), (D,))
    if c.norm_affine:
      add(f"{f}.norm.weight", q + ("norm", "weight"), (D,))
      add(f"{f}.norm.bias", q + ("norm", "bias"), (D,))
    linear(f"{f}.fc1", q + ("fc1",), D, F, False)
    linear(f"{f}.fc2", q + ("fc2",), F, D, False)
    if c.swiglu:
      linear(f"{f}.fc3", q + ("fc3",), D, F, False)
  timestep_norm("output.final_norm", ("final_norm",))
  # With share_emb the official state dict lists the tied table under both names.
  head_path = ("embed", "weight") if c.share_emb else ("output", "kernel")
  add("output.output.weight", head_path, (c.out_size, D), transpose=not c.share_emb)
  return out


def _to_numpy(t: Any) -> np.ndarray:
  """NumPy view of a numpy / torch / jax array (torch bfloat16 goes through float32, losslessly)."""
  if hasattr(t, "detach"):  # torch.Tensor, without importing torch
    t = t.detach().cpu()
    if str(t.dtype) == "torch.bfloat16":
      import ml_dtypes  # pylint: disable=import-outside-toplevel
      return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()
  return np.asarray(t)


def check_state_dict(tensors: Mapping[str, Any], config: MegalodonConfig) -> list[Entry]:
  """Raises StateDictError listing every missing, unexpected or mis-shaped key; returns the entries."""
  entries = state_dict_entries(config)
  expected = {e.key: e for e in entries}
  missing = [k for k in expected if k not in tensors]
  unexpected = sorted(k for k in tensors if k not in expected)
  misshaped = [f"{k}: got {tuple(np.shape(tensors[k]))}, expected {e.shape}"
               for k, e in expected.items() if k in tensors and tuple(np.shape(tensors[k])) != e.shape]
  problems = []
  if missing:
    problems.append(f"missing keys ({len(missing)}): {missing}")
  if unexpected:
    problems.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
  if misshaped:
    problems.append(f"mis-shaped keys ({len(misshaped)}): {misshaped}")
  if problems:
    raise StateDictError("state dict does not match the config "
                         f"(num_layers={config.num_layers}, model_dim={config.model_dim}, swiglu={config.swiglu}, "
                         f"rescale_nffn={config.rescale_nffn}, share_emb={config.share_emb}, "
                         f"norm_affine={config.norm_affine}):\n  " + "\n  ".join(problems))
  return entries


def from_official_state_dict(tensors: Mapping[str, Any], config: MegalodonConfig, *, seed: int = 0) -> MegalodonLM:
  """A MegalodonLM holding the official weights and buffers in `tensors` (official key -> numpy/torch array).

  Floating tensors are stored in `config.param_dtype`. Raises StateDictError on any key mismatch. `seed` seeds
  the dropout RNG streams, which exist only when the config sets a dropout rate.
  """
  entries = check_state_dict(tensors, config)
  if config.share_emb:
    emb, head = _to_numpy(tensors["embed.weight"]), _to_numpy(tensors["output.output.weight"])
    if not np.array_equal(emb, head):
      raise StateDictError("share_emb=True but output.output.weight differs from embed.weight; load it with "
                           "share_emb=False")
  abstract = nnx.eval_shape(lambda: MegalodonLM(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = dict(nnx.to_flat_state(state))
  for e in entries:
    if e.key == "output.output.weight" and config.share_emb:
      continue
    var = flat[e.path]
    value = _to_numpy(tensors[e.key])
    if e.transpose:
      value = value.T
    var.set_value(jnp.asarray(value, dtype=var.get_value().dtype))
  model = nnx.merge(graphdef, state)
  # The model was built abstractly (no weight init); its dropout RNG streams need concrete keys too.
  tags = sorted({s.key.tag for _, s in nnx.iter_graph(model) if isinstance(s, nnx.RngStream)})
  if tags:
    base = jax.random.key(seed)
    nnx.reseed(model, **{tag: jax.random.fold_in(base, i) for i, tag in enumerate(tags)})
  left = [p for p, v in nnx.to_flat_state(nnx.state(model)) if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
  if left:
    raise RuntimeError(f"from_official_state_dict: no value for model variables {left}")  # a converter bug
  return model


def to_official_state_dict(model: MegalodonLM) -> dict[str, np.ndarray]:
  """The official state dict of `model`: exact keys, shapes and dtypes (float32 weights unless stored otherwise,
  int64 `prior_count`), buffers included."""
  flat = dict(nnx.to_flat_state(nnx.state(model)))
  out: dict[str, np.ndarray] = {}
  for e in state_dict_entries(model.config):
    value = np.asarray(flat[e.path][...])
    if e.transpose:
      value = value.T
    if e.dtype == np.int64:
      value = value.astype(np.int64)
    elif value.dtype != np.float32 and model.config.param_dtype == "float32":
      value = value.astype(np.float32)
    out[e.key] = np.array(value, order="C")  # ascontiguousarray would turn 0-d buffers into 1-d
  return out

