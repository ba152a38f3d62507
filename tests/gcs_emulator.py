"""An emulated `gs://` for tests: the `fake_gcs` fixture maps gs://<bucket>/<path> to <tmp_path>/gcs/<bucket>/<path>.

It sits behind the same abstraction as the real thing: an fsspec filesystem registered for the protocols "gs" and
"gcs" (what `etils.epath` asks fsspec for), with gcsfs's conventions: paths come back as "<bucket>/<path>" without
the "gs://", and there is no append mode (`open(..., "a")` raises, as gcsfs does). Orbax writes array data with
TensorStore, whose gs:// driver talks to real GCS: the fixture makes Orbax's GCS kvstore spec point TensorStore's
file driver at the emulated location instead, and reports flat (non-hierarchical) buckets.

At teardown the fixture fails the test if a local folder named "gs:" or "gs" appeared in the working directory or
in tmp_path: the footprint of code that handed a gs:// path to `os` functions (os.makedirs("gs://b/run") silently
makes ./gs:/b/run).
"""

from __future__ import annotations

import importlib
import os

import fsspec
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils

PROTOCOLS = ("gs", "gcs")


def _filesystem_class(root: str) -> type:
  class EmulatedGCS(DirFileSystem):
    """`DirFileSystem` rooted at `root`, answering for gs:// (storage options such as gcsfs's are ignored)."""

    protocol = PROTOCOLS
    root_marker = ""
    cachable = False  # every test gets a filesystem rooted in its own tmp_path

    def __init__(self, *args, **storage_options):
      del args, storage_options
      super().__init__(path=root, fs=LocalFileSystem())

    def open(self, path, mode="rb", *args, **kwargs):
      if "a" in mode:
        raise NotImplementedError("object stores have no append mode (gcsfs raises too)")
      if "w" in mode:
        self.fs.makedirs(os.path.dirname(self._join(path)), exist_ok=True)  # GCS has no folders to create first
      return super().open(path, mode, *args, **kwargs)

  return EmulatedGCS


def local_path(root: str, url: str) -> str:
  """The local file behind an emulated gs:// URL."""
  assert url.startswith("gs://"), url
  return os.path.join(root, url[len("gs://"):])


def _kvstore_for_gcs(root: str):
  def build(ckpt_path: str) -> dict:
    return {"driver": "file", "path": local_path(root, ckpt_path)}
  return build


def _stray_gs_folders(*folders: str) -> list[str]:
  return [os.path.join(f, name) for f in folders if os.path.isdir(f) for name in os.listdir(f)
          if name in ("gs:", "gs")]


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """The local root behind gs:// (gs://b/x is <root>/b/x); the test's working directory is a fresh empty folder."""
  root = str(tmp_path / "gcs")
  os.makedirs(root)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  before = {p: fsspec.registry.get(p) for p in PROTOCOLS}
  cls = _filesystem_class(root)
  for p in PROTOCOLS:
    fsspec.register_implementation(p, cls, clobber=True)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # epath caches the filesystem per protocol
  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", _kvstore_for_gcs(root))
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  try:
    yield root
  finally:
    for p, impl in before.items():
      if impl is None:
        importlib.import_module("fsspec.registry")._registry.pop(p, None)  # pylint: disable=protected-access
      else:
        fsspec.register_implementation(p, impl, clobber=True)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
  stray = _stray_gs_folders(str(cwd), str(tmp_path), str(tmp_path / "gcs"))
  assert not stray, f"a gs:// path was used as a local file name: {stray}"
