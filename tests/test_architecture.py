"""The official fields' validation, shared by the JAX config and the PyTorch runtime's ModelConf.

Both used to carry their own copy and had drifted; each case below was accepted by one of them. Every case is
checked against both classes, and the PyTorch side in a process that never imports jax.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from megalodon_jax import pytorch as mp
from megalodon_jax.architecture import OFFICIAL_FIELDS, Architecture
from megalodon_jax.config import MegalodonConfig
from megalodon_jax.errors import ConfigError

SMALL = dict(vocab_size=50, model_dim=32, z_dim=16, value_dim=32, ffn_hidden_dim=64, chunk_size=8,
             norm_num_groups=4)

# (field, value): the JAX config accepted these bools and the infinite RoPE base; the PyTorch one rejected them.
DRIFTED = [
    ("rope_base", math.inf),
    ("rope_base", -math.inf),
    ("rope_base", math.nan),
    ("rope_base", True),
    ("dropout", False),
    ("hidden_dropout", False),
    ("attention_dropout", False),
    ("norm_eps", True),
    ("vocab_size", True),
    ("output_size", True),
    ("num_layers", True),
]


@pytest.mark.parametrize("cls", [MegalodonConfig, mp.ModelConf])
@pytest.mark.parametrize("field,value", DRIFTED)
def test_drifted_cases_are_rejected_by_both(cls, field, value):
  with pytest.raises(ConfigError) as err:
    cls(**dict(SMALL, **{field: value}))
  assert isinstance(err.value, ValueError)
  assert str(err.value).startswith(f"{cls.__name__}.{field}={value!r}: "), str(err.value)


def test_drifted_cases_are_rejected_without_jax():
  """The PyTorch runtime's ModelConf, in a process where jax is never imported."""
  code = ("import json, math, sys\n"
          "import megalodon_jax.pytorch as mp\n"
          f"small = {SMALL!r}\n"
          f"cases = {[(f, repr(v)) for f, v in DRIFTED]!r}\n"
          "out = []\n"
          "for field, text in cases:\n"
          "  value = eval(text, {'inf': math.inf, 'nan': math.nan})\n"
          "  try:\n"
          "    mp.ModelConf(**dict(small, **{field: value}))\n"
          "    out.append(None)\n"
          "  except mp.ConfigError as e:\n"
          "    out.append(str(e))\n"
          "assert 'jax' not in sys.modules, 'jax imported'\n"
          "print(json.dumps(out))\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  messages = json.loads(proc.stdout)
  for (field, _), msg in zip(DRIFTED, messages):
    assert msg is not None and msg.startswith(f"ModelConf.{field}="), (field, msg)


@pytest.mark.parametrize("field,value", [("rope_base", 1e5), ("rope_base", 2), ("dropout", 0), ("norm_eps", 1e-6),
                                         ("output_size", 60)])
def test_valid_numbers_are_accepted_by_both(field, value):
  for cls in (MegalodonConfig, mp.ModelConf):
    assert getattr(cls(**dict(SMALL, **{field: value})), field) == value


def test_unset_vocab_is_a_pytorch_only_allowance():
  """The official vocab_size=-1 ("set later") is accepted by ModelConf (load() fills it) but not by the JAX
  config, which builds a model directly."""
  assert mp.ModelConf(**dict(SMALL, vocab_size=-1)).vocab_size == -1
  with pytest.raises(ConfigError, match=r"MegalodonConfig\.vocab_size=-1: .*tokenizer"):
    MegalodonConfig(**dict(SMALL, vocab_size=-1))


def test_one_field_list_for_both_runtimes():
  assert len(OFFICIAL_FIELDS) == 24
  assert mp.ModelConf.__mro__[1] is Architecture and MegalodonConfig.__mro__[1] is Architecture
  assert tuple(mp.ModelConf(**SMALL).to_dict()) == OFFICIAL_FIELDS
  jax_conf = MegalodonConfig(**SMALL)
  assert jax_conf.official_kwargs() == mp.ModelConf(**SMALL).to_dict()
  assert jax_conf.num_params() == mp.ModelConf(**SMALL).num_params()
