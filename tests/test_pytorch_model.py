"""The pure-PyTorch model (`megalodon_jax.pytorch`) against the official model's own outputs.

References: the golden fixtures (tests/fixtures/official: official state dicts, logits and layer-0 intermediates)
and the official state-dict layout (docs/export.md#official-key-map) as saved by the official model. Nothing here
imports jax, and one test checks that in a fresh interpreter.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fixtures
from megalodon_jax import pytorch as mp

TOL = 1e-4  # max abs logits error, float32
BF16_TOL = 0.15  # max abs logits error of the bfloat16 model (logits reach |8|; measured 0.02-0.04)


def _sd(fx):
  return {k: torch.from_numpy(v.copy()) for k, v in fx.state_dict.items()}


def _model(fx, dtype=torch.float32):
  model = mp.Mega(mp.ModelConf.from_dict(fx.conf), init=False)
  result = model.load_state_dict(_sd(fx), strict=True)
  assert not result.missing_keys and not result.unexpected_keys
  return model.to(dtype).eval()


def _err(a, b):
  return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())


# ---------------------------------------------------------------------------------------------------------------
# Layout and full forward


@pytest.mark.parametrize("name", fixtures.CASES)
def test_state_dict_layout_is_the_official_one(name):
  fx = fixtures.cached(name)
  fresh = mp.Mega(mp.ModelConf.from_dict(fx.conf), generator=torch.Generator().manual_seed(0)).state_dict()
  assert sorted(fresh) == sorted(fx.state_dict)  # (safetensors files do not keep the key order)
  # The official order (docs/export.md#official-key-map): a module's own tensors, then its submodules in
  # construction order.
  layer0 = [k[len("layers.0."):] for k in fresh if k.startswith("layers.0.")]
  assert layer0[:9] == ["mega.gamma", "mega.beta", "mega.timenorm.weight", "mega.timenorm.bias",
                        "mega.timenorm.prior_count", "mega.timenorm.prior_mean", "mega.timenorm.prior_logv",
                        "mega.cema.alpha", "mega.cema.delta"]
  assert list(fresh)[:2] == ["embed.weight", "rope.freqs"] and list(fresh)[-1] == "output.output.weight"
  for k, v in fx.state_dict.items():
    assert tuple(fresh[k].shape) == v.shape and str(fresh[k].dtype) == f"torch.{v.dtype}", k
  # The RoPE buffer a fresh model builds is bit for bit the official one; priors are the official zeros.
  assert torch.equal(fresh["rope.freqs"], torch.from_numpy(fx.state_dict["rope.freqs"]))
  assert int(fresh["output.final_norm.prior_count"]) == 0 and fresh["output.final_norm.prior_count"].dim() == 0
  if fx.conf.get("share_emb"):
    model = _model(fx)
    assert model.output.output.weight is model.embed.weight


@pytest.mark.parametrize("name", fixtures.CASES)
def test_full_forward_matches_official_logits(name):
  fx = fixtures.cached(name)
  with torch.no_grad():
    logits, cache = _model(fx)(torch.from_numpy(fx.input_ids))
  assert cache is None and logits.dtype == torch.float32 and tuple(logits.shape) == fx.logits.shape
  err = _err(logits, fx.logits)
  print(f"{name}: full forward max abs error {err:.3g}")
  assert err <= TOL


@pytest.mark.parametrize("name", fixtures.CASES)
def test_layer0_intermediates_match_official(name):
  fx = fixtures.cached(name)
  model = _model(fx)
  layer = model.layers[0]
  with torch.no_grad():
    x = model.embed(torch.from_numpy(fx.input_ids))
    if fx.conf.get("scale_emb"):
      x = x * math.sqrt(fx.conf["model_dim"])
    xn = layer.mega.timenorm(x)[0]
    # The fixture keeps CEMA's output in the official (B, D, L) layout; ours is (B, L, D).
    got = {"timenorm_out": xn, "cema_out": layer.mega.cema(xn)[0].transpose(1, 2),
           "attention_block_out": layer.mega(x, model.rope)[0], "block_out": layer(x, model.rope)[0]}
  for key, value in got.items():
    assert _err(value, fx.debug[key]) <= TOL, key


# ---------------------------------------------------------------------------------------------------------------
# Streaming


def _stream(model, ids, pieces):
  cache = model.init_cache(ids.shape[0])
  outs, i = [], 0
  with torch.no_grad():
    for n in pieces:
      if i >= ids.shape[1]:
        break
      logits, cache = model(ids[:, i:i + n], cache)
      outs.append(logits)
      i += n
  return torch.cat(outs, 1), cache


@pytest.mark.parametrize("split", fixtures.STREAM_SPLITS)
@pytest.mark.parametrize("name", fixtures.CASES)
def test_streaming_in_any_split_matches_full_forward(name, split):
  fx = fixtures.cached(name)
  model = _model(fx)
  ids = torch.from_numpy(fx.input_ids)
  chunk = fx.conf["chunk_size"]
  logits, cache = _stream(model, ids, fixtures.stream_splits(ids.shape[1], chunk)[split])
  err = _err(logits, fx.logits)
  print(f"{name}/{split}: streaming max abs error {err:.3g}")
  assert err <= TOL
  layers, final = cache
  left = ids.shape[1] % chunk
  for (k, v, count), (n, mean, var), hx in layers:
    assert count == left and k.shape[1] == left and v.shape[1] == left  # KV of the unfinished chunk only
    assert n.tolist() == [ids.shape[1]] * ids.shape[0] and mean.dtype == var.dtype == torch.float32
    assert hx.dtype == torch.complex64 and tuple(hx.shape) == (ids.shape[0], fx.conf["model_dim"],
                                                                 fx.conf["cema_ndim"])
  assert final[0].tolist() == [ids.shape[1]] * ids.shape[0]


def test_streaming_accepts_the_official_initial_cache_layout():
  """The official init_cache: empty K/V, (None, None, None) norm states, None CEMA state."""
  fx = fixtures.cached("tiny_tied")
  model = _model(fx)
  ids = torch.from_numpy(fx.input_ids)
  cfg = model.cfg
  official = ([((torch.empty(1, 0, cfg.num_heads, cfg.z_head_dim), torch.empty(1, 0, cfg.num_heads, cfg.v_head_dim),
                 0), (None, None, None), None) for _ in range(cfg.num_layers)], (None, None, None))
  with torch.no_grad():
    first, cache = model(ids[:, :16], official)  # two whole chunks, as the official driver feeds them
    second, _ = model(ids[:, 16:21], cache)
  assert _err(torch.cat([first, second], 1), fx.logits[:, :21]) <= TOL


def test_long_random_stream_matches_full_forward():
  """A fresh (officially initialised) model, 300 tokens over 9+ chunks, in random piece sizes."""
  conf = dict(num_layers=2, model_dim=32, z_dim=16, value_dim=32, num_heads=2, ffn_hidden_dim=48, cema_ndim=4,
              chunk_size=32, norm_num_groups=4, vocab_size=50, swiglu=True)
  gen = torch.Generator().manual_seed(1)
  model = mp.Mega(conf, generator=gen).eval()
  ids = torch.randint(0, 50, (2, 300), generator=gen)
  with torch.no_grad():
    full, _ = model(ids)
  rng = np.random.default_rng(0)
  pieces = rng.integers(1, 80, size=300).tolist()
  streamed, cache = _stream(model, ids, pieces)
  assert _err(streamed, full) <= TOL
  assert cache[0][0][0][2] == 300 % 32


def _cema_reference(cema, u, h0):
  """The CEMA recurrence step by step in float64 (docs/model.md#cema). u: (B, L, D); h0: (B, D, N) complex."""
  n = cema.ndim
  p = torch.sigmoid(cema.alpha.double())[..., 0]
  mag = 1 - p * torch.sigmoid(cema.delta.double())[..., 0]
  angle = torch.sigmoid(cema.theta.double())[..., 0] * 2 * math.pi / n * torch.arange(1, n + 1, dtype=torch.float64)
  q = mag * torch.exp(1j * angle)
  g = torch.complex(cema.gamma[..., 0].double(), cema.gamma[..., 1].double()) / math.sqrt(n)
  h = h0.to(torch.complex128)
  ys = []
  for t in range(u.shape[1]):
    h = q * h + p * u[:, t, :, None].double()
    ys.append((g * h).sum(-1).real + cema.omega[:, 0].double() * u[:, t].double())
  return torch.stack(ys, 1), h


def _timestep_norm_reference(norm, x, count, mean, var):
  """The official one-step-at-a-time merge (docs/model.md#timestep-norm) in float64. x: (B, L, D)."""
  b, l, d = x.shape
  xg = x.double().view(b, l, norm.num_groups, -1)
  n, m, s = count.double()[:, None], mean.double(), var.double()
  out = []
  for t in range(l):
    mu, v = xg[:, t].mean(-1), xg[:, t].var(-1, unbiased=False)
    n1 = n + 1
    m, s = n / n1 * m + mu / n1, n / n1 * s + v / n1 + n / n1 / n1 * (mu - m) ** 2
    n = n1
    out.append((xg[:, t] - m[..., None]) / torch.sqrt(s[..., None] + norm.eps))
  y = torch.stack(out, 1).reshape(b, l, d) * (1 + norm.weight.double()) + norm.bias.double()
  return y, m, s


def test_cema_and_timestep_norm_match_step_by_step_references():
  gen = torch.Generator().manual_seed(0)
  model = mp.Mega(dict(num_layers=1, model_dim=16, z_dim=8, value_dim=16, num_heads=1, ffn_hidden_dim=16, cema_ndim=4,
                       chunk_size=8, norm_num_groups=4, vocab_size=10), generator=gen)
  mega = model.layers[0].mega
  with torch.no_grad():
    mega.cema.gamma[..., 1].normal_(generator=gen)  # a nonzero imaginary part (zero at init)
    for t in (mega.timenorm.weight, mega.timenorm.bias):
      t.normal_(0, 0.3, generator=gen)
    u = torch.randn(3, 77, 16, generator=gen)
    h0 = torch.randn(3, 16, 4, dtype=torch.complex64, generator=gen)
    for hx in (None, h0):
      y, h = mega.cema(u, hx, compute_last_state=True)
      y_ref, h_ref = _cema_reference(mega.cema, u, torch.zeros_like(h0) if hx is None else hx)
      assert _err(y, y_ref) <= 1e-4 and float((h - h_ref).abs().max()) <= 1e-4
    count, mean, var = torch.tensor([0, 5, 100]), torch.randn(3, 4, generator=gen), torch.rand(3, 4, generator=gen) + .5
    y, n, m, s = mega.timenorm(3 * u + 1, count, mean, var)
    y_ref, m_ref, s_ref = _timestep_norm_reference(mega.timenorm, 3 * u + 1, count, mean, var)
    assert _err(y, y_ref) <= 1e-4 and _err(m, m_ref) <= 1e-5 and _err(s, s_ref) <= 1e-4
    assert n.tolist() == [77, 82, 177] and n.dtype == torch.int64


def test_layerwise_checkpointing_gives_the_same_gradients():
  fx = fixtures.cached("tiny_tied")
  ids = torch.from_numpy(fx.input_ids)
  grads = []
  for ckpt in (False, True):
    model = mp.from_state_dict(_sd(fx), {**fx.conf, "layerwise_ckpt": ckpt}).train()
    model(ids)[0].logsumexp(-1).mean().backward()
    grads.append({k: p.grad for k, p in model.named_parameters()})
  for k, g in grads[0].items():
    assert torch.allclose(g, grads[1][k], rtol=1e-5, atol=1e-7), k


# ---------------------------------------------------------------------------------------------------------------
# bfloat16


@pytest.mark.parametrize("name", fixtures.CASES)
def test_bfloat16_model_stays_close(name):
  fx = fixtures.cached(name)
  model = _model(fx, torch.bfloat16)
  assert model.embed.weight.dtype == torch.bfloat16 and model.layers[0].mega.cema.alpha.dtype == torch.bfloat16
  assert model.rope.freqs.dtype == torch.float32  # RoPE frequencies are not rounded
  assert torch.equal(model.rope.freqs, torch.from_numpy(fx.state_dict["rope.freqs"]))
  ids = torch.from_numpy(fx.input_ids)
  with torch.no_grad():
    logits, _ = model(ids)
  assert logits.dtype == torch.float32
  err = _err(logits, fx.logits)
  print(f"{name}: bfloat16 max abs error {err:.3g} (max |logit| {np.abs(fx.logits).max():.2f})")
  assert err <= BF16_TOL
  # Streaming in bfloat16 follows the bfloat16 full forward (float32 carried statistics and CEMA state).
  streamed, _ = _stream(model, ids, [3, 5, 7] * 20)
  assert _err(streamed, logits) <= BF16_TOL


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint directories and their errors


def _write_dir(path, fx, fmt, sd=None):
  path.mkdir(parents=True, exist_ok=True)
  (path / "params.json").write_text(json.dumps(fx.conf))
  sd = _sd(fx) if sd is None else sd
  if fmt == "safetensors":
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
  else:
    torch.save(sd, path / "consolidated.pth")
  return path


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
@pytest.mark.parametrize("name", ["tiny_tied", "tiny_swiglu"])
def test_load_checkpoint_directory(tmp_path, name, fmt):
  fx = fixtures.cached(name)
  model = mp.load(_write_dir(tmp_path / "ckpt", fx, fmt))
  assert not model.training
  with torch.no_grad():
    logits, _ = model(torch.from_numpy(fx.input_ids))
  assert _err(logits, fx.logits) <= TOL
  bf16 = mp.load(tmp_path / "ckpt", device="cpu", dtype="bfloat16")
  assert bf16.embed.weight.dtype == torch.bfloat16
  # save() writes a directory load() reads back to the same tensors.
  again = mp.load(mp.save(model, tmp_path / "saved", format=fmt))
  for k, v in model.state_dict().items():
    assert torch.equal(again.state_dict()[k], v), k
  if fx.conf.get("share_emb"):
    assert again.output.output.weight is again.embed.weight


def test_vocab_size_is_taken_from_the_checkpoint(tmp_path):
  fx = fixtures.cached("tiny_short")
  conf = {k: v for k, v in fx.conf.items() if k != "vocab_size"}  # the official default -1
  model = mp.from_state_dict(_sd(fx), conf)
  assert model.cfg.vocab_size == fx.conf["vocab_size"]


def _load_error(path, exc=mp.CheckpointError):
  with pytest.raises(exc) as err:
    mp.load(path)
  return str(err.value)


def test_truncated_files_are_reported(tmp_path):
  fx = fixtures.cached("tiny_short")
  for fmt, fname in (("safetensors", "model.safetensors"), ("pth", "consolidated.pth")):
    d = _write_dir(tmp_path / fmt, fx, fmt)
    data = (d / fname).read_bytes()
    (d / fname).write_bytes(data[:len(data) // 2])
    msg = _load_error(d)
    assert fname in msg and "truncated" in msg, msg


def test_text_file_renamed_pth_is_reported(tmp_path):
  d = tmp_path / "ckpt"
  d.mkdir()
  (d / "params.json").write_text(json.dumps(fixtures.cached("tiny_short").conf))
  (d / "consolidated.pth").write_text("these are not the weights you are looking for\n")
  msg = _load_error(d)
  assert "consolidated.pth" in msg and "not a readable torch.save checkpoint" in msg, msg


def test_missing_files_are_reported(tmp_path):
  fx = fixtures.cached("tiny_short")
  d = _write_dir(tmp_path / "ckpt", fx, "pth")
  (d / "params.json").unlink()
  assert "missing params.json" in _load_error(d)
  d2 = tmp_path / "no_weights"
  d2.mkdir()
  (d2 / "params.json").write_text(json.dumps(fx.conf))
  msg = _load_error(d2)
  assert "no weights file" in msg and "model.safetensors" in msg and "consolidated.pth" in msg
  assert "not a directory" in _load_error(tmp_path / "nowhere")


def test_wrong_keys_are_all_listed(tmp_path):
  fx = fixtures.cached("tiny_swiglu")
  sd = _sd(fx)
  del sd["layers.1.mega.cema.omega"]
  del sd["rope.freqs"]
  sd["layers.0.mega.wh2.bias"] = torch.zeros(64)  # the official wh2 has no bias
  sd["extra.thing"] = torch.zeros(1)
  msg = _load_error(_write_dir(tmp_path / "ckpt", fx, "safetensors", sd))
  assert "model.safetensors" in msg
  assert "missing keys (2): ['rope.freqs', 'layers.1.mega.cema.omega']" in msg, msg
  assert "unexpected keys (2): ['extra.thing', 'layers.0.mega.wh2.bias']" in msg, msg


def test_wrong_shapes_are_all_listed(tmp_path):
  fx = fixtures.cached("tiny_swiglu")
  sd = _sd(fx)
  sd["layers.0.mega.wz.weight"] = sd["layers.0.mega.wz.weight"].T.contiguous()  # a JAX-layout kernel
  sd["layers.1.mega.cema.omega"] = sd["layers.1.mega.cema.omega"].reshape(-1)  # an HF-layout omega
  msg = _load_error(_write_dir(tmp_path / "ckpt", fx, "pth", sd))
  assert "mis-shaped keys (2)" in msg
  assert "layers.0.mega.wz.weight: got (64, 32), expected (32, 64)" in msg, msg
  assert "layers.1.mega.cema.omega: got (64,), expected (64, 1)" in msg, msg
  # The same checks guard from_state_dict; a mismatched config is caught the same way.
  with pytest.raises(mp.CheckpointError, match=r"missing keys \(\d+\): \['layers\.2\.mega\.gamma'"):
    mp.from_state_dict(_sd(fx), {**fx.conf, "num_layers": 3})
  with pytest.raises(mp.CheckpointError, match=r"unexpected keys \(2\): \['layers\.0\.nffn\.fc3\.weight'"):
    mp.from_state_dict(_sd(fx), {**fx.conf, "swiglu": False})


def test_bad_params_json_is_reported(tmp_path):
  fx = fixtures.cached("tiny_short")
  d = _write_dir(tmp_path / "ckpt", fx, "pth")
  (d / "params.json").write_text(json.dumps({**fx.conf, "modle_dim": 4}))
  msg = _load_error(d, mp.ConfigError)
  assert "params.json" in msg and "modle_dim" in msg
  (d / "params.json").write_text(json.dumps({**fx.conf, "z_dim": 25}))
  assert "z_dim=25" in _load_error(d, mp.ConfigError)
  (d / "params.json").write_text("{not json")
  assert "params.json: not a readable JSON file" in _load_error(d)


def test_config_defaults_and_validation():
  c = mp.ModelConf()
  official = dict(num_layers=8, model_dim=1024, z_dim=256, value_dim=2048, num_heads=1, ffn_hidden_dim=2048,
                  cema_ndim=16, chunk_size=2048, efficient_attn=None, init_mode="he", vocab_size=-1, output_size=-1,
                  norm_num_groups=32, norm_affine=True, norm_eps=1e-5, rope_base=None, dropout=0.0,
                  hidden_dropout=0.0, attention_dropout=0.0, swiglu=False, rescale_nffn=False, scale_emb=False,
                  share_emb=False, layerwise_ckpt=False)
  assert c.to_dict() == official
  assert mp.ModelConf.from_dict({"model": {"vocab_size": 7}, "optim": {}}).vocab_size == 7  # trainer config.json
  with pytest.raises(mp.ConfigError, match="vocab_size=-1"):
    mp.Mega(c)
  for bad, match in (({"num_heads": 3}, "not divisible by num_heads=3"), ({"norm_num_groups": 7}, "does not divide"),
                     ({"dropout": 1.0}, r"\[0, 1\)"), ({"efficient_attn": "flash"}, "efficient_attn"),
                     ({"swiglu": 1}, "true or false"), ({"share_emb": True, "vocab_size": 10, "output_size": 5},
                                                         "share_emb")):
    with pytest.raises(mp.ConfigError, match=match):
      mp.ModelConf(**bad)


def test_bad_tokens_are_rejected():
  model = _model(fixtures.cached("tiny_short"))
  with pytest.raises(ValueError, match=r"token id 100 at position \(0, 2\).*vocab_size=100"):
    model(torch.tensor([[0, 1, 100]]))
  with pytest.raises(TypeError, match="integers"):
    model(torch.zeros(1, 3))
  with pytest.raises(ValueError, match="batch size 2"):
    _, cache = model(torch.zeros(2, 3, dtype=torch.long), model.init_cache(2))
    model(torch.zeros(3, 1, dtype=torch.long), cache)


# ---------------------------------------------------------------------------------------------------------------
# Generation, dropout, the import boundary


def test_greedy_generate_equals_argmax_of_full_forward():
  fx = fixtures.cached("tiny_tied")  # chunk 8: the 12 new tokens cross chunk boundaries
  model = _model(fx)
  prompt = torch.from_numpy(fx.input_ids[:, :5])
  out = mp.generate(model, prompt, max_new_tokens=12)
  assert out.shape == (1, 17) and torch.equal(out[:, :5], prompt)
  seq = prompt
  with torch.no_grad():
    for _ in range(12):
      logits, _ = model(seq)
      seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
  assert torch.equal(out, seq)
  # Sampling: reproducible under a generator; top_k=1 is greedy.
  a = mp.generate(model, prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(3))
  b = mp.generate(model, prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(3))
  assert torch.equal(a, b)
  assert torch.equal(mp.generate(model, prompt, 6, temperature=0.7, top_k=1), out[:, :11])


def test_dropout_only_in_train_mode():
  fx = fixtures.cached("tiny_short")
  conf = {**fx.conf, "dropout": 0.1, "hidden_dropout": 0.1, "attention_dropout": 0.1}
  model = mp.from_state_dict(_sd(fx), conf)
  ids = torch.from_numpy(fx.input_ids)
  with torch.no_grad():
    assert _err(model(ids)[0], fx.logits) <= TOL  # eval mode: dropout off
    model.train()
    first, second = model(ids)[0], model(ids)[0]
  assert _err(first, second) > 1e-3 and _err(first, fx.logits) > 1e-3
  for attn in (None, "swift"):  # post-softmax dropout and DropKey
    m = mp.from_state_dict(_sd(fx), {**fx.conf, "attention_dropout": 0.5, "efficient_attn": attn}).train()
    with torch.no_grad():
      assert _err(m(ids)[0], fx.logits) > 1e-3


def test_import_does_not_import_jax():
  code = ("import sys, megalodon_jax.pytorch as mp; assert 'jax' not in sys.modules, 'jax imported'; "
          "assert 'flax' not in sys.modules; import megalodon_jax; assert 'jax' not in sys.modules; "
          "from megalodon_jax import MegalodonConfig; print(MegalodonConfig.__name__)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "MegalodonConfig"
