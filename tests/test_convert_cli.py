"""`python -m megalodon_jax.convert`: a real train.py checkpoint exported to PyTorch files and imported back.

References are independent of the converter under test: the checkpoint's params are read with the trainer's own
`checkpoints.params.load_params` into a concretely built model, and the tensor-parallel split dimensions are
restated here from docs/export.md#model-parallel-shards (the megalodon-hf mapping itself is tested in
test_convert_hf.py). Most commands run in-process through `cli.main`; one runs as a subprocess.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors

import fixtures
from megalodon_jax.checkpoints import layout, model_io
from megalodon_jax.checkpoints.params import load_params, save_params
from megalodon_jax.cli import convert as cli
from megalodon_jax.config import MegalodonConfig
from megalodon_jax.convert import (StateDictError, from_official_state_dict, hf, state_dict_entries,
                                   to_official_state_dict, tp_shards)
from megalodon_jax.model import MegalodonLM
from megalodon_jax.model_state import merge_model, split_model
from megalodon_jax.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- the train.py checkpoint and its references

@pytest.fixture(scope="module")
def run(tmp_path_factory) -> str:
  """A train.py workdir: 2 layers, 2 heads, untied head, checkpoints at steps 2 and 4."""
  cfg = importlib.import_module("megalodon_jax.configs.tiny").get_config()
  cfg.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
  cfg.data.max_documents = 60
  cfg.model.num_layers, cfg.model.chunk_size = 2, 32
  cfg.seq_len, cfg.batch_size, cfg.total_steps = 64, 8, 4
  cfg.optimizer.warmup_steps = 1
  cfg.checkpoint_every, cfg.log_every, cfg.eval_every, cfg.num_samples = 2, 1, 0, 0
  cfg.tensorboard, cfg.progress_bar, cfg.async_checkpointing = False, "off", False
  workdir = str(tmp_path_factory.mktemp("run"))
  trainer.train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])
  return workdir


def reference(workdir: str, step: int):
  """(model, config, params) of a step, via the trainer's own load_params into a concretely built model."""
  step_dir = os.path.join(workdir, "checkpoints", str(step))
  with open(os.path.join(step_dir, "meta", "metadata")) as f:
    config = MegalodonConfig.from_official(json.load(f)["model"])
  graphdef, params, buffers, rngs = split_model(MegalodonLM(config, rngs=nnx.Rngs(123)))
  params = load_params(step_dir, params)
  return merge_model(graphdef, params, buffers, rngs), config, params


@pytest.fixture(scope="module")
def ref4(run):
  return reference(run, 4)


@pytest.fixture(scope="module")
def official_dir(run, tmp_path_factory) -> str:
  out = str(tmp_path_factory.mktemp("export") / "official")
  assert cli.main(["to-pytorch", "--checkpoint", run, "--out", out]) == 0
  return out


_forward = nnx.jit(lambda model, ids: model(ids))  # one compile serves every model of the run's config


def logits(model, ids) -> np.ndarray:
  return np.asarray(_forward(model, ids))


def tokens(config, seed=0):
  return np.random.default_rng(seed).integers(0, config.vocab_size, (2, 64)).astype(np.int32)


def flat_params(params) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def assert_same_params(a, b):
  fa, fb = flat_params(a), flat_params(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    assert fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), k


def no_leftovers(parent) -> None:
  """Nothing half-written next to the output: no temp or aside folders."""
  left = [n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n or "orbax-checkpoint-tmp" in n]
  assert not left, left


def torch_dict(path) -> dict:
  return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- to-pytorch

def test_official_export_is_the_checkpoint_and_reproduces_the_logits(run, ref4, official_dir):
  model, config, _ = ref4
  sd = torch_dict(os.path.join(official_dir, "consolidated.pth"))
  want = to_official_state_dict(model)
  assert list(sd) == [e.key for e in state_dict_entries(config)]
  for k, v in sd.items():
    assert v.dtype == (torch.int64 if k.endswith("prior_count") else torch.float32), k
    assert np.array_equal(v.numpy(), want[k]), k
  with open(os.path.join(official_dir, "params.json")) as f:
    conf = json.load(f)
  assert conf == json.loads(json.dumps(config.official_kwargs()))
  back = from_official_state_dict(sd, MegalodonConfig.from_official(conf))
  ids = tokens(config)
  assert np.array_equal(logits(back, ids), logits(model, ids))


def test_step_selection_from_the_checkpoints_folder(run, ref4, tmp_path):
  out = str(tmp_path / "step2")
  assert cli.main(["to-pytorch", "--checkpoint", os.path.join(run, "checkpoints"), "--step", "2", "--out", out]) == 0
  sd = torch_dict(os.path.join(out, "consolidated.pth"))
  want2, want4 = to_official_state_dict(reference(run, 2)[0]), to_official_state_dict(ref4[0])
  assert all(np.array_equal(v.numpy(), want2[k]) for k, v in sd.items())
  assert not np.array_equal(sd["layers.0.mega.wz.weight"].numpy(), want4["layers.0.mega.wz.weight"])
  assert cli.main(["to-pytorch", "--checkpoint", run, "--step", "3", "--out", str(tmp_path / "x")]) == 2


def test_safetensors_export_and_bfloat16_cast(run, ref4, tmp_path):
  model, config, _ = ref4
  want = to_official_state_dict(model)
  out = str(tmp_path / "st")
  assert cli.main(["to-pytorch", "--checkpoint", run, "--out", out, "--format", "safetensors"]) == 0
  assert sorted(os.listdir(out)) == ["model.safetensors", "params.json"]
  st = load_safetensors(os.path.join(out, "model.safetensors"))
  assert st.keys() == want.keys() and all(np.array_equal(st[k].numpy(), want[k]) for k in want)
  back = from_official_state_dict(st, config)
  assert np.array_equal(logits(back, tokens(config)), logits(model, tokens(config)))

  out16 = str(tmp_path / "bf16")
  step_dir = os.path.join(run, "checkpoints", "4")
  assert cli.main(["to-pytorch", "--checkpoint", step_dir, "--out", out16, "--dtype", "bfloat16"]) == 0
  sd = torch_dict(os.path.join(out16, "consolidated.pth"))
  for k, v in sd.items():
    if k.endswith("prior_count"):
      assert v.dtype == torch.int64
    elif k == "rope.freqs":  # the RoPE table stays float32 (docs/export.md#official-key-map)
      assert v.dtype == torch.float32 and np.array_equal(v.numpy(), want[k])
    else:
      assert v.dtype == torch.bfloat16 and torch.equal(v, torch.from_numpy(want[k]).to(torch.bfloat16)), k
  # bfloat16 weights import (upcast exactly) and pass the RoPE check with the bfloat16 tolerance.
  assert cli.main(["from-pytorch", "--torch", out16, "--out", str(tmp_path / "p16")]) == 0
  m16, _, _ = model_io.load_checkpoint(str(tmp_path / "p16"))
  got = to_official_state_dict(m16)
  assert all(np.array_equal(got[k], v.float().numpy() if v.is_floating_point() else v.numpy()) for k, v in sd.items())


# ---------------------------------------------------------------- from-pytorch

def test_from_pytorch_round_trip_is_bit_exact_and_loadable_by_init_from(run, ref4, official_dir, tmp_path):
  model, config, params = ref4
  out = str(tmp_path / "imported")
  assert cli.main(["from-pytorch", "--torch", os.path.join(official_dir, "consolidated.pth"), "--out", out]) == 0
  # What train.py does with --config.init_from=DIR: load_params onto the abstract params of the run's model.
  _, abstract, _, _ = split_model(nnx.eval_shape(lambda: MegalodonLM(config, rngs=nnx.Rngs(0))))
  assert_same_params(load_params(out, abstract), params)
  with open(os.path.join(out, layout.CONFIG_FILE)) as f:
    assert json.load(f)["model"] == json.loads(json.dumps(config.official_kwargs()))
  loaded, loaded_config, step = model_io.load_checkpoint(out)
  assert loaded_config == config and step is None
  assert np.array_equal(logits(loaded, tokens(config)), logits(model, tokens(config)))
  # ... and exported again: the same state dict.
  again = str(tmp_path / "again")
  assert cli.main(["to-pytorch", "--checkpoint", out, "--out", again]) == 0
  first, second = (torch_dict(os.path.join(d, "consolidated.pth")) for d in (official_dir, again))
  assert list(first) == list(second) and all(torch.equal(first[k], second[k]) for k in first)


def test_load_checkpoint_accepts_every_layout(run, ref4):
  _, config, params = ref4
  for path in (run, os.path.join(run, "checkpoints"), os.path.join(run, "checkpoints", "4"),
               os.path.join(run, "checkpoints", "4", "state")):
    model, cfg, step = model_io.load_checkpoint(path)
    assert cfg == config and step == 4, path
    assert_same_params(split_model(model)[1], params)
  assert model_io.load_checkpoint(run, step=2)[2] == 2


# ---------------------------------------------------------------- tensor-parallel shards

def spec_split_dim(key: str):
  """The split rules of docs/export.md#model-parallel-shards, restated: the dim of the torch tensor split across
  ranks (None: replicated)."""
  name = key.split(".")
  if key == "embed.weight" or key == "output.output.weight" or name[-2] in ("wh2", "fc2"):
    return 1  # embed along D; RowParallel along the input dim
  if name[-2] in ("wv", "wz", "wr", "wh1", "fc1", "fc3"):
    return 0  # ColumnParallel along the output dim, bias included
  if name[-1] in ("gamma", "beta") and name[-2] == "mega":
    return 1  # along Z
  if "cema" in name or (name[-2] in ("timenorm", "final_norm") and name[-1] != "prior_count"):
    return 0  # along D (or G for the priors)
  return None  # rmsnorm, nffn.norm, rope.freqs, prior_count


def test_tensor_parallel_shards_split_by_the_spec_and_merge_back_exactly(run, ref4, official_dir, tmp_path):
  _, _, params = ref4
  full = {k: v.numpy() for k, v in torch_dict(os.path.join(official_dir, "consolidated.pth")).items()}
  out = str(tmp_path / "tp2")
  assert cli.main(["to-pytorch", "--checkpoint", run, "--out", out, "--model-parallel", "2"]) == 0
  assert sorted(os.listdir(out)) == ["consolidated.00.pth", "consolidated.01.pth", "params.json"]
  shards = [{k: v.numpy() for k, v in torch_dict(os.path.join(out, f"consolidated.{r:02d}.pth")).items()}
            for r in range(2)]
  for key, value in full.items():
    dim = spec_split_dim(key)
    if dim is None:
      assert all(np.array_equal(s[key], value) for s in shards), key
    else:
      assert np.array_equal(np.concatenate([s[key] for s in shards], axis=dim), value), key
      assert shards[0][key].shape[dim] * 2 == value.shape[dim], key
  merged = tp_shards.merge_state_dicts(shards)
  assert list(merged) == list(full) and all(np.array_equal(merged[k], full[k]) for k in full)
  assert merged["layers.0.mega.timenorm.prior_count"].dtype == np.int64
  imported = str(tmp_path / "from_tp")
  assert cli.main(["from-pytorch", "--torch", out, "--out", imported]) == 0
  assert_same_params(split_model(model_io.load_checkpoint(imported)[0])[1], params)


def test_tensor_parallel_errors(run, official_dir, tmp_path, capsys):
  out = str(tmp_path / "tp3")
  assert cli.main(["to-pytorch", "--checkpoint", run, "--out", out, "--model-parallel", "3"]) == 2
  assert "not divisible by 3" in capsys.readouterr().err and not os.path.exists(out)
  no_leftovers(tmp_path)
  # A replicated tensor that differs between ranks is named.
  shards_dir = tmp_path / "bad_shards"
  shards_dir.mkdir()
  sd = {k: v.numpy() for k, v in torch_dict(os.path.join(official_dir, "consolidated.pth")).items()}
  for r, shard in enumerate(tp_shards.split_state_dict(sd, 2)):
    if r == 1:
      shard["layers.1.nffn.norm.weight"] = shard["layers.1.nffn.norm.weight"] + 1
    torch.save({k: torch.from_numpy(v) for k, v in shard.items()}, shards_dir / f"consolidated.{r:02d}.pth")
  shutil.copy(os.path.join(official_dir, "params.json"), shards_dir / "params.json")
  out = str(tmp_path / "merged")
  assert cli.main(["from-pytorch", "--torch", str(shards_dir), "--out", out]) == 2
  err = capsys.readouterr().err
  assert "layers.1.nffn.norm.weight" in err and "replicated" in err and not os.path.exists(out)
  no_leftovers(tmp_path)


# ---------------------------------------------------------------- megalodon-hf export (mapping: test_convert_hf.py)

def write_official(folder, sd: dict, conf: dict, name="consolidated.pth") -> str:
  os.makedirs(folder, exist_ok=True)
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, os.path.join(folder, name))
  with open(os.path.join(folder, "params.json"), "w") as f:
    json.dump(conf, f)
  return os.path.join(folder, name)


def test_hf_export_of_a_tied_checkpoint(tmp_path, capsys):
  fx = fixtures.load("tiny_tied")
  config = MegalodonConfig.from_official(fx.conf)
  src = write_official(str(tmp_path / "src"), fx.state_dict, config.official_kwargs())
  assert cli.main(["from-pytorch", "--torch", src, "--out", str(tmp_path / "jax")]) == 0
  out = str(tmp_path / "hf")
  capsys.readouterr()
  assert cli.main(["to-pytorch", "--checkpoint", str(tmp_path / "jax"), "--out", out, "--format", "hf"]) == 0
  assert "TimestepNorm" in capsys.readouterr().err  # docs/export.md#megalodon-hf warning
  tensors = load_safetensors(os.path.join(out, "model.safetensors"))
  want = hf.official_to_hf(fx.state_dict, config)
  assert tensors.keys() == want.keys() and all(np.array_equal(tensors[k].numpy(), want[k]) for k in want)
  with open(os.path.join(out, "config.json")) as f:
    conf = json.load(f)
  assert conf["model_type"] == "megalodon" and conf["rope_base"] == 10000.0 and conf["share_emb"] is True
  assert {k: conf[k] for k in fx.conf} == fx.conf
  # The HF folder imports back (via config.json): the same official weights up to the LayerNorm +1 rounding.
  assert cli.main(["from-pytorch", "--torch", out, "--out", str(tmp_path / "back")]) == 0
  got = to_official_state_dict(model_io.load_checkpoint(str(tmp_path / "back"))[0])
  for k, v in fx.state_dict.items():
    np.testing.assert_allclose(got[k], v, rtol=0, atol=1.2e-7 if "nffn.norm.weight" in k else 0, err_msg=k)


def test_hf_export_refuses_an_untied_head_or_a_learned_alpha(run, tmp_path, capsys):
  out = str(tmp_path / "hf")
  assert cli.main(["to-pytorch", "--checkpoint", run, "--out", out, "--format", "hf"]) == 2
  assert "untied" in capsys.readouterr().err and not os.path.exists(out)
  fx = fixtures.load("tiny_swiglu")  # nffn.alpha (rescale_nffn) at its init 0.1*0.5**layer, untied head
  config = MegalodonConfig.from_official(fx.conf)
  learned = dict(fx.state_dict, **{"layers.1.nffn.alpha": fx.state_dict["layers.1.nffn.alpha"] * 1.5})
  with pytest.raises(StateDictError, match=r"(?s)untied.*nffn\.alpha.* of layers \[1\]"):
    hf.official_to_hf(learned, config)
  # Tied, with alpha still equal to megalodon-hf's constant: representable, and the constant comes back.
  tied = config.replace(share_emb=True)
  sd = dict(fx.state_dict, **{"output.output.weight": fx.state_dict["embed.weight"]})
  assert np.array_equal(hf.hf_to_official(hf.official_to_hf(sd, tied), tied)["layers.1.nffn.alpha"],
                        sd["layers.1.nffn.alpha"])
  sd["layers.1.nffn.alpha"] = learned["layers.1.nffn.alpha"]
  write_official(str(tmp_path / "src"), sd, tied.official_kwargs())
  assert cli.main(["from-pytorch", "--torch", str(tmp_path / "src"), "--out", str(tmp_path / "jax")]) == 0
  assert cli.main(["to-pytorch", "--checkpoint", str(tmp_path / "jax"), "--out", out, "--format", "hf"]) == 2
  err = capsys.readouterr().err
  assert "nffn.alpha" in err and "untied" not in err and not os.path.exists(out)
  no_leftovers(tmp_path)


def test_hf_export_with_norm_affine_false(tmp_path, capsys):
  """megalodon-hf keeps its TimestepNorm weights at zero and does not load them with norm_affine=False: non-zero ones
  are refused (exit 2, one line, nothing written); zero ones are not written and import back as zeros."""
  config = MegalodonConfig(num_layers=2, model_dim=32, z_dim=16, value_dim=32, num_heads=2, ffn_hidden_dim=48,
                           cema_ndim=4, chunk_size=8, norm_num_groups=4, vocab_size=40, share_emb=True,
                           norm_affine=False)
  sd = to_official_state_dict(MegalodonLM(config, rngs=nnx.Rngs(0)))
  norm_keys = ([f"layers.{i}.mega.timenorm.{w}" for i in range(2) for w in ("weight", "bias")]
               + ["output.final_norm.weight", "output.final_norm.bias"])
  rng = np.random.default_rng(0)
  sd.update({k: rng.normal(0, 0.3, (32,)).astype(np.float32) for k in norm_keys})
  write_official(str(tmp_path / "src"), sd, config.official_kwargs())
  assert cli.main(["from-pytorch", "--torch", str(tmp_path / "src"), "--out", str(tmp_path / "jax")]) == 0
  out = str(tmp_path / "hf")
  capsys.readouterr()
  assert cli.main(["to-pytorch", "--checkpoint", str(tmp_path / "jax"), "--out", out, "--format", "hf"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
  assert re.search(r"norm_affine=False.*6 of them are non-zero \(layers\.0\.mega\.timenorm\.weight", err), err
  assert not os.path.exists(out)
  sd.update({k: np.zeros((32,), np.float32) for k in norm_keys})
  write_official(str(tmp_path / "src0"), sd, config.official_kwargs())
  assert cli.main(["from-pytorch", "--torch", str(tmp_path / "src0"), "--out", str(tmp_path / "jax0")]) == 0
  assert cli.main(["to-pytorch", "--checkpoint", str(tmp_path / "jax0"), "--out", out, "--format", "hf"]) == 0
  tensors = load_safetensors(os.path.join(out, "model.safetensors"))
  assert not [k for k in tensors if "timenorm" in k or k.startswith("model.norm.")]
  assert cli.main(["from-pytorch", "--torch", out, "--out", str(tmp_path / "back")]) == 0
  got = to_official_state_dict(model_io.load_checkpoint(str(tmp_path / "back"))[0])
  assert got.keys() == sd.keys()
  for k, v in sd.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  no_leftovers(tmp_path)


# ---------------------------------------------------------------- bad inputs

def _drop_and_add(sd, conf):
  del sd["layers.0.mega.wz.bias"]
  sd["layers.0.mega.bogus"] = np.zeros(3, np.float32)


BAD_INPUTS = {
    "truncated": (lambda folder, path: _truncate(path), r"not a readable PyTorch checkpoint"),
    "text_file": (lambda folder, path: open(path, "w").write("hello\n"), r"not a readable PyTorch checkpoint"),
    "truncated_safetensors": (lambda folder, path: _truncate(path), r"not a readable safetensors file"),
    "no_params_json": (lambda folder, path: os.remove(os.path.join(folder, "params.json")), r"params\.json"),
    "keys": (_drop_and_add, r"(?s)layers\.0\.mega\.wz\.bias.*layers\.0\.mega\.bogus"),
    "shape": (lambda sd, conf: sd.update({"layers.1.mega.wv.weight": sd["layers.1.mega.wv.weight"].T}),
              r"layers\.1\.mega\.wv\.weight: got \(64, 128\)"),
    "dtype": (lambda sd, conf: sd.update({"output.final_norm.prior_count": np.zeros((), np.float32),
                                          "layers.0.nffn.fc1.weight": np.zeros((128, 64), np.int32)}),
              r"(?s)layers\.0\.nffn\.fc1\.weight: dtype int32.*"
              r"output\.final_norm\.prior_count: dtype float32, expected int64"),
    "rope_base": (lambda sd, conf: conf.update({"rope_base": 500.0}), r"rope\.freqs .*rope_base ≈ 10000"),
    "untied_but_shared": (lambda sd, conf: conf.update({"share_emb": True}),
                          r"output\.output\.weight differs from embed\.weight"),
    "prior": (lambda sd, conf: sd.update({"layers.1.mega.timenorm.prior_mean": np.ones(8, np.float32)}),
              r"layers\.1\.mega\.timenorm\.prior_mean"),
}


def _truncate(path):
  data = open(path, "rb").read()
  open(path, "wb").write(data[:len(data) // 2])


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_from_pytorch_bad_inputs_fail_clearly_and_write_nothing(official_dir, tmp_path, capsys, case):
  mutate, message = BAD_INPUTS[case]
  sd = {k: v.numpy() for k, v in torch_dict(os.path.join(official_dir, "consolidated.pth")).items()}
  with open(os.path.join(official_dir, "params.json")) as f:
    conf = json.load(f)
  folder = str(tmp_path / "src")
  if case == "truncated_safetensors":
    path = write_official(folder, sd, conf)
    os.remove(path)
    path = os.path.join(folder, "model.safetensors")
    save_safetensors({k: torch.from_numpy(v) for k, v in sd.items()}, path)
    mutate(folder, path)
  elif case in ("truncated", "text_file", "no_params_json"):
    path = write_official(folder, sd, conf)
    mutate(folder, path)
  else:
    mutate(sd, conf)
    path = write_official(folder, sd, conf)
  out = str(tmp_path / "out")
  assert cli.main(["from-pytorch", "--torch", path, "--out", out]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "Traceback" not in err
  assert re.search(message, err), err
  assert not os.path.exists(out)
  no_leftovers(tmp_path)


def test_to_pytorch_bad_checkpoints(run, tmp_path, capsys):
  text = tmp_path / "notes.txt"
  text.write_text("not a checkpoint")
  empty = tmp_path / "empty"
  empty.mkdir()
  params_only = tmp_path / "params_only"  # written by save_params but without the config sidecar
  save_params(str(params_only), {"w": np.zeros(3, np.float32)})
  cases = {str(text): "is a file", str(empty): "is not a checkpoint", str(params_only): "megalodon_config.json",
           str(tmp_path / "missing"): "does not exist"}
  for path, message in cases.items():
    out = str(tmp_path / "out")
    assert cli.main(["to-pytorch", "--checkpoint", path, "--out", out]) == 2, path
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, (path, err)
    assert not os.path.exists(out)
  no_leftovers(tmp_path)


def test_existing_output_is_refused_or_replaced_atomically(run, official_dir, tmp_path, capsys):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("precious")
  args = ["to-pytorch", "--checkpoint", run, "--out", str(out), "--format", "safetensors"]
  for extra in ([], ["--overwrite"]):  # an entry no export writes: refused, with or without --overwrite
    assert cli.main(args + extra) == 2
    err = capsys.readouterr().err
    assert "keep.txt" in err and "--overwrite" in err and os.listdir(out) == ["keep.txt"]
  (out / "keep.txt").unlink()
  assert cli.main(args) == 0  # empty: written
  assert sorted(os.listdir(out)) == ["model.safetensors", "params.json"]
  official = ["to-pytorch", "--checkpoint", run, "--out", str(out)]
  assert cli.main(official) == 2 and "--overwrite" in capsys.readouterr().err  # an earlier export: needs --overwrite
  assert cli.main(official + ["--overwrite"]) == 0  # another format replaces it whole
  assert sorted(os.listdir(out)) == ["consolidated.pth", "params.json"]
  # from-pytorch replaces only a params-only checkpoint
  assert cli.main(["from-pytorch", "--torch", official_dir, "--out", str(out), "--overwrite"]) == 2
  assert "consolidated.pth" in capsys.readouterr().err
  assert sorted(os.listdir(out)) == ["consolidated.pth", "params.json"]
  imported = tmp_path / "imported"
  assert cli.main(["from-pytorch", "--torch", official_dir, "--out", str(imported)]) == 0
  assert cli.main(["from-pytorch", "--torch", official_dir, "--out", str(imported), "--overwrite"]) == 0
  assert os.path.isfile(imported / layout.CONFIG_FILE)
  no_leftovers(tmp_path)


def test_command_line_runs_as_a_module(run, tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = str(tmp_path / "sub")
  cmd = [sys.executable, "-m", "megalodon_jax.convert", "to-pytorch", "--checkpoint", run, "--out", out]
  ok = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert sorted(os.listdir(out)) == ["consolidated.pth", "params.json"] and "wrote" in ok.stdout
  again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert again.returncode == 2 and "Traceback" not in again.stderr
  assert again.stderr.strip().splitlines() == [again.stderr.strip()] and again.stderr.startswith("error: --out")


# ---------------------------------------------------------------- the exported files in our PyTorch runtime

@pytest.mark.parametrize("fmt", ["official", "safetensors"])
def test_exported_checkpoint_runs_in_pytorch_with_the_jax_logits(run, ref4, fmt, tmp_path):
  from megalodon_jax import pytorch as mp  # pylint: disable=import-outside-toplevel
  model, config, _ = ref4
  out = str(tmp_path / fmt)
  assert cli.main(["to-pytorch", "--checkpoint", run, "--out", out, "--format", fmt]) == 0
  torch_model = mp.load(out)
  ids = np.random.default_rng(5).integers(0, config.vocab_size, (2, 100)).astype(np.int32)  # 3 chunks + a part
  want = logits(model, ids)
  got, _ = torch_model(torch.from_numpy(ids.astype(np.int64)))
  assert np.abs(got.detach().numpy() - want).max() <= 1e-4
  # Streaming in the PyTorch runtime, in pieces that cross chunk boundaries, continues the same logits.
  cache, pieces = torch_model.init_cache(2), []
  for lo, hi in ((0, 7), (7, 40), (40, 100)):
    piece, cache = torch_model(torch.from_numpy(ids[:, lo:hi].astype(np.int64)), cache=cache)
    pieces.append(piece.detach().numpy())
  assert np.abs(np.concatenate(pieces, axis=1) - want).max() <= 1e-4
