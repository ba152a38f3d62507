"""Local text files as a TFDS dataset: one example per file (or per part of a file), a stable train/validation split.

Used by `dataset="text_files"` (files named by `data.path`), `dataset="stdlib"` (see `stdlib_corpus.py`) and, for
the file listing and split rules, `dataset="jsonl"` (see `jsonl.py`).

- Split rules (`DocumentSet.rule`):
  - "hash" (many files): a file is held out when crc32(its name, UTF-8) mod 10000 < validation_percent * 100.
    crc32 is fixed by the zlib spec, so the split is the same on every machine and run (Python's `hash` is salted
    per process). A file's split depends only on its own name, so adding files never moves existing ones.
  - "position" (few files): when the hash rule would leave the training or the validation split without a file
    (one tinyshakespeare.txt, a handful of dumps) and 0 < validation_percent < 100, every file is cut in two: the
    last validation_percent of its bytes, cut at a line boundary (`line_cut`), is validation and the rest training.
- Documents are the files' contents decoded as UTF-8; invalid bytes become U+FFFD. Before a dataset is prepared,
  every file is checked to be text (`check_text_files`): the first MiB of each (the whole file when smaller) may
  hold no NUL byte, and at most one invalid UTF-8 sequence per 100 bytes. A binary (`/bin/ls`) or a file in another
  encoding (UTF-16, Latin-1 with many accents) is a DataError naming it; a few stray bytes are replaced.
- Each split is written in name order (`disable_shuffling`): record i of a split is its i-th file by name. Training
  shuffles with grain; evaluation reads in this order.
- The prepared dataset is keyed on its exact inputs: the builder config name holds a digest of the (name, size,
  mtime) of every selected file and of `validation_percent`, so editing, adding or removing a file, or changing
  `data.path`, `max_documents` or `validation_percent`, prepares a new copy instead of reusing a stale one.
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import glob
import hashlib
import json
import logging
import os
import mmap
import zlib
from typing import Iterator, Optional, Sequence

import tensorflow_datasets as tfds

from megalodon_jax import paths
from megalodon_jax.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
TEXT_CHECK_BYTES = 1 << 20  # the head of each file that `check_text_files` reads
MAX_INVALID_FRACTION = 0.01  # at most this many invalid UTF-8 sequences per byte checked
_GLOB_CHARS = frozenset("*?[")


class _QuietCustomConfig(logging.Filter):
  """Drops TFDS's warning for a BuilderConfig outside BUILDER_CONFIGS: our configs are digests, custom by design."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Using custom data configuration")


logging.getLogger("absl").addFilter(_QuietCustomConfig())


def in_validation(name: str, validation_percent: float) -> bool:
  """Whether the document called `name` belongs to the validation split (stable across machines and runs)."""
  return zlib.crc32(name.encode("utf-8")) % 10_000 < round(validation_percent * 100)


def line_cut(data: bytes, validation_percent: float) -> int:
  """Where the position rule cuts `data`: the validation part `data[cut:]` holds about the last `validation_percent`
  of the bytes and starts at a line start; both parts are non-empty when `len(data) >= 2`.

  The cut is the first line start at or after the nominal point; if no line starts there, the last line start
  before it; if `data` has no newline at all, the nominal point moved back to a UTF-8 character boundary.
  """
  size = len(data)
  if size < 2:
    return size
  nominal = min(max(size - round(size * validation_percent / 100), 1), size - 1)
  after = data.find(b"\n", nominal - 1, size - 1)  # a newline at index j makes j + 1 a line start
  if after != -1:
    return after + 1
  before = data.rfind(b"\n", 0, nominal - 1)
  if before != -1:
    return before + 1
  cut = nominal
  while cut > 1 and (data[cut] & 0xC0) == 0x80:  # never split a multi-byte character
    cut -= 1
  return cut


@dataclasses.dataclass(frozen=True)
class DocFile:
  """One document: `name` decides its order and split; `path` is where to read it.

  `part` is "" for the whole file, or under the position rule "head" (training) / "tail" (validation).
  """
  name: str
  path: str
  size: int
  mtime_ns: int
  part: str = ""


def read_part(f: DocFile, validation_percent: float) -> bytes:
  """The bytes of `f`: the whole file, or its head / tail under the position rule (see `line_cut`)."""
  if not f.part or f.size == 0:
    return paths.as_path(f.path).read_bytes()
  if paths.is_remote(f.path):  # no mmap of an object: read it whole (a file part needs the cut of the whole)
    return _part(paths.as_path(f.path).read_bytes(), f.part, validation_percent)
  with open(f.path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
    return _part(data, f.part, validation_percent)  # mmap: only the pages around the cut are read


def _part(data, part: str, validation_percent: float) -> bytes:
  cut = line_cut(data, validation_percent)
  return data[:cut] if part == "head" else data[cut:]


@dataclasses.dataclass(frozen=True)
class DocumentSet:
  """The files of a `text_files` / `stdlib` dataset, already sorted and limited, and how they split."""
  kind: str  # "text_files" | "stdlib": the TFDS builder it is prepared with
  files: tuple[DocFile, ...]
  validation_percent: float
  root: str = ""  # stdlib: the folder the names are relative to (part of the digest)
  text_key: str = ""  # jsonl: the field holding the text (part of the digest)

  def _hash_split(self, held_out: bool) -> list[DocFile]:
    return [f for f in self.files if in_validation(f.name, self.validation_percent) == held_out]

  @property
  def rule(self) -> str:
    """"hash" (whole files by path hash) or "position" (each file cut in two): see the module docstring."""
    if 0 < self.validation_percent < 100 and self.files and not (self._hash_split(False) and self._hash_split(True)):
      return "position"
    return "hash"

  def describe_rule(self) -> str:
    """One line for the log: how validation is held out."""
    n, p = len(self.files), self.validation_percent
    if self.rule == "position":
      return (f"{n} file(s), too few for a split by path hash: validation is the last {p}% of each file's bytes "
              f"(cut at a line boundary), training the rest")
    return f"{n} file(s): validation is the files whose path hash falls in {p}%, training the others"

  def split(self, split: str) -> list[DocFile]:
    """The documents of `split` ("train" | "validation"), in name order.

    Under the position rule, every non-empty file of at least 2 bytes gives one document to each split.
    """
    if split not in SPLITS:
      raise KeyError(split)
    held_out = split == "validation"
    if self.rule == "position":
      part = "tail" if held_out else "head"
      return [dataclasses.replace(f, part=part) for f in self.files if f.size >= 2]
    return self._hash_split(held_out)

  @property
  def config_name(self) -> str:
    """TFDS config name: a digest of everything the prepared records depend on."""
    fields: list = [self.kind, self.root, self.validation_percent, [(f.name, f.size, f.mtime_ns) for f in self.files]]
    if self.rule == "position":
      fields.append("position")  # only then, so datasets prepared under the hash rule keep their names
    if self.text_key:
      fields.append(self.text_key)
    payload = json.dumps(fields, separators=(",", ":"))
    return f"n{len(self.files)}_{hashlib.sha1(payload.encode('utf-8')).hexdigest()[:16]}"


def stat_files(named_paths: Sequence[tuple[str, str]], max_documents: int) -> tuple[DocFile, ...]:
  """DocFiles for (name, path) pairs: sorted by name, the first `max_documents` kept (0 = all)."""
  out = []
  for name, path in sorted(named_paths)[:max_documents or None]:
    if paths.is_remote(path):
      st = paths.as_path(path).stat()  # objects: whole seconds
      out.append(DocFile(name, path, int(st.length), int(st.mtime) * 10**9))
      continue
    st = os.stat(path)
    out.append(DocFile(name, path, st.st_size, st.st_mtime_ns))
  return tuple(out)


def text_problem(data: bytes, complete: bool = True) -> Optional[str]:
  """Why `data` is not UTF-8 text (see the module docstring), or None.

  Args:
    data: a file's bytes, or its first bytes when `complete` is False (a character cut at the end is then fine).
  """
  nul = data.find(b"\0")
  if nul != -1:
    return f"it holds NUL bytes (the first at byte {nul}), so it is binary, not text"
  # Each invalid sequence decodes to one U+FFFD (those already in the text, EF BF BD, do not count): one C pass.
  text, _ = codecs.utf_8_decode(data, "replace", complete)
  invalid = text.count("\ufffd") - data.count(b"\xef\xbf\xbd")
  if invalid <= len(data) * MAX_INVALID_FRACTION:
    return None
  try:
    data.decode("utf-8")
    first = len(data)  # unreachable: `invalid` > 0 means strict decoding fails
  except UnicodeDecodeError as e:
    first = e.start
  return (f"{invalid:,} invalid UTF-8 sequences in its {'' if complete else 'first '}{len(data):,} bytes (the first "
          f"at byte {first}; the limit is {MAX_INVALID_FRACTION * 100:g} per 100 bytes), so it is binary or in "
          f"another encoding")


@functools.lru_cache(maxsize=65536)
def _file_problem(path: str, size: int, mtime_ns: int) -> Optional[str]:
  del mtime_ns  # part of the cache key: an edited file is checked again
  with paths.as_path(path).open("rb") as fh:  # local or gs://: only the head is read
    head = fh.read(TEXT_CHECK_BYTES)
  return text_problem(head, complete=size <= TEXT_CHECK_BYTES)


def check_text_files(files: Sequence[DocFile], kind: str = "text_files") -> None:
  """Raises DataError for the first of `files` that is not UTF-8 text (each file read once per process).

  Raises:
    DataError: naming the file and what is wrong with it.
  """
  for f in files:
    problem = _file_problem(f.path, f.size, f.mtime_ns)
    if problem is not None:
      raise DataError(f"data.path: {f.path} is not a text file: {problem}. data.dataset={kind!r} trains on UTF-8 "
                      f"text: remove it from data.path or narrow the pattern (e.g. '~/corpus/**/*.txt')")


def expand(pattern: str) -> list[str]:
  """Regular files named by one `data.path` entry: a file, a folder (every non-hidden file under it) or a glob."""
  if paths.is_remote(pattern):
    return _expand_remote(pattern)
  pattern = os.path.expanduser(pattern)
  if any(c in pattern for c in _GLOB_CHARS):
    matches = glob.glob(pattern, recursive=True)
  else:
    matches = [pattern] if os.path.exists(pattern) else []
  out = []
  for m in matches:
    if os.path.isdir(m):
      for root, dirs, files in os.walk(m):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # .git and the like are not documents
        out.extend(os.path.join(root, f) for f in files if not f.startswith("."))
    elif os.path.isfile(m):
      out.append(m)
  return out


def _expand_remote(pattern: str) -> list[str]:
  """`expand` for a URL (gs://...): the same rules through epath."""
  if any(c in pattern for c in _GLOB_CHARS):
    matches = paths.glob_files(pattern)
  else:
    matches = [pattern] if paths.as_path(pattern).exists() else []
  out = []
  for m in matches:
    if paths.as_path(m).is_dir():
      out.extend(paths.list_files(m, skip_hidden=True))
    elif paths.as_path(m).is_file():
      out.append(m)
  return out


def text_files_documents(path: str, validation_percent: float, max_documents: int, *, kind: str = "text_files",
                         text_key: str = "", example: str = "~/corpus/**/*.txt") -> DocumentSet:
  """The DocumentSet of `data.path`: comma-separated files, folders or globs (`**` recurses).

  Names are the files' resolved absolute paths, so the same file listed twice (or through a symlink) counts once.

  Raises:
    DataError: `path` is empty, or one of its entries matches no file.
  """
  patterns = [p.strip() for p in (path or "").split(",") if p.strip()]
  if not patterns:
    raise DataError(f"data.path is empty; data.dataset={kind!r} needs file paths or globs, comma separated, e.g. "
                    f"--config.data.path='{example}'")
  resolved: dict[str, str] = {}
  for p in patterns:
    found = expand(p)
    if not found:
      raise DataError(f"data.path: {p!r} matches no file")
    for f in found:
      real = f if paths.is_remote(f) else os.path.realpath(f)
      resolved[real] = real
  return DocumentSet(kind, stat_files(list(resolved.items()), max_documents), validation_percent, text_key=text_key)


class DocumentFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes a DocumentSet as array_record: features `text` (the document) and `name` (its path)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "One example per file (or file part), hash or position split, records in name order."}
  # TFDS looks for a checksums file next to the builder's source through `importlib_resources`, which is not
  # installed here; we download nothing through TFDS, so there is no code path to search.
  code_path = None

  def __init__(self, *, documents: DocumentSet, **kwargs):
    self._documents = documents
    super().__init__(config=tfds.core.BuilderConfig(name=documents.config_name), **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{self._documents.kind}: {len(self._documents.files)} local files ({self._documents.rule} split).",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "name": tfds.features.Text()}),
        disable_shuffling=True,  # keep name order; grain shuffles for training
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    # TFDS cannot write an empty split; a split with no files is left out and reported by name when requested.
    return {s: self._generate_examples(files) for s in SPLITS if (files := self._documents.split(s))}

  def _generate_examples(self, files: Sequence[DocFile]) -> Iterator[tuple[int, dict[str, str]]]:
    for i, f in enumerate(files):
      text = read_part(f, self._documents.validation_percent).decode("utf-8", errors="replace")
      yield i, {"text": text, "name": f.name}  # integer keys: with disable_shuffling they fix the record order

  # TFDS prints these two with termcolor; route them to logging instead.
  def _log_download_bytes(self) -> None:
    log.info("preparing %s/%s in %s", self.name, self.builder_config_name, self.data_dir)

  def _log_download_done(self) -> None:
    log.info("prepared %s", self.data_dir)


class MegalodonTextFiles(DocumentFilesBuilder, skip_registration=True):
  """dataset="text_files": the files of `data.path`."""

  name = "megalodon_text_files"


class MegalodonStdlib(DocumentFilesBuilder, skip_registration=True):
  """dataset="stdlib": this Python's standard-library sources."""

  name = "megalodon_stdlib"
