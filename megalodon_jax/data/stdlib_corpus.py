"""The built-in corpus (`dataset="stdlib"`): the `.py` sources of the Python standard library running this code.

Real text that exists wherever Python does, so the quickstart needs no download. Third-party packages
(site-packages, dist-packages) and caches are excluded. Documents are named by their path relative to the stdlib
folder with "/" separators, so their order, `max_documents` selection and train/validation split (the rule of
`text_files.py`) are the same on every machine with the same Python version.
"""

from __future__ import annotations

import os
import sysconfig

from megalodon_jax.data.text_files import DocumentSet, stat_files

_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_root() -> str:
  return os.path.realpath(sysconfig.get_paths()["stdlib"])


def stdlib_documents(validation_percent: float, max_documents: int) -> DocumentSet:
  """The stdlib's `.py` files sorted by relative path, the first `max_documents` kept (0 = all)."""
  root = stdlib_root()
  named = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if d not in _EXCLUDED_DIRS]
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(folder, f)
        named.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
  return DocumentSet("stdlib", stat_files(named, max_documents), validation_percent, root=root)
