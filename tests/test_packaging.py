"""The declared dependencies (pyproject.toml) against what the package really imports.

Every third-party module imported anywhere in `megalodon_jax` or `pallas_kernels` (top-level and function-local
imports, found with `ast`) must come from a declared dependency: a core one, or the extra that owns it (torch and
safetensors: `torch`; matplotlib: `plot`). And every core dependency must be imported by the package, except
runtime pieces that are loaded indirectly (named below with the reason), so the list neither misses nor hoards.
"""

import ast
import importlib.metadata
import pathlib
import re
import sys
import tomllib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
OWN = {"megalodon_jax", "pallas_kernels"}
# Modules an extra provides; they may only be imported by the code that needs that extra.
EXTRA_MODULES = {"torch": "torch", "safetensors": "torch", "matplotlib": "plot", "wandb": "wandb", "huggingface_hub": "torch",
                 "httpx": "torch", "lm_eval": "lm_eval"}
# Declared but never imported by name: jax loads jaxlib; TFDS reads array_record files through array-record;
# etils.epath opens gs:// paths through fsspec, which loads gcsfs.
INDIRECT = {"jaxlib", "array-record", "gcsfs"}


def _norm(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
  return _norm(re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0])


def _pyproject():
  return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def imported_modules() -> dict[str, set[str]]:
  """Top-level third-party module -> the package files importing it."""
  found: dict[str, set[str]] = {}
  for package in ("megalodon_jax", "pallas_kernels"):
    for path in (REPO / package).rglob("*.py"):
      for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
          names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
          names = [node.module]
        else:
          continue
        for name in names:
          top = name.split(".")[0]
          if top not in OWN and top not in sys.stdlib_module_names and top != "__future__":
            found.setdefault(top, set()).add(str(path.relative_to(REPO)))
  return found


def test_every_import_is_declared_and_every_dependency_is_used():
  project = _pyproject()
  core = {_requirement_name(r) for r in project["dependencies"]}
  extras = {k: {_requirement_name(r) for r in v} for k, v in project["optional-dependencies"].items()}
  dists = importlib.metadata.packages_distributions()
  used = set()
  for module, files in imported_modules().items():
    assert module in dists, f"{module} (imported by {sorted(files)}) is not installed: declare and install it"
    dist = {_norm(d) for d in dists[module]}
    used |= dist
    extra = EXTRA_MODULES.get(module)
    owner = extras[extra] if extra else core
    assert dist & owner, (f"{module} (distribution {sorted(dist)}, imported by {sorted(files)}) is not declared in "
                          f"{'the ' + repr(extra) + ' extra' if extra else 'project.dependencies'}")
  unused = core - used - INDIRECT
  assert not unused, f"declared but never imported by the package: {sorted(unused)}"
  assert set(extras) >= {"tpu", "cuda12", "torch", "dev"}


def test_extra_only_modules_are_imported_lazily():
  """A core install (no extras) must import: torch/safetensors/matplotlib only inside functions or the PyTorch
  runtime package, which is documented as needing the `torch` extra."""
  for package in ("megalodon_jax", "pallas_kernels"):
    for path in (REPO / package).rglob("*.py"):
      rel = str(path.relative_to(REPO))
      if rel.startswith(("megalodon_jax/pytorch/", "megalodon_jax/lm_eval/model.py")):  # need their extras
        continue
      tree = ast.parse(path.read_text())
      for node in tree.body:  # module level only
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
        for name in names:
          assert name.split(".")[0] not in EXTRA_MODULES, f"{rel} imports {name} at module level"


def test_the_wheel_ships_the_configs_inside_the_package():
  """Package discovery as pyproject.toml configures it: the configs are `megalodon_jax.configs` (`--config tiny`
  from a wheel), and the checkout's top-level configs/ (a symlink to them) is no package of the wheel, whose name
  would clash with a user's own `configs`."""
  setuptools = pytest.importorskip("setuptools")
  find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
  packages = set(setuptools.find_packages(where=str(REPO), include=find["include"]))
  assert {"megalodon_jax", "megalodon_jax.cli", "megalodon_jax.configs", "pallas_kernels"} <= packages
  assert not {p for p in packages if p.split(".")[0] not in OWN}, sorted(packages)
  assert (REPO / "megalodon_jax" / "configs" / "tiny.py").is_file() and (REPO / "configs").resolve() == (
      REPO / "megalodon_jax" / "configs")


def test_license_and_version():
  text = (REPO / "LICENSE").read_text()
  assert "Apache License" in text[:200] and "Version 2.0, January 2004" in text[:200]
  assert _pyproject()["license"] == {"text": "Apache-2.0"}
  import megalodon_jax  # pylint: disable=import-outside-toplevel
  assert megalodon_jax.__version__ == _pyproject()["version"]
