"""The Llama baseline (megalodon_jax/llama/model.py) against Hugging Face `transformers` LlamaForCausalLM.

A small grouped-query config (4 query heads on 2 key/value heads, non-default RoPE base and RMSNorm epsilon),
HF weights drawn at random (larger than HF's init so every part of the model moves the logits), loaded into
LlamaLM through convert/hf_llama.from_hf_state_dict. Checked: logits (float32, matmul_precision="highest") within
1e-5 of HF's eager attention, untied and tied heads; the KV cache in uneven pieces equals the full forward; greedy
generation through the cache equals HF `generate`; packed documents (`positions`) equal each document run alone by
HF, also through the cache; parameter counts; the export folder loads in HF with no missing or unexpected keys and
gives the same logits; remat and scan_layers change nothing; bad caches raise; splash attention (Pallas interpret
mode) equals the einsum attention, and compiles for TPU when libtpu is present.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from megalodon_jax.convert import hf_llama  # noqa: E402  pylint: disable=wrong-import-position
from megalodon_jax.errors import ConvertError, StateDictError  # noqa: E402  pylint: disable=wrong-import-position
from megalodon_jax.llama.config import LlamaConfig  # noqa: E402  pylint: disable=wrong-import-position
from megalodon_jax.llama.model import LlamaLM  # noqa: E402  pylint: disable=wrong-import-position
from megalodon_jax.ops import full_attention as fa  # noqa: E402  pylint: disable=wrong-import-position

TOL = 1e-5
ROPE_BASE, EPS = 500.0, 1e-6
BATCH, LENGTH = 2, 16


def _config(share_emb: bool, **kw) -> LlamaConfig:
  return LlamaConfig(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, ffn_hidden_dim=96, vocab_size=97,
                     norm_eps=EPS, rope_base=ROPE_BASE, share_emb=share_emb, matmul_precision="highest",
                     full_attention_impl="xla", **kw)


def _hf_model(share_emb: bool):
  """A random LlamaForCausalLM (eager attention, float32), its config written out here, not by hf_llama."""
  hc = transformers.LlamaConfig(
      vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, head_dim=16, rms_norm_eps=EPS, rope_theta=ROPE_BASE, max_position_embeddings=64,
      tie_word_embeddings=share_emb, hidden_act="silu", attention_bias=False, mlp_bias=False,
      bos_token_id=None, eos_token_id=None, pad_token_id=None)
  torch.manual_seed(1 + share_emb)
  model = transformers.LlamaForCausalLM._from_config(hc, attn_implementation="eager", torch_dtype=torch.float32)  # pylint: disable=protected-access
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif "embed_tokens" in name:
        p.copy_(0.2 * torch.randn_like(p))
      else:
        p.copy_(0.12 * torch.randn_like(p))
  return model.eval()


def _load(config: LlamaConfig, hf) -> LlamaLM:
  model = LlamaLM(config, rngs=nnx.Rngs(0))
  nnx.update(model, hf_llama.from_hf_state_dict(hf.state_dict(), config))
  return model


@nnx.jit
def _forward(model, ids, positions=None):
  return model(ids, positions=positions)


@nnx.jit
def _step(model, ids, cache, positions=None):
  return model(ids, cache=cache, positions=positions)


def _hf_logits(hf, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return hf(torch.from_numpy(np.asarray(ids, np.int64))).logits.numpy()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def pair(request):
  share_emb = request.param
  hf = _hf_model(share_emb)
  config = _config(share_emb)
  ids = np.random.default_rng(0).integers(0, 97, (BATCH, LENGTH)).astype(np.int32)
  return config, hf, _load(config, hf), ids, _hf_logits(hf, ids)


@pytest.fixture(scope="module")
def untied():
  hf = _hf_model(False)
  config = _config(False)
  return config, hf, _load(config, hf)


def test_logits_equal_hf(pair):
  config, _, model, ids, ref = pair
  ours = np.asarray(model(jnp.asarray(ids)))
  assert ours.shape == (BATCH, LENGTH, config.vocab_size) and ours.dtype == np.float32
  assert np.abs(ref).max() > 1.0  # the random weights move the logits
  err = np.abs(ours - ref).max()
  print(f"max |logits - HF| = {err:.3g} (share_emb={config.share_emb})")
  assert err < TOL


def test_cache_pieces_equal_full_forward(pair):
  _, _, model, ids, ref = pair
  full = np.asarray(_forward(model, jnp.asarray(ids)))
  cache = model.init_cache(BATCH, max_length=LENGTH)  # filled exactly
  pieces, start = [], 0
  for size in (5, 1, 1, 9):
    logits, cache = _step(model, jnp.asarray(ids[:, start:start + size]), cache)
    pieces.append(np.asarray(logits))
    start += size
  assert int(cache.length) == LENGTH
  got = np.concatenate(pieces, axis=1)
  assert np.abs(got - full).max() < TOL and np.abs(got - ref).max() < TOL


def test_cache_under_jit_equals_full_forward(untied):
  config, hf, model = untied
  ids = np.random.default_rng(3).integers(0, 97, (BATCH, 12)).astype(np.int32)
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, ids, cache):
    return nnx.merge(graphdef, state)(ids, cache=cache)

  cache = model.init_cache(BATCH, max_length=20)
  a, cache = step(state, jnp.asarray(ids[:, :7]), cache)
  b, cache = step(state, jnp.asarray(ids[:, 7:]), cache)
  assert np.abs(np.concatenate([a, b], axis=1) - _hf_logits(hf, ids)).max() < TOL


def test_greedy_generation_equals_hf_generate(pair):
  _, hf, model, ids, _ = pair
  prompt, new = ids[:, :5], 8
  with torch.no_grad():
    expected = hf.generate(torch.from_numpy(prompt.astype(np.int64)), attention_mask=torch.ones(prompt.shape,
                           dtype=torch.int64), do_sample=False, max_new_tokens=new, pad_token_id=0,
                           eos_token_id=None).numpy()[:, 5:]
  assert expected.shape == (BATCH, new)
  cache = model.init_cache(BATCH, max_length=5 + new)
  logits, cache = _step(model, jnp.asarray(prompt), cache)
  last, _ = model(jnp.asarray(prompt), cache=model.init_cache(BATCH, max_length=5 + new), last_only=True)
  np.testing.assert_allclose(np.asarray(last), np.asarray(logits[:, -1:]), rtol=1e-5, atol=1e-5)
  tokens = []
  for i in range(new):
    tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    tokens.append(np.asarray(tok))
    if i + 1 < new:
      logits, cache = _step(model, tok[:, None], cache)
  np.testing.assert_array_equal(np.stack(tokens, axis=1), expected)


def test_packed_documents_equal_each_document_alone(untied):
  _, hf, model = untied
  rng = np.random.default_rng(5)
  first, second = rng.integers(0, 97, (1, 7)), rng.integers(0, 97, (1, 9))
  ids = np.concatenate([first, second], axis=1).astype(np.int32)
  positions = np.concatenate([np.arange(7), np.arange(9)])[None].astype(np.int32)
  ref = np.concatenate([_hf_logits(hf, first), _hf_logits(hf, second)], axis=1)
  got = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(positions)))
  assert np.abs(got - ref).max() < TOL
  # Without positions the second document sees the first (so the check above can fail).
  assert np.abs(np.asarray(_forward(model, jnp.asarray(ids)))[:, 7:] - ref[:, 7:]).max() > 1e-3
  # Through the cache, pieces straddling the boundary; the second call continues the first document.
  cache = model.init_cache(1, max_length=16)
  a, cache = _step(model, jnp.asarray(ids[:, :4]), cache, jnp.asarray(positions[:, :4]))
  b, cache = _step(model, jnp.asarray(ids[:, 4:6]), cache)  # no positions: the document goes on
  c, cache = _step(model, jnp.asarray(ids[:, 6:]), cache, jnp.asarray(positions[:, 6:]))
  assert np.abs(np.concatenate([a, b, c], axis=1) - ref).max() < TOL


def test_num_params_equals_ours_and_hf(pair):
  config, hf, model, _, _ = pair
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  theirs = sum(p.numel() for p in hf.parameters())
  assert config.num_params() == ours == theirs


def test_export_loads_in_hf_with_the_same_logits(pair, tmp_path):
  config, _, model, ids, _ = pair
  out = str(tmp_path / "hf")
  assert hf_llama.export_hf(model, out, max_position_embeddings=64) == ["model.safetensors", "config.json"]
  assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temporary sibling left
  loaded, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True,
                                                               attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  assert loaded.config.tie_word_embeddings == config.share_emb
  ours = np.asarray(_forward(model, jnp.asarray(ids)))
  assert np.abs(_hf_logits(loaded.eval(), ids) - ours).max() < TOL
  with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
    written = json.load(f)
  assert written["architectures"] == ["LlamaForCausalLM"] and written["num_key_value_heads"] == 2
  with pytest.raises(ConvertError):  # an existing output is replaced only with overwrite
    hf_llama.export_hf(model, out)
  hf_llama.export_hf(model, out, dtype="bfloat16", overwrite=True)
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  assert load_file(os.path.join(out, "model.safetensors"))["model.norm.weight"].dtype == torch.bfloat16


def test_round_trip_and_bad_state_dicts(untied):
  config, hf, model = untied
  sd = hf_llama.to_hf_state_dict(model, config)
  theirs = {k: v.numpy() for k, v in hf.state_dict().items()}
  assert sorted(sd) == sorted(theirs)
  assert all(np.array_equal(sd[k], theirs[k]) for k in sd)
  bad = dict(theirs)
  del bad["model.norm.weight"]
  bad["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
  with pytest.raises(StateDictError, match=r"missing model\.norm\.weight(.|\n)*k_proj\.weight: shape"):
    hf_llama.from_hf_state_dict(bad, config)


@pytest.mark.parametrize("changes", [dict(remat="full"), dict(remat="dots_saveable"), dict(scan_layers=True),
                                     dict(scan_layers=True, remat="full")], ids=lambda d: ",".join(map(str, d.items())))
def test_remat_and_scan_layers_change_nothing(untied, changes):
  config, hf, model = untied
  other = LlamaLM(config.replace(**changes), rngs=nnx.Rngs(1))
  nnx.update(other, nnx.state(model, nnx.Param))
  ids = jnp.asarray(np.random.default_rng(7).integers(0, 97, (BATCH, LENGTH)), jnp.int32)
  positions = jnp.asarray(np.concatenate([np.arange(6), np.arange(10)])[None].repeat(BATCH, 0), jnp.int32)
  for p in (None, positions):
    np.testing.assert_allclose(np.asarray(_forward(other, ids, p)), np.asarray(_forward(model, ids, p)), atol=TOL,
                               rtol=0)

  @nnx.jit
  def grads(m):
    return nnx.grad(lambda m: jnp.mean(m(ids, positions=positions) ** 2))(m)
  g_ref, g = jax.tree.leaves(grads(model)), jax.tree.leaves(grads(other))
  assert len(g) == len(g_ref) and all(np.allclose(a, b, atol=TOL, rtol=1e-4) for a, b in zip(g, g_ref))


def test_bad_caches_and_inputs_raise(untied):
  _, _, model = untied
  with pytest.raises(ValueError, match="capacity"):
    model.init_cache(2)
  with pytest.raises(ValueError, match="max_length"):
    model.init_cache(2, max_length=0)
  cache = model.init_cache(2, max_length=8)
  _, cache = model(jnp.zeros((2, 5), jnp.int32), cache=cache)
  with pytest.raises(ValueError, match="holds 5 of 8 tokens"):
    model(jnp.zeros((2, 4), jnp.int32), cache=cache)
  with pytest.raises(ValueError, match="batch size"):
    model(jnp.zeros((3, 1), jnp.int32), cache=cache)
  with pytest.raises(ValueError, match="outside"):
    model(jnp.full((2, 3), 97, jnp.int32))
  with pytest.raises(ValueError, match="positions"):
    model(jnp.zeros((2, 3), jnp.int32), positions=jnp.zeros((2, 4), jnp.int32))


def _attention_inputs(length: int):
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (2, length, 4, 32))
  k, v = (jax.random.normal(key, (2, length, 2, 32)) for key in keys[1:])
  positions = jnp.asarray(np.concatenate([np.arange(50), np.arange(length - 50)])[None].repeat(2, 0))
  return q, k, v, fa.segment_ids_from_positions(positions)


def test_xla_attention_equals_repeat_kv_reference():
  q, k, v, seg = _attention_inputs(64)
  kk, vv = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)  # HF repeat_kv: head n reads kv head n // 2
  s = jnp.einsum("bthd,bshd->bhts", q, kk, precision="highest") / np.sqrt(32)
  allowed = jnp.tril(jnp.ones((64, 64), bool))[None, None] & (seg[:, None, :, None] == seg[:, None, None, :])
  ref = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(jnp.where(allowed, s, -jnp.inf), -1), vv, precision="highest")
  with jax.default_matmul_precision("highest"):
    got = fa.full_attention(q, k, v, impl="xla", q_segment_ids=seg)
  assert np.abs(np.asarray(got - ref)).max() < 1e-5


@pytest.mark.parametrize("offset", [None, 64])
def test_query_blocked_xla_attention_equals_one_block(monkeypatch, offset):
  """Queries longer than QUERY_BLOCK go a rematerialised block at a time: the same outputs and gradients as the
  whole (T, S) block at once, with documents, grouped heads and a cache offset."""
  q, k, v, seg = _attention_inputs(256)
  kv_seg = seg
  if offset is not None:  # 192 queries after 64 cached slots
    q, seg = q[:, offset:], seg[:, offset:]

  def loss(q, k, v):
    with jax.default_matmul_precision("highest"):
      out = fa.xla_attention(q, k, v, q_offset=offset, q_segment_ids=seg, kv_segment_ids=kv_seg)
    return jnp.sum(out * jnp.cos(out)), out

  (_, whole), g_whole = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  monkeypatch.setattr(fa, "QUERY_BLOCK", 64)
  (_, blocked), g_blocked = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  assert "scan" in str(jax.make_jaxpr(lambda q: loss(q, k, v)[1])(q))  # the blocked path ran
  np.testing.assert_allclose(np.asarray(blocked), np.asarray(whole), atol=1e-5, rtol=1e-5)
  for a, b in zip(g_blocked, g_whole):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def test_splash_attention_equals_xla_in_interpret_mode():
  q, k, v, seg = _attention_inputs(128)
  with jax.default_matmul_precision("highest"):
    for ids in (None, seg):
      ref = fa.xla_attention(q, k, v, q_segment_ids=ids, kv_segment_ids=ids)
      got = fa.splash_attention(q, k, v, ids, interpret=True)
      assert np.abs(np.asarray(got - ref)).max() < 1e-5


def test_auto_falls_back_to_xla_where_kernels_do_not_apply():
  assert fa.resolve_full_attention_impl("auto", "tpu") == "splash"
  assert fa.resolve_full_attention_impl("auto", "gpu") == "cudnn"
  assert fa.resolve_full_attention_impl("auto", "cpu") == "xla"
  from pallas_kernels.platform import target_platform  # pylint: disable=import-outside-toplevel
  q, k, v, seg = _attention_inputs(64)
  ref = fa.xla_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg)
  with target_platform("tpu"):  # 64 is no multiple of splash's tile: xla runs (eagerly, on this CPU)
    np.testing.assert_array_equal(fa.full_attention(q, k, v, impl="splash", q_segment_ids=seg), ref)
    np.testing.assert_array_equal(fa.full_attention(q, k, v, impl="auto", q_segment_ids=seg), ref)
  with target_platform("gpu"):  # cudnn takes 16-bit inputs only, and no segment ids
    np.testing.assert_array_equal(fa.full_attention(q, k, v, impl="cudnn"), fa.xla_attention(q, k, v))
    np.testing.assert_array_equal(fa.full_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                                                    v.astype(jnp.bfloat16), impl="cudnn", q_segment_ids=seg),
                                  fa.xla_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                                                   v.astype(jnp.bfloat16), q_segment_ids=seg,
                                                   kv_segment_ids=seg))
  with pytest.raises(ValueError, match="runs on tpu only"):
    fa.full_attention(q, k, v, impl="splash")


def test_splash_attention_compiles_for_tpu():
  """Deviceless: the splash kernel (native Mosaic, not interpret mode), forward and backward with segment ids,
  under shard_map on a 2x2 v5e mesh splitting the batch (data) and the key/value heads (tensor)."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # a deviceless compile touches no TPU
  pytest.importorskip("libtpu", reason="deviceless TPU compilation needs libtpu")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel

  from megalodon_jax import mesh_axes  # pylint: disable=import-outside-toplevel
  from pallas_kernels.platform import target_platform  # pylint: disable=import-outside-toplevel
  topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
  mesh = topologies.make_mesh(topo, (2, 2), (mesh_axes.DATA, mesh_axes.TENSOR))
  b, t, h, kh, d = 4, 512, 8, 4, 128
  heads = P(mesh_axes.DATA, None, mesh_axes.TENSOR)
  q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16, sharding=NamedSharding(mesh, heads))
  k = jax.ShapeDtypeStruct((b, t, kh, d), jnp.bfloat16, sharding=NamedSharding(mesh, heads))
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=NamedSharding(mesh, P(mesh_axes.DATA)))

  def loss(q, k, v, seg):
    return fa.full_attention(q, k, v, impl="auto", q_segment_ids=seg).astype(jnp.float32).sum()

  with target_platform("tpu"), jax.set_mesh(mesh):
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, k, seg).lower(lowering_platforms=("tpu",))
    assert "tpu_custom_call" in lowered.as_text()  # the Mosaic kernel, not the einsum fallback
    lowered.compile()


def test_to_hf_llama_command_line(untied, tmp_path, capsys):
  """A params-only Llama checkpoint -> `megalodon-convert to-hf-llama` -> LlamaForCausalLM with HF's logits."""
  from megalodon_jax.checkpoints import model_io  # pylint: disable=import-outside-toplevel
  from megalodon_jax.cli import convert as cli  # pylint: disable=import-outside-toplevel
  config, hf, model = untied
  ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
  model_io.save_params_checkpoint(ckpt, model)
  assert cli.main(["to-hf-llama", "--checkpoint", ckpt, "--out", out, "--max_position_embeddings", "64"]) == 0
  assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]  # README.md: the model card
  loaded, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True,
                                                               attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  ids = np.random.default_rng(9).integers(0, 97, (1, 12))
  assert np.abs(_hf_logits(loaded.eval(), ids) - _hf_logits(hf, ids)).max() < TOL
  capsys.readouterr()
  assert cli.main(["to-hf-llama", "--checkpoint", ckpt, "--out", out]) == 2  # exists: --overwrite needed
  assert "--overwrite" in capsys.readouterr().err
  with open(os.path.join(out, "notes.txt"), "w", encoding="utf-8") as f:
    f.write("mine")
  assert cli.main(["to-hf-llama", "--checkpoint", ckpt, "--out", out, "--overwrite"]) == 2  # a foreign entry
  assert "notes.txt" in capsys.readouterr().err and os.path.exists(os.path.join(out, "notes.txt"))
  assert cli.main(["to-hf-llama", "--checkpoint", ckpt, "--out", os.path.join(ckpt, "x")]) == 2  # inside the input
  assert cli.main(["to-pytorch", "--checkpoint", ckpt, "--out", str(tmp_path / "pt")]) == 2  # the other family
  assert "to-hf-llama" in capsys.readouterr().err
