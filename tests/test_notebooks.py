"""Executes every notebook in notebooks/ headlessly (nbclient, the current interpreter's python3 kernel).

The notebooks assert their own claims (CEMA paths agree, streamed norms equal full ones, the attention mask is the
chunk pattern, the cache size is constant, PyTorch logits match), so a notebook that runs to the end has passed
them. Here we also check what a reader and Colab rely on: no committed outputs, the Colab badge and the Colab-only
install cell, small figures, and no files written into the repository.
"""

import ast
import base64
import json
import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
COLAB_URL = "https://colab.research.google.com/github/megalodon-jax/megalodon-jax/blob/main/notebooks/"
NOTEBOOKS = ("01_complex_ema.ipynb", "02_timestep_norm.ipynb", "03_chunked_attention.ipynb",
             "04_streaming_generation.ipynb")
# Per-cell limit: generous for a loaded 2-core CI machine; the slowest cell (04's training) takes ~30-60 s.
CELL_TIMEOUT_S = 600
MIN_FIGURES = {"01_complex_ema.ipynb": 4, "02_timestep_norm.ipynb": 3, "03_chunked_attention.ipynb": 4,
               "04_streaming_generation.ipynb": 3}
MAX_FIGURE_BYTES = 150_000  # "small figures": each PNG the notebooks display


def _read(name):
  return nbformat.read(NOTEBOOK_DIR / name, as_version=4)


def _repo_listing():
  """Top-level entries of the repository and everything under notebooks/ (where a stray write would land)."""
  ignore = {"__pycache__", ".pytest_cache", ".ipynb_checkpoints"}
  top = {p.name for p in ROOT.iterdir() if p.name not in ignore}
  under = {str(p.relative_to(ROOT)) for p in NOTEBOOK_DIR.rglob("*") if not ignore & set(p.parts)}
  return top, under


def test_every_notebook_is_listed():
  assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_form(name):
  nb = _read(name)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code), f"{name}: clear the outputs before committing"
  first_md = next(c for c in nb.cells if c.cell_type == "markdown")
  assert f"]({COLAB_URL}{name})" in first_md.source and "colab-badge.svg" in first_md.source
  setup = code[0].source
  assert 'if "google.colab" in sys.modules:' in setup and "pip" in setup and "github.com/megalodon-jax" in setup
  # Public API only: no private module, name or attribute of the package (or anything else) in any cell.
  for cell in code:
    for node in ast.walk(ast.parse(cell.source)):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megalodon_jax"):
        names = node.module.split(".") + [a.name for a in node.names]
        assert not any(n.startswith("_") for n in names), f"{name}: private import from {node.module}"
      if isinstance(node, ast.Attribute):
        assert not node.attr.startswith("_") or node.attr.startswith("__"), f"{name}: private attribute .{node.attr}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name, monkeypatch):
  # The kernel inherits the environment: share the suite's persistent XLA compilation cache (speed only).
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR",
                     os.environ.get("MEGALODON_JAX_CACHE", os.path.expanduser("~/.cache/megalodon-jax/xla")))
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  before = _repo_listing()
  nb = _read(name)
  client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S, allow_errors=False,
                          resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
  try:
    client.execute()
  except CellExecutionError as e:
    pytest.fail(f"{name} failed:\n{e}")
  assert _repo_listing() == before, f"{name} wrote files into the repository"

  figures = [base64.b64decode(out["data"]["image/png"]) for cell in nb.cells if cell.cell_type == "code"
             for out in cell.outputs if "image/png" in out.get("data", {})]
  assert len(figures) >= MIN_FIGURES[name], f"{name}: expected figures, got {len(figures)}"
  assert all(png.startswith(b"\x89PNG") for png in figures)
  biggest = max(len(png) for png in figures)
  assert biggest <= MAX_FIGURE_BYTES, f"{name}: a {biggest}-byte figure; keep them small"
  errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
            if out.get("output_type") == "error"]
  assert not errors, json.dumps(errors)[:2000]
