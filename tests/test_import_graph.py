"""The package's import structure, read from the source with `ast` (every import statement, function-local ones too).

Nodes are megalodon_jax's subpackages (`training`, `checkpoints`, `cli`, ...) and its top-level modules (`config`,
`model`, `flops`, ...; the package's own `__init__` is the node `__init__`). The command lines' `python -m` entry
points (`megalodon_jax.generate`, `aot/__main__.py`, ...) belong to the node `cli`, the top layer, which nothing else
imports. Layers import one way, so the graph has no cycle; `ops` is pure jnp (no flax), `pallas_kernels` stands
alone, and the PyTorch runtime imports no jax.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from typing import Iterator, Optional

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "megalodon_jax"
# `python -m` shims of modules that moved to megalodon_jax/cli/ (with every `__main__`, part of the `cli` node)
SHIMS = {f"{PACKAGE}.generate", f"{PACKAGE}.evaluate", f"{PACKAGE}.train_cli"}


def _is_entry_point(module: str) -> bool:
  return module in SHIMS or module.endswith(".__main__")


def _modules(root: str) -> dict[str, str]:
  """{dotted module name: file path} of every .py file of the package at `REPO/root`."""
  out = {}
  for folder, _, files in os.walk(os.path.join(REPO, root)):
    for name in files:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(folder, name), REPO)[:-3].split(os.sep)
        out[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(folder, name)
  return out


def _imports(module: str, path: str, known: set[str]) -> Iterator[tuple[str, int]]:
  """(imported module, line) for every import statement of a file; `from a import b` yields `a.b` if that is a
  module of `known`, else `a`."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  is_package = os.path.basename(path) == "__init__.py"
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, node.lineno
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative: resolved against the importing module's package
        parts = module.split(".")[:len(module.split(".")) - node.level + (1 if is_package else 0)]
        base = ".".join(parts + ([base] if base else []))
      for alias in node.names:
        full = f"{base}.{alias.name}"
        yield (full if full in known else base), node.lineno


def _node(module: str) -> Optional[str]:
  """The graph node of a megalodon_jax module (None for modules outside the package)."""
  parts = module.split(".")
  if parts[0] != PACKAGE:
    return None
  if _is_entry_point(module):
    return "cli"
  return parts[1] if len(parts) > 1 else "__init__"


def package_graph() -> dict[tuple[str, str], list[str]]:
  """{(node, imported node): ["module:line", ...]} over megalodon_jax, self-edges left out."""
  modules = _modules(PACKAGE)
  edges: dict[tuple[str, str], list[str]] = {}
  for module, path in sorted(modules.items()):
    src = _node(module)
    for imported, line in _imports(module, path, set(modules)):
      dst = _node(imported)
      if dst is not None and dst != src:
        edges.setdefault((src, dst), []).append(f"{module}:{line}")
  return edges


def find_cycle(edges) -> Optional[list[str]]:
  """A cycle [a, b, ..., a] of the directed graph given by its edges, or None."""
  succ: dict[str, list[str]] = {}
  for a, b in sorted(edges):
    succ.setdefault(a, []).append(b)
  state: dict[str, int] = {}  # 1: on the current path, 2: finished
  path: list[str] = []

  def visit(n: str) -> Optional[list[str]]:
    state[n] = 1
    path.append(n)
    for m in succ.get(n, []):
      if state.get(m) == 1:
        return path[path.index(m):] + [m]
      if m not in state:
        found = visit(m)
        if found:
          return found
    path.pop()
    state[n] = 2
    return None

  for n in sorted(succ):
    if n not in state:
      found = visit(n)
      if found:
        return found
  return None


def test_find_cycle_reports_the_cycle():
  assert find_cycle({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}) == ["a", "b", "c", "a"]
  assert find_cycle({("a", "b"), ("b", "c"), ("a", "c")}) is None


def test_graph_sees_static_and_local_imports():
  edges = package_graph()
  assert ("model", "nn") in edges and ("nn", "ops") in edges  # module-level imports
  # function-local (inference/loading.py imports the PyTorch file reader only when given a .pth)
  assert any(site.startswith("megalodon_jax.inference.loading:") for site in edges[("inference", "convert")])
  assert ("training", "checkpoints") in edges and ("convert", "checkpoints") in edges


def test_no_cycle_among_subpackages():
  edges = package_graph()
  cycle = find_cycle(edges)
  if cycle is not None:
    sites = "\n".join(f"  {a} -> {b}: {', '.join(edges[(a, b)])}" for a, b in zip(cycle, cycle[1:]))
    pytest.fail(f"import cycle {' -> '.join(cycle)}:\n{sites}")


def module_graph() -> dict[tuple[str, str], list[int]]:
  """{(module, imported module): [line, ...]} over every megalodon_jax module; `from a.b import name` points at the
  deepest module of the package it names (a package's `__init__` is its own node)."""
  modules = _modules(PACKAGE)
  edges: dict[tuple[str, str], list[int]] = {}
  for module, path in sorted(modules.items()):
    for imported, line in _imports(module, path, set(modules)):
      while imported not in modules and "." in imported:
        imported = imported.rsplit(".", 1)[0]
      if imported in modules and imported != module:
        edges.setdefault((module, imported), []).append(line)
  return edges


def test_no_cycle_among_modules():
  # Finer than the subpackage graph: also catches cycles inside one subpackage (ops.cema's dispatcher and its
  # implementations, a package __init__ and the modules it re-exports).
  edges = module_graph()
  assert ("megalodon_jax.ops.cema.dispatch", "megalodon_jax.ops.cema.chunked") in edges  # the graph sees them
  cycle = find_cycle(edges)
  assert cycle is None, " -> ".join(cycle)


def test_only_entry_points_import_the_command_lines():
  modules = _modules(PACKAGE)
  assert {"megalodon_jax.aot.__main__", "megalodon_jax.convert.__main__", *SHIMS} <= set(modules)
  bad = [f"{m}:{line} imports {name}" for m, path in modules.items() for name, line in _imports(m, path, set(modules))
         if (name == f"{PACKAGE}.cli" or name.startswith(f"{PACKAGE}.cli."))
         and not (m.startswith(f"{PACKAGE}.cli.") or _is_entry_point(m))]
  assert not bad, bad


def test_orbax_is_confined_to_checkpoints():
  modules = _modules(PACKAGE)
  users = {m for m, path in modules.items() for name, _ in _imports(m, path, set())
           if name == "orbax" or name.startswith("orbax.")}
  assert users and all(m.startswith(f"{PACKAGE}.checkpoints.") for m in users), sorted(users)


def test_checkpoints_is_below_training_inference_convert():
  edges = package_graph()
  upward = {e: sites for e, sites in edges.items()
            if e[0] == "checkpoints" and e[1] in ("training", "inference", "convert", "aot", "data")}
  assert not upward, upward


def test_ops_imports_no_flax():
  modules = _modules(os.path.join(PACKAGE, "ops"))
  bad = [f"{m}:{line} imports {name}" for m, path in modules.items() for name, line in _imports(m, path, set())
         if name == "flax" or name.startswith("flax.")]
  assert modules and not bad, bad


def test_pallas_kernels_import_nothing_from_megalodon_jax():
  modules = _modules("pallas_kernels")
  bad = [f"{m}:{line} imports {name}" for m, path in modules.items() for name, line in _imports(m, path, set())
         if _node(name) is not None]
  assert modules and not bad, bad


def test_pytorch_runtime_imports_no_jax():
  # A fresh interpreter: this process has jax loaded already (conftest).
  submodules = sorted(m for m in _modules(os.path.join(PACKAGE, "pytorch")))
  script = textwrap.dedent(f"""
    import importlib, sys
    for name in {submodules!r}:
      importlib.import_module(name)
    print(sorted(m for m in sys.modules if m == "jax" or m.startswith("jax.")))
  """)
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
  out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "megalodon_jax.pytorch.model" in submodules
  assert out.stdout.strip() == "[]", f"importing megalodon_jax.pytorch loaded jax modules: {out.stdout.strip()}"


MESH_AXIS_NAMES = ("data", "sequence", "fsdp", "tensor")
# The one module that writes the mesh axis names out; everything else imports them from it.
MESH_AXES_MODULE = f"{PACKAGE}/mesh_axes.py"
# Files that may still write them out, with the reason.
MESH_AXIS_FILES: dict[str, str] = {}
# (file, literal) whose literal means something else where the context rules of `_not_a_mesh_axis` cannot tell.
OTHER_MEANINGS = {
    (f"{PACKAGE}/checkpoints/layout.py", "data"): "the checkpoint item holding the data pipeline's state",
}


def _not_a_mesh_axis(node: ast.Constant, parent: ast.AST) -> bool:
  """Whether a string literal is, by its place, some other "data" or "sequence": a dict literal's key (JSON
  states), a set literal's member (config group names), a piece of an f-string's text, or the key of a `.get(...)`
  or `[...]` lookup on anything but a mesh's `.shape` (`state.get("data")`, `cfg["data"]`)."""
  if isinstance(parent, ast.Dict):
    return any(key is node for key in parent.keys)
  if isinstance(parent, (ast.Set, ast.JoinedStr)):
    return True
  if isinstance(parent, ast.Call) and isinstance(parent.func, ast.Attribute) and parent.args:
    key, of = parent.args[0], parent.func.value if parent.func.attr in ("get", "pop", "setdefault") else None
  elif isinstance(parent, ast.Subscript):
    key, of = parent.slice, parent.value
  else:
    return False
  return key is node and of is not None and not (isinstance(of, ast.Attribute) and of.attr == "shape")


def mesh_axis_literals() -> list[str]:
  """"file:line: 'name'" for every string literal of megalodon_jax equal to a mesh axis name, outside mesh_axes.py,
  MESH_AXIS_FILES, OTHER_MEANINGS and the contexts of `_not_a_mesh_axis`."""
  found = []
  for path in sorted(_modules(PACKAGE).values()):
    rel = os.path.relpath(path, REPO).replace(os.sep, "/")
    if rel == MESH_AXES_MODULE or rel in MESH_AXIS_FILES:
      continue
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    for parent in ast.walk(tree):
      for node in ast.iter_child_nodes(parent):
        if (isinstance(node, ast.Constant) and node.value in MESH_AXIS_NAMES
            and (rel, node.value) not in OTHER_MEANINGS and not _not_a_mesh_axis(node, parent)):
          found.append(f"{rel}:{node.lineno}: {node.value!r}")
  return found


def test_mesh_axis_names_are_written_only_in_mesh_axes():
  with open(os.path.join(REPO, MESH_AXES_MODULE), encoding="utf-8") as f:
    source = f.read()
  assert all(repr(name) in source.replace('"', "'") for name in MESH_AXIS_NAMES)
  assert all(os.path.exists(os.path.join(REPO, p)) for p in list(MESH_AXIS_FILES) + [p for p, _ in OTHER_MEANINGS])
  found = mesh_axis_literals()
  assert not found, ("mesh axis names written out (import them from megalodon_jax/mesh_axes.py):\n  "
                     + "\n  ".join(found))


def private_imports() -> list[str]:
  """"module:line: name" for every `from x import _name` of a megalodon_jax module (or pallas_kernels, train.py)
  where x is another module of ours: a leading underscore says "not for other modules"."""
  found = []
  for root in (PACKAGE, "pallas_kernels"):
    modules = _modules(root)
    for module, path in sorted(modules.items()):
      with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
      for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in (
            PACKAGE, "pallas_kernels")):
          found += [f"{module}:{node.lineno}: {a.name}" for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")]
  return found


def test_no_module_imports_a_private_name_of_another():
  assert private_imports() == []


def test_private_import_finder_sees_one(tmp_path, monkeypatch):
  pkg = tmp_path / PACKAGE
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("def _hidden():\n  pass\n")
  (pkg / "b.py").write_text("from megalodon_jax.a import _hidden\nfrom . import a\n")
  (tmp_path / "pallas_kernels").mkdir()
  monkeypatch.setattr(sys.modules[__name__], "REPO", str(tmp_path))
  assert private_imports() == ["megalodon_jax.b:1: _hidden"]


def _assigned_keys(path: str) -> set[str]:
  """Config keys a configs/*.py file assigns: `c.seq_len = ...`, `m.num_layers = ...` (m = c.model) and
  `c.mesh.data, c.mesh.fsdp = ...`, as "seq_len", "model.num_layers", "mesh.data"."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  aliases = {"c": ""}
  for node in ast.walk(tree):  # `m = c.model`, `o = c.optimizer`
    if isinstance(node, ast.Assign) and isinstance(node.value, ast.Attribute) and isinstance(node.value.value,
                                                                                              ast.Name):
      for target in node.targets:
        if isinstance(target, ast.Name) and node.value.value.id == "c":
          aliases[target.id] = node.value.attr + "."
  keys = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Assign):
      targets = [t for target in node.targets for t in (target.elts if isinstance(target, ast.Tuple) else [target])]
      for t in targets:
        parts = []
        while isinstance(t, ast.Attribute):
          parts.insert(0, t.attr)
          t = t.value
        if parts and isinstance(t, ast.Name) and t.id in aliases:
          keys.add(aliases[t.id] + ".".join(parts))
  return keys


def test_configs_share_the_typed_definition_of_every_field():
  """configs/default.py is the typed config's defaults plus the overrides it writes out: the same keys, and every
  value it does not assign is the typed default (a default re-typed there, or changed in one place only, fails)."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  import importlib.util  # pylint: disable=import-outside-toplevel
  from megalodon_jax.training.train_config import command_line_dict  # pylint: disable=import-outside-toplevel
  path = os.path.join(REPO, "megalodon_jax", "configs", "default.py")
  if not os.path.exists(path):
    path = os.path.join(REPO, "configs", "default.py")
  spec = importlib.util.spec_from_file_location("default_config_under_test", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)

  def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
      out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out

  shipped, typed = flat(module.get_config().to_dict()), flat(command_line_dict().to_dict())
  assert set(shipped) == set(typed)
  overridden = _assigned_keys(path)
  assert overridden and overridden <= set(typed), overridden - set(typed)
  assert {k: v for k, v in shipped.items() if k not in overridden} == {k: v for k, v in typed.items()
                                                                       if k not in overridden}
  # The model section's fields are the families' sections': one definition of each (architecture.py, config.py,
  # llama/config.py), a name both families have meaning the same thing in both.
  from megalodon_jax import families  # pylint: disable=import-outside-toplevel
  assert {k.split(".", 1)[1] for k in typed if k.startswith("model.")} == {
      f.name for family in families.FAMILIES.values() for f in dataclasses.fields(family.section_class())}
