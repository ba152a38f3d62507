"""The repository documents itself: no reference leaves it, and every docs/ link lands on a real heading.

- No text file of the repository mentions a path outside it or cites sections of a document it does not ship.
  A section sign may only cite the paper (the line must say "paper").
- Every `docs/<page>.md#<anchor>` reference anywhere (code, docstrings, --help texts, configs, README, notebooks,
  tests) and every relative link inside docs/ names an existing page and one of its headings, by GitHub's anchor
  rule (lower case, punctuation dropped, spaces to hyphens, "-1", "-2", ... for repeated headings).
"""

from __future__ import annotations

import functools
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Built from pieces so that this file does not match itself.
FORBIDDEN = ("../" + "shared", "shared" + "/docs", "spec" + " §", "paper" + "_anchors")
SECTION_SIGN = "\u00a7"
_SKIP_DIRS = {".git", ".venv", ".venv-cuda", "__pycache__", ".pytest_cache", "runs", "build"}
# A reference to a docs page from anywhere: docs/<page>.md, optionally with #anchor.
_DOCS_REF = re.compile(r"(?<![\w./-])docs/([\w.-]+\.md)(?:#([\w-]+))?")
# A relative markdown link inside docs/: ](page.md#anchor), ](page.md) or ](#anchor).
_MD_LINK = re.compile(r"\]\((?!https?:|/)([\w./-]*\.md)?(?:#([\w-]+))?\)")
_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _repo_files() -> list[str]:
  """Tracked and new (not ignored) files, relative to the root; a plain walk where git is unavailable."""
  try:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, check=True, timeout=60).stdout
    return sorted({p for p in out.decode("utf-8").split("\0") if p and os.path.isfile(os.path.join(ROOT, p))})
  except (OSError, subprocess.SubprocessError):
    files = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
      dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
      files += [os.path.relpath(os.path.join(dirpath, f), ROOT) for f in filenames]
    return sorted(files)


@functools.lru_cache(maxsize=None)
def _text_files() -> dict[str, str]:
  """path -> text of every text file (binary files, e.g. the safetensors fixtures, are skipped)."""
  texts = {}
  for path in _repo_files():
    with open(os.path.join(ROOT, path), "rb") as f:
      data = f.read()
    if b"\0" in data:
      continue
    try:
      texts[path] = data.decode("utf-8")
    except UnicodeDecodeError:
      continue
  return texts


def github_slug(heading: str) -> str:
  """GitHub's anchor for a heading's text: markup and punctuation dropped, lower case, spaces to hyphens."""
  text = re.sub(r"`|\*\*|__|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading)
  text = "".join(ch for ch in text.lower() if ch.isalnum() or ch in " -_")
  return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
  """The anchors of a markdown page's headings (headings inside code fences do not count)."""
  seen: dict[str, int] = {}
  out = set()
  fenced = False
  for line in markdown.splitlines():
    if _FENCE.match(line):
      fenced = not fenced
      continue
    m = None if fenced else _HEADING.match(line)
    if m is None:
      continue
    slug = github_slug(m.group(2))
    n = seen.get(slug, 0)
    seen[slug] = n + 1
    out.add(slug if n == 0 else f"{slug}-{n}")
  return out


def test_slug_rule():
  assert github_slug("Timestep norm") == "timestep-norm"
  assert github_slug("megalodon-hf") == "megalodon-hf"
  assert github_slug("FLOPs and MFU") == "flops-and-mfu"
  assert github_slug("The `sequence` axis: L/S tokens (each)") == "the-sequence-axis-ls-tokens-each"
  assert anchors("# A\n```\n# not a heading\n```\n## A\n### B.\n") == {"a", "a-1", "b"}


def test_no_reference_leaves_the_repository():
  texts = _text_files()
  assert "README.md" in texts and "docs/model.md" in texts  # the scan sees the repository
  hits = [f"{path}:{i}: {line.strip()[:100]}"
          for path, text in texts.items() for i, line in enumerate(text.splitlines(), 1)
          if any(s in line for s in FORBIDDEN) or (SECTION_SIGN in line and "paper" not in line.lower())]
  assert not hits, "references to documents outside the repository (cite docs/<page>.md#<anchor>):\n" + "\n".join(hits)


def _docs_pages() -> dict[str, set[str]]:
  texts = _text_files()
  return {path[len("docs/"):]: anchors(text) for path, text in texts.items()
          if path.startswith("docs/") and path.endswith(".md")}


def test_docs_references_name_real_pages_and_headings():
  pages = _docs_pages()
  for needed in ("model.md", "streaming.md", "sharding.md", "checkpoints.md", "export.md", "training.md", "README.md"):
    assert needed in pages, f"docs/{needed} is missing"
  bad, count = [], 0
  for path, text in _text_files().items():
    for i, line in enumerate(text.splitlines(), 1):
      refs = [(m.group(1), m.group(2)) for m in _DOCS_REF.finditer(line)]
      if path.startswith("docs/") and path.endswith(".md"):
        refs += [(m.group(1) or path[len("docs/"):], m.group(2)) for m in _MD_LINK.finditer(line)
                 if m.group(1) or m.group(2)]
      for page, anchor in refs:
        count += 1
        if page not in pages:
          bad.append(f"{path}:{i}: docs/{page} does not exist")
        elif anchor is not None and anchor not in pages[page]:
          bad.append(f"{path}:{i}: docs/{page} has no heading with anchor #{anchor}")
  assert count > 50  # the code does point at its documentation
  assert not bad, "broken documentation references:\n" + "\n".join(bad)


@pytest.mark.parametrize("anchor", ["block", "cema", "timestep-norm", "attention", "initialisation", "numerics",
                                    "configurations"])
def test_model_page_has_the_sections_the_code_cites(anchor):
  assert anchor in _docs_pages()["model.md"]


@pytest.mark.parametrize("anchor", ["official-key-map", "model-parallel-shards", "megalodon-hf", "parameter-count"])
def test_export_page_has_the_sections_the_code_cites(anchor):
  assert anchor in _docs_pages()["export.md"]
