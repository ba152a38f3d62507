"""JSONL corpora (`dataset="jsonl"`): one JSON object per line, the text in field `data.text_key`.

Files are named by `data.path` like `text_files` (comma-separated files, folders or globs) and may be plain,
gzip (`.gz`) or Zstandard (`.zst`, `.zstd`) compressed, chosen by suffix. They are prepared once to array_record
(one example per record, in file-name then line order) and read without TensorFlow like every other dataset.

Validation split (`text_files.DocumentSet.rule`): whole files by path hash when there are enough files, otherwise
the last `validation_percent` of each file's records (at least one record when a file has two or more).

Every record is checked while preparing, before any training step: a line that is not a JSON object (or not UTF-8),
lacks the text field, or holds there a non-string or a string that is not text (a NUL character, a lone surrogate)
stops preparation with a DataError naming the file and line number.
Blank lines are skipped (but counted in line numbers).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
from typing import IO, Iterator, Sequence

from megalodon_jax import paths
from megalodon_jax.data import text_files
from megalodon_jax.errors import DataError
from megalodon_jax.data.text_files import DocFile, DocumentSet


def jsonl_documents(path: str, validation_percent: float, max_documents: int, text_key: str) -> DocumentSet:
  """The DocumentSet of `data.path` for `dataset="jsonl"` (`max_documents` counts files, as for text_files)."""
  if not isinstance(text_key, str) or not text_key:
    raise DataError(f"data.text_key={text_key!r}: must name the JSON field holding the text, e.g. 'text'")
  return text_files.text_files_documents(path, validation_percent, max_documents, kind="jsonl", text_key=text_key,
                                         example="~/corpus/*.jsonl.zst")


@contextlib.contextmanager
def open_lines(path: str) -> Iterator[IO[bytes]]:
  """`path` as a binary stream of its decompressed bytes (by suffix: .gz, .zst / .zstd, or plain)."""
  lower = path.lower()
  with paths.as_path(path).open("rb") as raw:  # local or gs://; the decompressors take the stream
    if lower.endswith(".gz"):
      with gzip.GzipFile(fileobj=raw, mode="rb") as f:
        yield f
    elif lower.endswith((".zst", ".zstd")):
      import zstandard  # pylint: disable=import-outside-toplevel  # only JSONL.zst corpora need it
      with zstandard.ZstdDecompressor().stream_reader(raw) as f:
        yield io.BufferedReader(f)
    else:
      yield raw


def _records(f: DocFile, text_key: str) -> Iterator[tuple[int, str]]:
  """(line number, text) of every record of `f`, checked; blank lines skipped."""
  try:
    with open_lines(f.path) as lines:
      for number, line in enumerate(lines, start=1):
        if not line.strip():
          continue
        where = f"{f.path}:{number}"
        try:
          record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
          raise DataError(f"{where}: not a JSON object ({e}); data.dataset='jsonl' needs one object per line") from e
        if not isinstance(record, dict):
          raise DataError(f"{where}: a JSON {type(record).__name__}, not an object; data.dataset='jsonl' needs one "
                          f"object per line")
        if text_key not in record:
          raise DataError(f"{where}: no field data.text_key={text_key!r}; the record has {sorted(record)[:10]}")
        text = record[text_key]
        if not isinstance(text, str):
          raise DataError(f"{where}: field {text_key!r} holds a {type(text).__name__}, not a string")
        _check_text(text, where, text_key)
        yield number, text
  except (OSError, EOFError) as e:  # truncated .gz / .zst, unreadable file
    raise DataError(f"{f.path}: cannot be read as {'compressed ' if f.path.endswith(('gz', 'zst', 'zstd')) else ''}"
                    f"JSONL ({e})") from e


def _check_text(text: str, where: str, text_key: str) -> None:
  """Text fields are text: no NUL (a `\\u0000` escape) and no lone surrogate (`\\ud800`), which UTF-8 cannot hold."""
  nul = text.find("\0")
  if nul != -1:
    raise DataError(f"{where}: field {text_key!r} holds a NUL character at index {nul}: binary data, not text")
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise DataError(f"{where}: field {text_key!r} holds a lone surrogate {text[e.start]!r} at index {e.start}, "
                    f"which is not text (UTF-8 cannot encode it)") from None


def held_out_count(records: int, validation_percent: float) -> int:
  """Records at the end of a file that the position rule holds out: about `validation_percent`, at least one when
  the file has two or more, never all of them."""
  if records < 2:
    return 0
  return min(max(round(records * validation_percent / 100), 1), records - 1)


class MegalodonJsonl(text_files.DocumentFilesBuilder, skip_registration=True):
  """Writes the records of a jsonl DocumentSet as array_record: features `text` and `name` ("<file>:<line>").

  The text_files builder with one example per record instead of one per file.
  """

  name = "megalodon_jsonl"
  RELEASE_NOTES = {"1.0.0": "One example per JSONL record, file-hash or per-file position split."}

  def _generate_examples(self, files: Sequence[DocFile]) -> Iterator[tuple[int, dict[str, str]]]:
    key, percent, i = self._documents.text_key, self._documents.validation_percent, 0
    for f in files:
      records = _records(f, key)
      if f.part:  # position rule: a first pass counts the records (and checks them all)
        n = sum(1 for _ in _records(f, key))
        tail = held_out_count(n, percent)
        start, stop = (n - tail, n) if f.part == "tail" else (0, n - tail)
        records = (r for j, r in enumerate(records) if start <= j < stop)
      for number, text in records:
        yield i, {"text": text, "name": f"{f.name}:{number}"}
        i += 1
