"""The measured implementation table (megalodon_jax/ops/impl_table.py): an entry changes what "auto" picks, no entry
keeps the fixed rules, a malformed table is ignored with a warning, and the shipped table holds no fabricated rows."""

import json

import pytest

from megalodon_jax.ops import impl_table
from megalodon_jax.ops.attention import AUTO_ATTENTION_IMPL, resolve_attention_impl
from megalodon_jax.ops.cema import default_impl

HEAD = dict(chunk_size=2048, z_head_dim=256, v_head_dim=2048)


def _use(tmp_path, monkeypatch, table, name="table.json") -> str:
  path = tmp_path / name
  path.write_text(table if isinstance(table, str) else json.dumps(table))
  monkeypatch.setenv(impl_table.ENV_VAR, str(path))
  return str(path)


def test_shipped_table_has_no_measurements():
  # No GPU/TPU numbers exist yet: the shipped table must be valid and empty, so "auto" keeps today's rules.
  with open(impl_table.DEFAULT_PATH, encoding="utf-8") as f:
    table = impl_table.validate(json.load(f))
  assert all(entries == [] for entries in table.values())


def test_attention_entry_changes_the_choice(tmp_path, monkeypatch):
  _use(tmp_path, monkeypatch, {"gpu": [{"op": "attention", **HEAD, "impl": "pallas", "fwd_ms": 1.0}]})
  assert resolve_attention_impl("auto", "gpu", **HEAD) == "pallas"
  assert resolve_attention_impl("auto", "cuda", **HEAD) == "pallas"  # jax's platform name for the same backend
  # Another head shape, another backend, or an unknown shape: no entry, the fixed rule.
  assert resolve_attention_impl("auto", "gpu", **{**HEAD, "v_head_dim": 1024}) == AUTO_ATTENTION_IMPL["gpu"]
  assert resolve_attention_impl("auto", "tpu", **HEAD) == AUTO_ATTENTION_IMPL["tpu"]
  assert resolve_attention_impl("auto", "gpu") == AUTO_ATTENTION_IMPL["gpu"]
  # An explicit choice and a dropout the kernel cannot run are not overridden.
  assert resolve_attention_impl("xla", "gpu", **HEAD) == "xla"
  assert resolve_attention_impl("auto", "gpu", **HEAD, pallas_ok=False) == "xla"


def test_cema_entry_changes_the_choice(tmp_path, monkeypatch):
  _use(tmp_path, monkeypatch, {"gpu": [
      {"op": "cema", "min_length": 4096, "max_length": 8191, "dim": 1024, "impl": "fft"},
      {"op": "cema", "min_length": 8192, "max_length": None, "impl": "pallas"}]})
  assert default_impl(4096, "gpu", dim=1024) == "fft"
  assert default_impl(8191, "gpu", dim=1024) == "fft"
  assert default_impl(4096, "gpu", dim=2048) == "chunked"  # the entry names another D: fixed rule
  assert default_impl(65536, "gpu") == "pallas"  # open upper bound, no dim key: matches any D
  assert default_impl(2048, "gpu", dim=1024) == "chunked"  # below every entry
  assert default_impl(1, "gpu") == "sequential"  # a decoding step stays sequential whatever the table says
  assert default_impl(4096, "cpu", dim=1024) == "fft"  # the CPU's fixed rule (no CPU entry)


def test_no_entry_keeps_the_fixed_rules(tmp_path, monkeypatch):
  _use(tmp_path, monkeypatch, {"gpu": [], "tpu": []})
  for backend in ("cpu", "gpu", "tpu"):
    assert resolve_attention_impl("auto", backend, **HEAD) == AUTO_ATTENTION_IMPL[backend]
  assert [default_impl(n, "cpu") for n in (64, 128, 512, 4096, 8192)] == [
      "sequential", "chunked", "fft", "fft", "chunked"]
  assert default_impl(32768, "gpu", dim=4096) == "chunked"
  monkeypatch.setenv(impl_table.ENV_VAR, str(tmp_path / "absent.json"))
  assert default_impl(32768, "tpu") == "chunked"


@pytest.mark.parametrize("bad", [
    "{not json",
    [],
    {"gpu": {"op": "cema"}},
    {"gpu": [{"op": "cema", "impl": "magic"}]},
    {"gpu": [{"op": "softmax", "impl": "xla"}]},
    {"gpu": [{"op": "attention", "chunk_size": "2048", "impl": "pallas"}]},
    {"npu": []},
])
def test_malformed_table_is_ignored_with_a_warning(tmp_path, monkeypatch, bad):
  # A valid entry next to the bad part must not be used either: the whole file is set aside.
  if isinstance(bad, dict):
    bad = {**bad, "tpu": [{"op": "cema", "impl": "fft"}]}
  path = _use(tmp_path, monkeypatch, bad, name=f"bad{abs(hash(json.dumps(bad)))}.json")
  impl_table.load.cache_clear()
  with pytest.warns(RuntimeWarning, match="ignoring the implementation table"):
    assert impl_table.load(path) == {}
  assert default_impl(4096, "tpu") == "chunked"
  assert resolve_attention_impl("auto", "gpu", **HEAD) == "xla"
