"""benchmarks/head_to_head.py --smoke: both families train through the trainer, and the summary holds what the
benchmark promises (eval curves, matched sizes, bpb by context length, cache sizes, the PNG)."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("h2h")
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "head_to_head.py"), "--smoke",
                         f"--out={out}", f"--data_dir={out / 'tfds'}"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(out / "head_to_head_smoke.json", encoding="utf-8") as f:
    return out, json.load(f), proc.stdout


def _config(cls, summary, family):
  """The model config of `family`'s runs, from the model section its training config recorded."""
  names = {f.name for f in dataclasses.fields(cls)} - {"vocab_size"}
  return cls(**{k: v for k, v in summary["families"][family]["config"]["model"].items() if k in names}, vocab_size=256)


def test_both_families_have_finite_eval_curves(smoke):
  out, summary, stdout = smoke
  fams = summary["families"]
  assert set(fams) == {"megalodon", "llama"}
  for fam in fams.values():
    curve = fam["mean_curve"]
    assert len(curve) >= 2 and curve[0]["step"] == 0 and curve[0]["tokens"] == 0
    assert all(math.isfinite(p["mean"]) for p in curve)
    assert curve[-1]["mean"] < curve[0]["mean"]  # a few steps already lower the untrained model's ~8 bpb
    assert fam["runs"] and all(math.isfinite(r["final_eval_bpb"]) for r in fam["runs"])
    assert fam["throughput"]["tokens_per_s"] > 0 and fam["throughput"]["peak_memory_bytes"] > 0
    assert any(arg.startswith("--config.optimizer.lr=") for arg in fam["recipe"])
  per_run = [p for p in os.listdir(out) if p.startswith("head_to_head_smoke_") and p.endswith(".json")]
  assert {p.split("_")[4] for p in per_run} == {"megalodon", "llama"}  # one JSON per run
  assert "validation bpb against training tokens" in stdout and "chosen megalodon recipe" in stdout


def test_parameter_counts_match(smoke):
  _, summary, _ = smoke
  mega, llama = (summary["families"][f]["params"] for f in ("megalodon", "llama"))
  assert abs(llama - mega) <= 0.05 * mega
  from megalodon_jax.config import MegalodonConfig  # pylint: disable=import-outside-toplevel
  assert _config(MegalodonConfig, summary, "megalodon").num_params() == mega


def test_context_length_table(smoke):
  _, summary, _ = smoke
  rows = {(r["family"], r["method"], r["context"]): r for fam in summary["families"].values()
          for r in fam["context_eval"]}
  contexts = sorted({c for _, _, c in rows})
  assert len(contexts) >= 2
  for c in contexts:
    for key in (("megalodon", "stream"), ("llama", "full_kv_cache"), ("llama", "sliding_window")):
      row = rows[(*key, c)]
      assert math.isfinite(row["bpb"]) and 0 < row["bpb"] < 16 and row["tokens"] == c * row["documents"]
  # Within the trained window the sliding window is one window over the whole context: the KV cache's answer.
  seq_len = summary["settings"]["seq_len"]
  assert rows[("llama", "full_kv_cache", seq_len)]["bpb"] == pytest.approx(
      rows[("llama", "sliding_window", seq_len)]["bpb"], rel=1e-4)


def test_cache_memory_table(smoke):
  _, summary, _ = smoke
  from megalodon_jax.llama.config import LlamaConfig  # pylint: disable=import-outside-toplevel
  mega = {c["tokens"]: c for c in summary["families"]["megalodon"]["cache_memory"]}
  llama = {c["tokens"]: c for c in summary["families"]["llama"]["cache_memory"]}
  assert set(mega) == set(llama) == {1024, 32768, 1 << 20}
  assert len({c["bytes"] for c in mega.values()}) == 1 and mega[1024]["bytes"] > 0  # constant in the context
  config = _config(LlamaConfig, summary, "llama")
  assert llama[1 << 20]["kv_bytes"] == config.kv_cache_bytes(1 << 20)
  for n, c in llama.items():  # linear: a fixed part plus a per-token part
    assert c["kv_bytes"] == config.kv_cache_bytes(n)
    assert c["bytes"] - c["fixed_bytes"] == c["length_bytes"] == llama[1024]["length_bytes"] * n // 1024
  assert llama[1 << 20]["bytes"] > 1000 * mega[1 << 20]["bytes"]


def test_png_is_written(smoke):
  out, summary, _ = smoke
  path = out / "head_to_head_smoke.png"
  assert summary["png"] == str(path)
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with Image.open(path) as image:
    image.verify()
