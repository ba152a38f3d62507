"""One error family: every deliberate error is a MegalodonError, one class per name, one CLI handler."""

from __future__ import annotations

import importlib
import io
import pathlib
import re
import subprocess
import sys

import pytest

from megalodon_jax import errors

# Where each class used to be defined (and is still importable from), and the builtin its callers catch.
OLD_HOMES = [
    ("megalodon_jax.config", "ConfigError", ValueError),
    ("megalodon_jax.training.train_config", "ConfigError", ValueError),
    ("megalodon_jax.pytorch", "ConfigError", ValueError),
    ("megalodon_jax.checkpoints.manager", "CheckpointError", RuntimeError),
    ("megalodon_jax.pytorch", "CheckpointError", ValueError),
    ("megalodon_jax.training.sharding", "ShardingError", ValueError),
    ("megalodon_jax.training.trainer", "NonFiniteLossError", RuntimeError),
    ("megalodon_jax.convert", "ConvertError", ValueError),
    ("megalodon_jax.convert.official", "StateDictError", ValueError),
    ("megalodon_jax.data", "DataError", ValueError),
    ("megalodon_jax.aot.topology", "TopologyError", ValueError),
]


@pytest.mark.parametrize("module,name,builtin", OLD_HOMES)
def test_one_class_per_name(module, name, builtin):
  cls = getattr(importlib.import_module(module), name)
  assert cls is getattr(errors, name)
  assert issubclass(cls, errors.MegalodonError) and issubclass(cls, builtin)


def test_every_error_class_of_the_package_is_in_the_family():
  """No module defines an exception class of its own outside megalodon_jax/errors.py."""
  root = pathlib.Path(__file__).resolve().parent.parent
  pattern = re.compile(r"^\s*class \w+(Error|Exception)\b", re.MULTILINE)
  defined = [str(p.relative_to(root)) for p in [*root.glob("megalodon_jax/**/*.py"), root / "train.py"]
             if p.name != "errors.py" and pattern.search(p.read_text(encoding="utf-8"))]
  assert defined == []


def _run(body, **kwargs):
  err = io.StringIO()
  status = errors.exit_on_error(body, stream=err, **kwargs)
  return status, err.getvalue()


def test_exit_on_error_prints_one_line_and_returns_2():
  def body():
    raise errors.ConfigError("--config.seq_len=7: must be\n   a multiple")
  assert _run(body) == (2, "error: --config.seq_len=7: must be a multiple\n")
  assert _run(body, one_line=False) == (2, "error: --config.seq_len=7: must be\n   a multiple\n")


def test_exit_on_error_status_of_a_diverged_run_is_1():
  def body():
    raise errors.NonFiniteLossError("step 12: the loss is nan")
  assert _run(body) == (1, "error: step 12: the loss is nan\n")


def test_exit_on_error_passes_results_and_other_exceptions():
  assert _run(lambda: 0) == (0, "")
  assert _run(lambda: 1) == (1, "")

  def missing():
    raise FileNotFoundError("no such file: x")
  assert _run(missing, also=(OSError,)) == (2, "error: no such file: x\n")
  with pytest.raises(FileNotFoundError):
    _run(missing)

  def bug():
    raise ValueError("a plain ValueError is a bug, not bad input")
  with pytest.raises(ValueError):
    _run(bug)


def test_errors_module_does_not_import_jax():
  code = "import sys, megalodon_jax.errors, megalodon_jax.architecture; assert 'jax' not in sys.modules"
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
