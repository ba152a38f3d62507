"""MegalodonConfig: official ModelConf fields and defaults, presets and parameter counts, validation messages.

References are docs/model.md#configurations, docs/export.md#parameter-count and the official `ModelConf`
dataclass; the expected numbers and the count formula are written out here independently of
`megalodon_jax.config`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys

import jax
import pytest
from flax import nnx

from megalodon_jax.config import PRESET_NAMES, REMAT_POLICIES, ConfigError, MegalodonConfig, preset
from megalodon_jax.model import MegalodonLM

# The official `ModelConf` (megalodon/config.py): every field, in order, with its default
# (docs/model.md#configurations and the fixture README: NL 8, D 1024, Z 256, E 2048, H 1, F 2048, N 16, C 2048,
# G 32, eps 1e-5, everything else off).
OFFICIAL_DEFAULTS = {
    "num_layers": 8,
    "model_dim": 1024,
    "z_dim": 256,
    "value_dim": 2048,
    "num_heads": 1,
    "ffn_hidden_dim": 2048,
    "cema_ndim": 16,
    "chunk_size": 2048,
    "efficient_attn": None,
    "init_mode": "he",
    "vocab_size": -1,
    "output_size": -1,
    "norm_num_groups": 32,
    "norm_affine": True,
    "norm_eps": 1e-5,
    "rope_base": None,
    "dropout": 0.0,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "swiglu": False,
    "rescale_nffn": False,
    "scale_emb": False,
    "share_emb": False,
    "layerwise_ckpt": False,
}

# A small valid architecture that the validation tests perturb one field at a time.
SMALL = dict(num_layers=2, model_dim=32, z_dim=16, value_dim=64, num_heads=2, ffn_hidden_dim=48, cema_ndim=4,
             chunk_size=8, norm_num_groups=4, vocab_size=50)


def spec_param_count(num_layers, model_dim, z_dim, value_dim, ffn_hidden_dim, cema_ndim=16, vocab_size=32000,
                     output_size=-1, swiglu=False, rescale_nffn=False, share_emb=False, norm_affine=True, **_):
  """docs/export.md#parameter-count, written out term by term; norm_affine=False drops the RMSNorm and LayerNorm
  tensors (docs/export.md#official-key-map)."""
  D, Z, E, F, N, V = model_dim, z_dim, value_dim, ffn_hidden_dim, cema_ndim, vocab_size
  aff = 1 if norm_affine else 0
  timenorm = 2 * D
  cema = D * N + D * N + D + 2 * D * N + D  # alpha, delta (D,N,1); theta (D,1,1); gamma (D,N,2); omega (D,1)
  rmsnorm = aff * D
  wv, wz, wr, wh1, wh2 = E * D + E, Z * D + Z, E * D + E, D * D + D, D * E
  qk_affine = 2 * Z + 2 * Z  # mega.gamma, mega.beta (2, Z)
  attention = timenorm + cema + rmsnorm + wv + wz + wr + wh1 + wh2 + qk_affine
  ffn = aff * 2 * D + (3 if swiglu else 2) * F * D + (D if rescale_nffn else 0)
  v_out = V if output_size == -1 else output_size
  head = 0 if share_emb else v_out * D
  return num_layers * (attention + ffn) + V * D + 2 * D + head


# ---------------------------------------------------------------------------------------------------------------
# Official fields and defaults


def test_fields_are_the_official_modelconf_fields_with_official_defaults():
  defaults = {f.name: f.default for f in dataclasses.fields(MegalodonConfig)}
  for name, value in OFFICIAL_DEFAULTS.items():
    assert name in defaults, f"official ModelConf field {name} is missing"
    assert defaults[name] == value and type(defaults[name]) is type(value), (name, defaults[name], value)


def test_accepts_every_official_field_as_keyword():
  kwargs = dict(OFFICIAL_DEFAULTS, vocab_size=32000)
  c = MegalodonConfig(**kwargs)
  for name, value in kwargs.items():
    assert getattr(c, name) == value
  assert c.z_head_dim == 256 and c.v_head_dim == 2048 and c.out_size == 32000
  assert c.effective_rope_base == 10000.0  # rope_base=None means 10000 (official RotaryEmbedding)
  # Non-default values of every official field are accepted and stored too.
  changed = dict(num_layers=3, model_dim=64, z_dim=32, value_dim=96, num_heads=2, ffn_hidden_dim=80, cema_ndim=8,
                 chunk_size=16, efficient_attn="fused", init_mode="xavier", vocab_size=70, output_size=90,
                 norm_num_groups=8, norm_affine=False, norm_eps=1e-6, rope_base=1e5, dropout=0.1,
                 hidden_dropout=0.2, attention_dropout=0.3, swiglu=True, rescale_nffn=True, scale_emb=True,
                 share_emb=False, layerwise_ckpt=True)
  assert set(changed) == set(OFFICIAL_DEFAULTS)
  c = MegalodonConfig(**changed)
  for name, value in changed.items():
    assert getattr(c, name) == value
  assert c.out_size == 90 and c.effective_rope_base == 1e5 and c.remat_policy == "full"


def test_official_kwargs_round_trip():
  c = MegalodonConfig(**SMALL, swiglu=True, rescale_nffn=True, rope_base=5e4, efficient_attn="swift",
                      dtype="bfloat16", cema_impl="sequential", remat="dots_saveable")
  kw = c.official_kwargs()
  assert list(kw) == list(OFFICIAL_DEFAULTS)  # exactly the official fields, in ModelConf order
  assert kw["swiglu"] is True and kw["rope_base"] == 5e4 and kw["z_dim"] == 16
  assert MegalodonConfig(**kw) == c.replace(dtype="float32", cema_impl="auto", remat="auto")
  back = MegalodonConfig.from_official(kw, dtype="bfloat16", cema_impl="sequential", remat="dots_saveable")
  assert back == c


def test_from_official_mapping_and_object():
  conf = dict(num_layers=2, model_dim=64, z_dim=32, value_dim=128, num_heads=2, ffn_hidden_dim=128, cema_ndim=4,
              chunk_size=16, norm_num_groups=8, rescale_nffn=True, share_emb=False, swiglu=True, vocab_size=256)
  c = MegalodonConfig.from_official(conf)
  for name, value in conf.items():
    assert getattr(c, name) == value
  assert c.norm_eps == 1e-5 and c.init_mode == "he" and c.output_size == -1  # untouched official defaults

  # An object with the official attributes (like a ModelConf instance) works as well.
  OfficialConf = dataclasses.make_dataclass(  # pylint: disable=invalid-name
      "ModelConf", [(k, object, dataclasses.field(default=v)) for k, v in OFFICIAL_DEFAULTS.items()])
  obj = OfficialConf(**conf)
  assert MegalodonConfig.from_official(obj) == c
  assert MegalodonConfig.from_official(obj, dtype="bfloat16").dtype == "bfloat16"


def test_from_official_lists_every_unknown_key():
  with pytest.raises(ConfigError) as err:
    MegalodonConfig.from_official(dict(SMALL, foo_bar=1, moe_experts=4))
  msg = str(err.value)
  assert "foo_bar" in msg and "moe_experts" in msg
  assert "num_layers" in msg  # the known fields are listed as the fix
  with pytest.raises(ConfigError, match="swiglu"):  # an official field passed as an execution setting
    MegalodonConfig.from_official(SMALL, swiglu=True)


def test_config_is_frozen():
  c = MegalodonConfig(**SMALL)
  with pytest.raises(dataclasses.FrozenInstanceError):
    c.model_dim = 64  # type: ignore[misc]
  with pytest.raises(dataclasses.FrozenInstanceError):
    c.dtype = "bfloat16"  # type: ignore[misc]
  assert c.model_dim == 32
  hash(c)  # frozen dataclasses are hashable (usable as static jit arguments)
  assert c.replace(model_dim=64).model_dim == 64 and c.model_dim == 32


# ---------------------------------------------------------------------------------------------------------------
# Presets and parameter counts

# The preset table of docs/model.md#configurations: (NL, D, H, Z, E, F, swiglu, C, G, tied, rounded count).
SPEC_PRESETS = {
    "mega200M": (12, 1024, 1, 256, 2048, 2560, False, 2048, 32, False, "220.6M"),
    "mega1.3B": (24, 2048, 2, 512, 4096, 4864, False, 2048, 64, False, "1.343B"),
    "mega1.3B_pg19": (24, 2048, 2, 512, 4096, 3584, True, 2048, 64, True, "1.328B"),
    "mega7.1B": (32, 4096, 4, 1024, 8192, 11264, False, 2048, 64, False, "7.117B"),
    "mega7.3B": (32, 4096, 4, 1024, 8192, 8192, True, 2048, 64, False, "7.386B"),
}


@pytest.mark.parametrize("name", list(SPEC_PRESETS))
def test_preset_shapes_and_counts_match_spec_table(name):
  nl, d, h, z, e, f, swiglu, chunk, g, tied, rounded = SPEC_PRESETS[name]
  c = preset(name)
  assert (c.num_layers, c.model_dim, c.num_heads, c.z_dim, c.value_dim, c.ffn_hidden_dim) == (nl, d, h, z, e, f)
  assert (c.swiglu, c.chunk_size, c.norm_num_groups, c.share_emb) == (swiglu, chunk, g, tied)
  assert c.z_head_dim == 256 and c.v_head_dim == 2048  # the (dz), (dv) columns
  # "Every preset uses N = 16, eps 1e-5, norm_affine=True, init_mode='he', all dropouts 0, rope_base=None".
  assert (c.cema_ndim, c.norm_eps, c.norm_affine, c.init_mode, c.rope_base, c.efficient_attn) == (
      16, 1e-5, True, "he", None, None)
  assert c.dropout == c.hidden_dropout == c.attention_dropout == 0.0
  assert not c.rescale_nffn and c.scale_emb == (name == "mega1.3B_pg19")
  assert c.vocab_size == 32000 and c.out_size == 32000

  n = c.num_params()
  assert n == spec_param_count(**dataclasses.asdict(c))
  if rounded.endswith("M"):
    assert round(n / 1e6, 1) == float(rounded[:-1])
  else:
    assert round(n / 1e9, 3) == float(rounded[:-1])


def test_mega200m_count_is_the_measured_official_count():
  # Measured by instantiating the official mega200M (docs/model.md#configurations).
  assert preset("mega200M").num_params() == 220_627_968


def test_megalodon_7b_is_mega73b_with_paper_chunk_and_rope_base():
  paper, base = preset("megalodon_7b"), preset("mega7.3B")
  assert paper.chunk_size == 4096 and paper.rope_base == 1e5 and paper.effective_rope_base == 100_000.0
  assert paper.replace(chunk_size=2048, rope_base=None) == base
  assert paper.num_params() == base.num_params() == 7_385_817_088
  assert not paper.share_emb  # "7.386B parameters with an untied head"


def test_preset_names_overrides_and_unknown():
  assert set(SPEC_PRESETS) | {"megalodon_7b"} == set(PRESET_NAMES)
  c = preset("mega200M", vocab_size=1000, num_layers=2)
  assert c.vocab_size == 1000 and c.num_layers == 2 and c.model_dim == 1024
  with pytest.raises(ConfigError, match="mega200M"):  # the message lists the available presets
    preset("mega13B")


COUNT_CONFIGS = {
    "plain": dict(SMALL),
    "swiglu": dict(SMALL, swiglu=True),
    "rescale": dict(SMALL, rescale_nffn=True, num_layers=3),
    "tied": dict(SMALL, share_emb=True, scale_emb=True),
    "no_affine": dict(SMALL, norm_affine=False),
    "output_size": dict(SMALL, output_size=77),
    "everything": dict(SMALL, swiglu=True, rescale_nffn=True, norm_affine=False, output_size=33, num_heads=1,
                       cema_ndim=3),
}


@pytest.mark.parametrize("name", list(COUNT_CONFIGS))
def test_num_params_equals_the_models_trainable_parameters(name):
  c = MegalodonConfig(**COUNT_CONFIGS[name])
  # Shapes of the NNX model's variables; nnx.eval_shape skips the random init (the count depends on shapes only).
  model = nnx.eval_shape(lambda: MegalodonLM(c, rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  actual = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  assert c.num_params() == actual == spec_param_count(**COUNT_CONFIGS[name])
  # Buffers (rope.freqs, TimestepNorm priors) are not parameters.
  nonparam = nnx.state(model, nnx.Not(nnx.Param))
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(nonparam)) == (
      c.z_head_dim // 2 + (c.num_layers + 1) * (1 + 2 * c.norm_num_groups))


def test_num_params_of_a_concrete_model():
  c = MegalodonConfig(**dict(SMALL, swiglu=True, rescale_nffn=True, output_size=20))
  model = MegalodonLM(c, rngs=nnx.Rngs(0))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == c.num_params()


# ---------------------------------------------------------------------------------------------------------------
# Validation: each bad value raises ConfigError naming the field, the value and the fix


def _error(**changes) -> str:
  with pytest.raises(ConfigError) as err:
    MegalodonConfig(**dict(SMALL, **changes))
  assert isinstance(err.value, ValueError)
  return str(err.value)


def test_z_dim_not_divisible_by_heads():
  msg = _error(z_dim=30, num_heads=4, value_dim=64)
  assert re.search(r"z_dim=30\b\W*is not divisible by num_heads=4", msg), msg
  assert "multiple of num_heads" in msg


def test_value_dim_not_divisible_by_heads():
  msg = _error(value_dim=70, num_heads=4)
  assert re.search(r"value_dim=70\b\W*is not divisible by num_heads=4", msg), msg
  assert "multiple of num_heads" in msg


def test_odd_per_head_z_width():
  msg = _error(z_dim=12, num_heads=4)  # 12 / 4 = 3 per head
  assert "z_dim=12" in msg and "z_dim/num_heads=3" in msg and "even" in msg


def test_model_dim_not_divisible_by_groups():
  msg = _error(norm_num_groups=5)  # 32 % 5 != 0
  assert "norm_num_groups=5" in msg and "model_dim=32" in msg and "divide" in msg


def test_groups_of_size_one():
  msg = _error(norm_num_groups=32)  # 32 groups of one feature
  assert "norm_num_groups=32" in msg and "fewer groups" in msg


@pytest.mark.parametrize("field", ["dropout", "hidden_dropout", "attention_dropout"])
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_dropout_out_of_range(field, value):
  msg = _error(**{field: value})
  assert f"{field}={value!r}" in msg and "[0, 1)" in msg


def test_dropout_in_range_is_accepted():
  c = MegalodonConfig(**SMALL, dropout=0.0, hidden_dropout=0.5, attention_dropout=0.999)
  assert c.attention_dropout == 0.999


@pytest.mark.parametrize("value", [-1, 0, -5])
def test_vocab_size_must_be_set(value):
  msg = _error(vocab_size=value)
  assert f"vocab_size={value}" in msg and "tokenizer" in msg


def test_bad_output_size():
  msg = _error(output_size=0)
  assert "output_size=0" in msg and "-1" in msg


def test_bad_efficient_attn():
  msg = _error(efficient_attn="flash")
  assert "efficient_attn='flash'" in msg and "swift" in msg and "fused" in msg


def test_bad_init_mode():
  msg = _error(init_mode="kaiming")
  assert "init_mode='kaiming'" in msg
  for mode in ("he", "bert", "gaussian", "xavier", "none"):
    assert mode in msg
    assert MegalodonConfig(**SMALL, init_mode=mode).init_mode == mode


def test_share_emb_with_a_different_output_size():
  msg = _error(share_emb=True, output_size=60)
  assert "share_emb=True" in msg and "output_size=60" in msg and "vocab_size=50" in msg
  assert MegalodonConfig(**SMALL, share_emb=True, output_size=50).out_size == 50  # equal size is fine


@pytest.mark.parametrize("field,value,allowed", [
    ("dtype", "fp32", ("float32", "bfloat16")),
    ("param_dtype", "bf16", ("float32", "bfloat16")),
    ("cema_impl", "fftconv", ("fft", "sequential", "chunked", "associative_scan")),
    ("attention_impl", "flash", ("xla",)),
    ("remat", "always", ("none", "full", "dots_saveable")),
])
def test_bad_execution_strings(field, value, allowed):
  msg = _error(**{field: value})
  assert f"{field}={value!r}" in msg
  for a in allowed:  # the fix: the accepted values are listed
    assert a in msg


def test_execution_choices_are_what_the_model_dispatches_on():
  """cema_impl, attention_impl and remat accept the names the model runs (the CEMA dispatch table, the attention
  implementations, the remat values with a jax checkpoint policy), read without importing jax."""
  from megalodon_jax.ops import attention, cema  # pylint: disable=import-outside-toplevel
  for name in ("auto", *cema.IMPLEMENTATIONS):
    assert MegalodonConfig(**SMALL, cema_impl=name).cema_impl == name
  assert all(fn.__name__ == f"cema_{name}" for name, fn in cema.IMPLEMENTATIONS.items())  # names paired right
  for name in ("xla", "pallas"):
    assert attention.resolve_attention_impl(MegalodonConfig(**SMALL, attention_impl=name).attention_impl) == name
  for name, policy in REMAT_POLICIES.items():
    assert MegalodonConfig(**SMALL, remat=name).remat_policy == name
    assert callable(getattr(jax.checkpoint_policies, policy))
  code = "import sys, megalodon_jax.config; assert not [m for m in sys.modules if m.split('.')[0] == 'jax']"
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("field", ["num_layers", "model_dim", "z_dim", "value_dim", "num_heads", "ffn_hidden_dim",
                                   "cema_ndim", "chunk_size", "norm_num_groups"])
@pytest.mark.parametrize("value", [0, -2])
def test_non_positive_sizes(field, value):
  msg = _error(**{field: value})
  assert f"{field}={value}" in msg and "positive integer" in msg


def test_non_integer_size_and_bad_scalars():
  assert "model_dim=32.0" in _error(model_dim=32.0)
  assert "norm_eps=0" in _error(norm_eps=0)
  assert "rope_base=1" in _error(rope_base=1)
  assert "swiglu=1" in _error(swiglu=1)


def test_replace_revalidates():
  c = MegalodonConfig(**SMALL)
  with pytest.raises(ConfigError, match="z_dim"):
    c.replace(z_dim=30, num_heads=4)
