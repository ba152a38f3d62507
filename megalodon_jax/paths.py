"""Every file the package reads or writes goes through `etils.epath` (what Orbax and TFDS use), so a user path may
be local or a URL such as `gs://bucket/run` (epath reaches object stores through fsspec: `gcsfs` for gs://).

Paths stay strings in configs and on command lines; they become `epath.Path`s here, at the edge. Object stores have
no append, no rename of folders and no file handles for C libraries, so the helpers below give one behaviour for
both kinds of path:
  - `write_bytes_atomic` / `write_text_atomic`: local files are written to a temporary name and renamed; one object
    store PUT already replaces an object whole (readers see the old or the new one, never a mix).
  - `local_copy` / `local_target`: a local file name for libraries that only take one (torch, safetensors, mmap);
    remote files are downloaded into, or uploaded from, a temporary folder.
  - `SyncedFolder`: a local staging folder mirrored to a remote one (TensorBoard's own writer only writes locally).
  - `list_files` / `glob_files`: recursive listings (epath's `walk` returns bucket paths without their `gs://` on
    fsspec backends, and its `glob` refuses `**`).
  - `canonical` / `overlap`: whether two paths name the same place, or one lies inside the other (writers use it
    so an output never swallows what they read).
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob as globlib
import os
import posixpath
import re
import shutil
import tempfile
import time
import uuid
from typing import Iterator, Optional, Union

from etils import epath

PathLike = Union[str, os.PathLike]
_GLOB_CHARS = re.compile(r"[*?[]")


def is_remote(path: PathLike) -> bool:
  """Whether `path` is a URL (gs://, s3://, ...) rather than a local file name."""
  return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
  """`path` as an `epath.Path`; `~` is expanded in local paths (relative ones stay relative), URLs are kept."""
  text = os.fspath(path)
  return epath.Path(text if is_remote(text) else os.path.expanduser(text))


def join(folder: PathLike, *names: str) -> str:
  """`folder/name...` as a string (URLs keep their `scheme://`, which os.path.join would also keep)."""
  return os.fspath(as_path(folder).joinpath(*names)) if is_remote(folder) else os.path.join(folder, *names)


def abspath(path: PathLike) -> str:
  """An absolute local path (user expanded), or the URL unchanged."""
  text = os.fspath(path)
  return text if is_remote(text) else os.path.abspath(os.path.expanduser(text))


def canonical(path: PathLike) -> str:
  """The one spelling of `path` for comparisons: a local path made absolute with `~`, `..` and every symlink
  resolved (`os.path.realpath`: a path that does not exist yet resolves its existing part); a URL with its scheme in
  lower case and `.`/`..` segments, doubled and trailing slashes removed (an object store has no links)."""
  text = os.fspath(path)
  if not is_remote(text):
    return os.path.realpath(os.path.expanduser(text))
  scheme, rest = text.split("://", 1)
  rest = posixpath.normpath("/" + rest).lstrip("/") if rest else ""  # "/" first: ".." stops at the root
  return f"{scheme.lower()}://{rest}"


def overlap(a: PathLike, b: PathLike) -> Optional[str]:
  """How the places `a` and `b` relate, compared by `canonical`: "same", "inside" (`a` lies below the folder `b`),
  "contains" (`b` lies below the folder `a`) or None (unrelated, or one local and one remote)."""
  if is_remote(a) != is_remote(b):
    return None
  x, y = canonical(a), canonical(b)
  if x == y:
    return "same"
  sep = "/" if is_remote(x) else os.sep
  if x.startswith(y.rstrip(sep) + sep):
    return "inside"
  if y.startswith(x.rstrip(sep) + sep):
    return "contains"
  return None


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
  """Replaces `path` by `data` whole: a kill leaves the old or the new content, never part of it."""
  p = as_path(path)
  if is_remote(p):
    p.write_bytes(data)  # one object PUT: atomic on object stores
    return
  tmp = f"{os.fspath(p)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.fspath(p))


def write_text_atomic(path: PathLike, text: str) -> None:
  write_bytes_atomic(path, text.encode("utf-8"))


def makedirs(path: PathLike) -> None:
  """Creates the folder `path` (and its parents); a no-op on object stores' implied folders that exist."""
  as_path(path).mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def local_copy(path: PathLike, suffix: str = "") -> Iterator[str]:
  """A local file name holding `path`'s bytes: `path` itself when local, else a temporary download."""
  if not is_remote(path):
    yield os.path.expanduser(os.fspath(path))
    return
  with tempfile.TemporaryDirectory(prefix="megalodon_download_") as tmp:
    local = os.path.join(tmp, "file" + suffix)
    as_path(path).copy(local)
    yield local


@contextlib.contextmanager
def local_target(path: PathLike) -> Iterator[str]:
  """A local file name to write `path` through: `path` itself when local, else a temporary file uploaded (one
  object write) when the block ends without an exception."""
  if not is_remote(path):
    yield os.path.expanduser(os.fspath(path))
    return
  with tempfile.TemporaryDirectory(prefix="megalodon_upload_") as tmp:
    local = os.path.join(tmp, as_path(path).name or "file")
    yield local
    epath.Path(local).copy(as_path(path), overwrite=True)


def copy_tree(src: PathLike, dst: PathLike) -> None:
  """Copies every file under the folder `src` to the same relative path under `dst` (either may be remote)."""
  src_root = as_path(src)
  prefix = len(os.fspath(src_root).rstrip("/")) + 1
  for f in list_files(src):
    target = as_path(dst) / f[prefix:]
    if not is_remote(target):
      os.makedirs(os.path.dirname(os.fspath(target)), exist_ok=True)
    as_path(f).copy(target, overwrite=True)


def list_files(root: PathLike, *, skip_hidden: bool = False) -> list[str]:
  """Every regular file under the folder `root`, sorted; `skip_hidden` leaves out names (files and folders)
  starting with a dot."""
  out: list[str] = []
  pending = [as_path(root)]
  while pending:
    folder = pending.pop()
    for entry in folder.iterdir():
      if skip_hidden and entry.name.startswith("."):
        continue
      (pending if entry.is_dir() else out).append(entry)
  return sorted(os.fspath(p) for p in out)


def _glob_regex(pattern: str) -> re.Pattern:
  """fnmatch with `/` kept: `*` and `?` stay inside one name, `**/` matches any number of folders."""
  parts, i = [], 0
  while i < len(pattern):
    if pattern.startswith("**/", i):
      parts.append("(?:.*/)?")
      i += 3
    elif pattern.startswith("**", i):
      parts.append(".*")
      i += 2
    elif pattern[i] == "*":
      parts.append("[^/]*")
      i += 1
    elif pattern[i] == "?":
      parts.append("[^/]")
      i += 1
    elif pattern[i] == "[" and "]" in pattern[i + 1:]:
      end = pattern.index("]", i + 2 if pattern[i + 1:i + 2] in ("!", "]") else i + 1)
      parts.append(fnmatch.translate(pattern[i:end + 1])[4:-3])  # "(?s:[...])\Z" -> "[...]"
      i = end + 1
    else:
      parts.append(re.escape(pattern[i]))
      i += 1
  return re.compile("".join(parts) + r"\Z", re.S)


def glob_files(pattern: PathLike) -> list[str]:
  """Paths matching a glob (`**` recurses); files and folders, sorted. Local patterns use the `glob` module;
  remote ones list the folder before the first wildcard and match the names below it (like `glob`, wildcards skip
  names starting with a dot unless the pattern spells the dot)."""
  text = os.fspath(pattern)
  if not is_remote(text):
    return sorted(globlib.glob(os.path.expanduser(text), recursive=True))
  scheme, rest = text.split("://", 1)
  head = rest[:_GLOB_CHARS.search(rest).start()] if _GLOB_CHARS.search(rest) else rest
  base = head[:head.rfind("/")] if "/" in head else head  # the last folder without a wildcard
  root = as_path(f"{scheme}://{base}")
  if not root.is_dir():
    return [text] if as_path(text).exists() else []
  tail = rest[len(base) + 1:]
  regex, hidden_ok = _glob_regex(tail), "/." in "/" + tail
  found, pending = [], [root]
  while pending:
    folder = pending.pop()
    for entry in folder.iterdir():
      if entry.name.startswith(".") and not hidden_ok:
        continue
      rel = os.fspath(entry)[len(os.fspath(root)) + 1:]
      if regex.match(rel):
        found.append(os.fspath(entry))
      if entry.is_dir():
        pending.append(entry)
  return sorted(found)


class SyncedFolder:
  """A local folder standing in for `target`, a remote one: `sync()` copies every file (whole, changed or not)
  up, at most every `min_interval_s` seconds unless forced. For a local `target` the folder is `target` itself
  and `sync` does nothing."""

  def __init__(self, target: PathLike, *, min_interval_s: float = 5.0):
    self.target = os.fspath(target)
    self.remote = is_remote(self.target)
    self.local = tempfile.mkdtemp(prefix="megalodon_staging_") if self.remote else self.target
    self.min_interval_s, self._synced_at = min_interval_s, float("-inf")

  def sync(self, force: bool = False) -> None:
    if not self.remote or (not force and time.monotonic() - self._synced_at < self.min_interval_s):
      return
    self._synced_at = time.monotonic()
    dest = as_path(self.target)
    dest.mkdir(parents=True, exist_ok=True)
    for name in sorted(os.listdir(self.local)):
      src = os.path.join(self.local, name)
      if os.path.isfile(src):
        epath.Path(src).copy(dest / name, overwrite=True)

  def close(self) -> None:
    """A last sync, then the staging folder is removed."""
    if self.remote:
      self.sync(force=True)
      shutil.rmtree(self.local, ignore_errors=True)


class ObjectAppender:
  """An append-only text file on an object store, which has no append: the whole content is kept in memory and
  uploaded as one object by `flush` (at most every `min_interval_s` seconds: GCS rate-limits writes to one
  object to about one per second) and by `close` (always, when anything is new).

  Args:
    path: The object's URL.
    initial: Its current content (what a reopened file starts from).
    min_interval_s: Shortest time between two uploads by `flush`.
  """

  def __init__(self, path: PathLike, initial: str = "", *, min_interval_s: float = 5.0):
    self.path, self._text, self._dirty = as_path(path), initial, False
    self.min_interval_s, self._uploaded_at = min_interval_s, float("-inf")

  def write(self, text: str) -> int:
    self._text += text
    self._dirty = True
    return len(text)

  def flush(self) -> None:
    if self._dirty and time.monotonic() - self._uploaded_at >= self.min_interval_s:
      self._upload()

  def sync(self) -> None:
    """Uploads what is new now, whatever the interval."""
    if self._dirty:
      self._upload()

  def close(self) -> None:
    self.sync()

  def _upload(self) -> None:
    self.path.write_text(self._text)
    self._dirty, self._uploaded_at = False, time.monotonic()
