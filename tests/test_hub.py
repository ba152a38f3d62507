"""The Hub side of `megalodon-convert`: sharded safetensors (`--max_shard_size`), the model card, `--push_to_hub`
and `from-pytorch --torch OWNER/NAME`, with no network.

Judges independent of the code under test: the shards and the index are read with `safetensors` and `json`
directly (and a sharded Llama export with `transformers.LlamaForCausalLM.from_pretrained`); imports are compared
with the run's params read by the trainer's own `load_params`; the card is parsed with huggingface_hub's
`ModelCard` and its numbers compared with the run's metrics.jsonl and the params' sizes. The two huggingface_hub
calls that reach the network (`HfApi.create_repo` + `upload_folder`, `snapshot_download`) are replaced in the test,
which records what they were given.
"""

from __future__ import annotations

import importlib
import json
import os
import re

import huggingface_hub
import jax
import numpy as np
import pytest
import transformers
from flax import nnx
from huggingface_hub import ModelCard
from safetensors.torch import load_file as load_safetensors

from megalodon_jax import pytorch as mp
from megalodon_jax.checkpoints import model_io
from megalodon_jax.checkpoints.params import load_params
from megalodon_jax.cli import convert as cli
from megalodon_jax.config import MegalodonConfig
from megalodon_jax.llama.config import LlamaConfig
from megalodon_jax.llama.model import LlamaLM
from megalodon_jax.model import MegalodonLM
from megalodon_jax.model_state import split_model
from megalodon_jax.training import trainer

SHARD = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
MAX_SHARD = 100_000  # bytes: the tiny model's 0.53 MB of float32 weights make 7 shards


@pytest.fixture(autouse=True)
def _no_hub_credentials(tmp_path, monkeypatch):
  """No token or cache of the machine's: huggingface_hub reads its files under HF_HOME."""
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
  monkeypatch.delenv("HF_TOKEN", raising=False)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # anything that escaped the replaced calls fails instead of connecting


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> str:
  """A train.py workdir: 2 layers, tied head (megalodon-hf's layout needs it), checkpoints at steps 2 and 4,
  metrics logged every step with an evaluation at steps 2 and 4."""
  cfg = importlib.import_module("megalodon_jax.configs.tiny").get_config()
  cfg.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
  cfg.data.max_documents = 60
  cfg.model.num_layers, cfg.model.chunk_size, cfg.model.share_emb = 2, 32, True
  cfg.seq_len, cfg.batch_size, cfg.total_steps = 64, 8, 4
  cfg.optimizer.warmup_steps = 1
  cfg.checkpoint_every, cfg.log_every, cfg.eval_every, cfg.eval_batches, cfg.num_samples = 2, 1, 2, 1, 0
  cfg.tensorboard, cfg.progress_bar, cfg.async_checkpointing = False, "off", False
  workdir = str(tmp_path_factory.mktemp("run"))
  trainer.train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])
  return workdir


def run_params(workdir: str, step: int):
  """(config, params) of a step via the trainer's own load_params into a concretely built model."""
  step_dir = os.path.join(workdir, "checkpoints", str(step))
  with open(os.path.join(step_dir, "meta", "metadata")) as f:
    config = MegalodonConfig.from_official(json.load(f)["model"])
  _, params, _, _ = split_model(MegalodonLM(config, rngs=nnx.Rngs(123)))
  return config, load_params(step_dir, params)


def flat(params) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def imported_params(folder: str) -> dict:
  return flat(split_model(model_io.load_checkpoint(folder)[0])[1])


def read_index(folder: str) -> tuple[dict, list[tuple[str, str]]]:
  """(the index, its weight_map as (name, file) pairs in file order: a name given twice shows up twice)."""
  pairs: list = []

  def hook(items):
    pairs.append(items)
    return dict(items)
  with open(os.path.join(folder, "model.safetensors.index.json")) as f:
    index = json.load(f, object_pairs_hook=hook)
  weight_map_pairs = next(p for p in pairs if p and all(SHARD.fullmatch(str(v)) for _, v in p))
  return index, weight_map_pairs


def check_shards(folder: str, max_shard: int = MAX_SHARD) -> dict:
  """The index names every tensor once, and exactly the tensors its shards hold; the shards are numbered 1..N of N,
  none above `max_shard` bytes unless one tensor alone is; returns all tensors (read with safetensors)."""
  index, pairs = read_index(folder)
  names = [n for n, _ in pairs]
  assert len(names) == len(set(names)), "a tensor is named twice in the index"
  shards = sorted(f for f in os.listdir(folder) if SHARD.fullmatch(f))
  assert len(shards) >= 3 and not os.path.exists(os.path.join(folder, "model.safetensors"))
  assert [SHARD.fullmatch(f).groups() for f in shards] == [(f"{i:05d}", f"{len(shards):05d}")
                                                           for i in range(1, len(shards) + 1)]
  assert set(index["weight_map"].values()) == set(shards)
  tensors, total = {}, 0
  for shard in shards:
    held = load_safetensors(os.path.join(folder, shard))
    assert sorted(held) == sorted(n for n, f in pairs if f == shard), shard
    nbytes = sum(t.numel() * t.element_size() for t in held.values())
    assert nbytes <= max_shard or len(held) == 1, (shard, nbytes)
    assert not set(held) & set(tensors)
    tensors.update(held)
    total += nbytes
  assert index["metadata"]["total_size"] == total
  return tensors


def export(args: list[str]) -> None:
  assert cli.main(args) == 0, args


# ---------------------------------------------------------------- sharded safetensors

def test_sharded_export_loads_back_bit_exactly(run, tmp_path):
  config, params = run_params(run, 4)
  want = flat(params)
  sharded, single = str(tmp_path / "sharded"), str(tmp_path / "single")
  export(["to-pytorch", "--checkpoint", run, "--out", sharded, "--format", "safetensors",
          "--max_shard_size", str(MAX_SHARD)])
  export(["to-pytorch", "--checkpoint", run, "--out", single, "--format", "safetensors"])  # 5GB: one file
  assert sorted(os.listdir(single)) == ["model.safetensors", "params.json"]
  tensors = check_shards(sharded)
  one = load_safetensors(os.path.join(single, "model.safetensors"))
  assert tensors.keys() == one.keys() and all(tensors[k].equal(one[k]) for k in one)
  # The PyTorch runtime (megalodon_jax.pytorch, no jax) loads the shards too.
  runtime = mp.load(sharded).state_dict()
  assert runtime.keys() == one.keys() and all(runtime[k].equal(one[k]) for k in one)
  imported = str(tmp_path / "imported")
  export(["from-pytorch", "--torch", sharded, "--out", imported])
  got = imported_params(imported)
  assert got.keys() == want.keys()
  for k, v in want.items():
    assert got[k].dtype == v.dtype and np.array_equal(got[k], v), k
  # The index file itself is accepted as --torch as well.
  again = str(tmp_path / "again")
  export(["from-pytorch", "--torch", os.path.join(sharded, "model.safetensors.index.json"), "--out", again])
  assert all(np.array_equal(a, want[k]) for k, a in imported_params(again).items())
  assert config.num_params() == sum(v.size for v in want.values())


def test_sharded_hf_export_with_a_model_card(run, tmp_path, capsys):
  """--format hf with shards: the same tensors as the single-file export, an import equal to it, and a card that
  holds the parameter count and the run's final metrics (at the exported step)."""
  _, params = run_params(run, 4)
  want = flat(params)
  sharded, single = str(tmp_path / "hf_sharded"), str(tmp_path / "hf_single")
  export(["to-pytorch", "--checkpoint", run, "--out", sharded, "--format", "hf", "--max_shard_size", "100KB"])
  assert "README.md" in capsys.readouterr().out
  export(["to-pytorch", "--checkpoint", run, "--out", single, "--format", "hf"])
  tensors = check_shards(sharded)
  one = load_safetensors(os.path.join(single, "model.safetensors"))
  assert tensors.keys() == one.keys() and all(tensors[k].equal(one[k]) for k in one)
  assert "model.embed.weight" in tensors and "lm_head.weight" in tensors
  a, b = str(tmp_path / "from_sharded"), str(tmp_path / "from_single")
  export(["from-pytorch", "--torch", sharded, "--out", a])
  export(["from-pytorch", "--torch", single, "--out", b])
  got, ref = imported_params(a), imported_params(b)
  assert all(np.array_equal(got[k], ref[k]) for k in ref)
  for k, v in want.items():  # megalodon-hf stores the FFN LayerNorm weight + 1: one rounding there
    np.testing.assert_allclose(got[k], v, rtol=0, atol=1.2e-7 if "nffn" in k and "norm" in k else 0, err_msg=k)

  card = ModelCard.load(os.path.join(sharded, "README.md"))
  assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
  assert {"megalodon", "megalodon-jax"} <= set(card.data.tags)
  n = sum(v.size for v in want.values())
  assert f"**Parameters: {n:,}**" in card.text
  assert "## Training" in card.text and "| `seq_len` | 64 |" in card.text
  assert "| `data.dataset` | `stdlib` |" in card.text and "data_dir" not in card.text.split("## Data")[1]
  assert_card_metrics(card.text, run, step=4)
  assert all(f"- `{f}`" in card.text for f in os.listdir(sharded) if f != "README.md")
  # An earlier step's export lists that step's metrics, not the run's last ones.
  step2 = str(tmp_path / "step2")
  export(["to-pytorch", "--checkpoint", run, "--step", "2", "--out", step2, "--format", "hf"])
  assert_card_metrics(ModelCard.load(os.path.join(step2, "README.md")).text, run, step=2)


def assert_card_metrics(text: str, workdir: str, step: int) -> None:
  """The card's metrics table: for each metric, its last non-null value in metrics.jsonl at or before `step`."""
  last = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if record["step"] <= step:
        last.update({k: (v, record["step"]) for k, v in record.items() if k != "step" and v is not None})
  rows = dict((m, (float(v), int(s))) for m, v, s in re.findall(r"^\| `([^`]+)` \| ([-\d.e+]+) \| (\d+) \|$",
                                                                   text.split("## Final metrics")[1], re.M))
  assert {"loss", "eval_loss", "grad_norm"} <= rows.keys() and rows.keys() == last.keys(), (rows, last)
  assert rows["loss"][1] == rows["eval_loss"][1] == step
  for name, (value, at) in last.items():
    assert rows[name][1] == at, name
    assert rows[name][0] == pytest.approx(value, rel=1e-5), name


def test_sharded_hf_llama_export_loads_in_transformers(tmp_path):
  config = LlamaConfig(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2, ffn_hidden_dim=96, vocab_size=97,
                       share_emb=False, matmul_precision="highest", full_attention_impl="xla")
  model = LlamaLM(config, rngs=nnx.Rngs(0))
  ckpt, sharded, single = str(tmp_path / "ckpt"), str(tmp_path / "sharded"), str(tmp_path / "single")
  model_io.save_params_checkpoint(ckpt, model)
  export(["to-hf-llama", "--checkpoint", ckpt, "--out", sharded, "--max_position_embeddings", "64",
          "--max_shard_size", "20KB"])
  export(["to-hf-llama", "--checkpoint", ckpt, "--out", single, "--max_position_embeddings", "64"])
  check_shards(sharded, max_shard=20_000)
  card = ModelCard.load(os.path.join(sharded, "README.md"))
  assert card.data.library_name == "transformers" and "llama" in card.data.tags
  assert f"**Parameters: {config.num_params():,}**" in card.text and "No training run" in card.text
  ids = np.random.default_rng(0).integers(0, 97, (1, 12))
  logits = []
  for folder in (sharded, single):
    loaded, info = transformers.LlamaForCausalLM.from_pretrained(folder, output_loading_info=True,
                                                                 attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    import torch  # pylint: disable=import-outside-toplevel
    with torch.no_grad():
      logits.append(loaded.eval()(torch.from_numpy(ids)).logits.numpy())
  assert np.array_equal(logits[0], logits[1])


def test_index_and_shards_that_disagree_are_refused(run, tmp_path, capsys):
  folder = str(tmp_path / "sharded")
  export(["to-pytorch", "--checkpoint", run, "--out", folder, "--format", "safetensors", "--max_shard_size", "100KB"])
  path = os.path.join(folder, "model.safetensors.index.json")
  with open(path) as f:
    index = json.load(f)
  dropped = "layers.1.mega.wz.weight"
  index["weight_map"].pop(dropped)
  with open(path, "w") as f:
    json.dump(index, f)
  capsys.readouterr()
  assert cli.main(["from-pytorch", "--torch", folder, "--out", str(tmp_path / "x")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and dropped in err and "index does not map" in err
  assert not os.path.exists(tmp_path / "x")
  # A sharded export is an earlier export: --overwrite replaces it whole with a single-file one.
  export(["to-pytorch", "--checkpoint", run, "--out", folder, "--format", "hf", "--overwrite"])
  assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]


def test_bad_hub_flags_fail_before_loading(run, tmp_path, capsys):
  out = str(tmp_path / "out")
  cases = [(["--max_shard_size", "5XB", "--format", "hf"], "is not a size"),
           (["--max_shard_size", "0", "--format", "safetensors"], "at least 1 byte"),
           (["--max_shard_size", "5MB"], "applies to the safetensors formats"),
           (["--private"], "--private applies to --push_to_hub only"),
           (["--push_to_hub", "me/tiny"], "needs a Hugging Face token"),
           (["--push_to_hub", "not a repo"], "is not a Hub repo id")]
  for extra, message in cases:
    assert cli.main(["to-pytorch", "--checkpoint", run, "--out", out] + extra) == 2, extra
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, (extra, err)
    assert not os.path.exists(out)


# ---------------------------------------------------------------- the Hub, its network calls replaced

def test_push_to_hub_uploads_the_finished_folder(run, tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("HF_TOKEN", "hf_test_token")
  calls = []

  def create_repo(self, repo_id, **kw):
    calls.append(("create_repo", repo_id, kw, self.token))
    return f"https://huggingface.co/{repo_id}"

  def upload_folder(self, *, folder_path, repo_id, **kw):
    calls.append(("upload_folder", repo_id, kw, sorted(os.listdir(folder_path)), folder_path))
    return "https://huggingface.co/me/tiny/commit/abc"

  monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
  monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
  out = str(tmp_path / "push")
  export(["to-pytorch", "--checkpoint", run, "--out", out, "--format", "hf", "--max_shard_size", "100KB",
          "--push_to_hub", "me/tiny", "--private"])
  assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
  _, repo, kw, token = calls[0]
  assert repo == "me/tiny" and kw["private"] is True and kw["exist_ok"] and token == "hf_test_token"
  _, repo, kw, files, folder = calls[1]
  assert repo == "me/tiny" and kw.get("repo_type", "model") == "model"
  assert folder == out and files == sorted(os.listdir(out))  # the finished --out, not a temporary folder
  assert "README.md" in files and "model.safetensors.index.json" in files and "config.json" in files
  assert len([f for f in files if SHARD.fullmatch(f)]) >= 3
  assert "\n# me/tiny\n" in ModelCard.load(os.path.join(out, "README.md")).text  # titled by the repo
  assert "pushed" in capsys.readouterr().out
  # The official format gets a card when pushed; an upload failure keeps the export and says how to retry.
  calls.clear()

  def refuse(self, **kw):
    raise OSError("connection reset")

  monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", refuse)
  official = str(tmp_path / "official")
  assert cli.main(["to-pytorch", "--checkpoint", run, "--out", official, "--push_to_hub", "me/tiny"]) == 2
  err = capsys.readouterr().err
  assert "connection reset" in err and f"hf upload me/tiny {official}" in err
  assert sorted(os.listdir(official)) == ["README.md", "consolidated.pth", "params.json"]
  assert ModelCard.load(os.path.join(official, "README.md")).data.library_name == "pytorch"


def test_from_pytorch_downloads_a_hub_repo_id(run, tmp_path, monkeypatch, capsys):
  _, params = run_params(run, 4)
  sharded = str(tmp_path / "hub_copy")
  export(["to-pytorch", "--checkpoint", run, "--out", sharded, "--format", "safetensors", "--max_shard_size", "100KB"])
  calls = []

  def snapshot_download(**kw):
    calls.append(kw)
    return sharded

  monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
  monkeypatch.chdir(tmp_path)
  out = str(tmp_path / "imported")
  export(["from-pytorch", "--torch", "me/tiny-megalodon", "--revision", "v1", "--out", out])
  assert len(calls) == 1 and calls[0]["repo_id"] == "me/tiny-megalodon" and calls[0]["revision"] == "v1"
  got = imported_params(out)
  assert all(got[k].dtype == v.dtype and np.array_equal(got[k], v) for k, v in flat(params).items())
  with open(os.path.join(out, "megalodon_config.json")) as f:
    assert json.load(f)["source"] == "hf://me/tiny-megalodon@v1"
  # An existing local folder of the same form is a path: no download.
  os.makedirs(tmp_path / "me")
  os.symlink(sharded, tmp_path / "me" / "local-copy")
  export(["from-pytorch", "--torch", "me/local-copy", "--out", str(tmp_path / "local")])
  assert len(calls) == 1
  capsys.readouterr()
  # Neither a path nor a repo id; --revision with a path.
  for path in ("me/x/y", "me/missing", "export/consolidated.pth"):  # me/ exists here: a path
    assert cli.main(["from-pytorch", "--torch", path, "--out", str(tmp_path / "a")]) == 2, path
    assert "does not exist (and is not a Hugging Face Hub repo id" in capsys.readouterr().err, path
  assert cli.main(["from-pytorch", "--torch", sharded, "--revision", "v1", "--out", str(tmp_path / "b")]) == 2
  assert "--revision applies to a Hub repo id" in capsys.readouterr().err
  assert len(calls) == 1
