"""enwik8 (the first 10^8 bytes of an English Wikipedia XML dump) as a byte-level TFDS dataset.

Standard split (Hutter prize / Transformer-XL / Mega): bytes [0, 90M) train, [90M, 95M) validation, [95M, 100M)
test. Each split is stored as consecutive records of `RECORD_BYTES` bytes in file order (the last one shorter), so
concatenating a split's records in order gives the split exactly (`disable_shuffling` keeps record i at index i).
Training shuffles records; evaluation reads them in order. Records hold raw bytes (a record may cut a multi-byte
UTF-8 character), so only the byte tokenizer fits.

The file comes from `data.manual_dir` (`enwik8` or `enwik8.zip`); when absent it is downloaded there from
`URL` where a network exists.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from typing import Iterator, Mapping, Optional, Sequence

import tensorflow_datasets as tfds

from megalodon_jax.errors import DataError

log = logging.getLogger(__name__)

URL = "http://mattmahoney.net/dc/enwik8.zip"
FILE_NAMES = ("enwik8", "enwik8.zip")
RECORD_BYTES = 64 * 1024
SPLIT_BYTES: dict[str, int] = {"train": 90_000_000, "validation": 5_000_000, "test": 5_000_000}
SPLITS = tuple(SPLIT_BYTES)

# Private overrides for tests (a scaled-down file instead of 100 MB); production code never changes them.
_split_bytes: Mapping[str, int] = SPLIT_BYTES
_record_bytes: int = RECORD_BYTES
_url: str = URL


def total_bytes() -> int:
  """The exact size the enwik8 file must have (10^8)."""
  return sum(_split_bytes.values())


def split_enwik8(data: bytes, split_bytes: Mapping[str, int] = SPLIT_BYTES) -> dict[str, memoryview]:
  """Cuts `data` into consecutive splits of the given sizes, in the mapping's order (no copy).

  Raises:
    DataError: `len(data)` is not the sum of the sizes (a truncated or wrong file).
  """
  total = sum(split_bytes.values())
  if len(data) != total:
    raise DataError(f"data.manual_dir: the enwik8 file has {len(data):,} bytes, expected exactly {total:,}; "
                    f"it is truncated or not enwik8 (re-download {URL})")
  view, out, start = memoryview(data), {}, 0
  for name, size in split_bytes.items():
    out[name] = view[start:start + size]
    start += size
  return out


def to_records(split: memoryview, record_bytes: int) -> list[memoryview]:
  """`split` as consecutive pieces of `record_bytes` bytes (the last one shorter); their concatenation is `split`."""
  return [split[i:i + record_bytes] for i in range(0, len(split), record_bytes)]


def find_file(manual_dir: str) -> Optional[str]:
  """The enwik8 (preferred) or enwik8.zip in `manual_dir`, or None."""
  for name in FILE_NAMES:
    path = os.path.join(os.path.expanduser(manual_dir), name)
    if os.path.isfile(path):
      return path
  return None


def _zip_member(zf: zipfile.ZipFile) -> zipfile.ZipInfo:
  infos = [i for i in zf.infolist() if not i.is_dir()]
  named = [i for i in infos if os.path.basename(i.filename) == "enwik8"]
  if len(named) != 1 and len(infos) != 1:
    raise DataError(f"data.manual_dir: {zf.filename} should hold one file named enwik8, it holds "
                    f"{[i.filename for i in infos][:5]}")
  return named[0] if len(named) == 1 else infos[0]


def file_size(path: str) -> int:
  """Size of enwik8 itself, from the file or the zip directory (cheap: nothing is decompressed)."""
  if path.endswith(".zip"):
    try:
      with zipfile.ZipFile(path) as zf:
        return _zip_member(zf).file_size
    except zipfile.BadZipFile as e:
      raise DataError(f"data.manual_dir: {path} is not a valid zip file ({e}); delete it and retry") from e
  return os.path.getsize(path)


def read_file(path: str) -> bytes:
  if path.endswith(".zip"):
    with zipfile.ZipFile(path) as zf:
      return zf.read(_zip_member(zf))
  with open(path, "rb") as f:
    return f.read()


def download(manual_dir: str, url: Optional[str] = None) -> str:
  """Downloads enwik8.zip into `manual_dir` (atomically: a temp file renamed when complete); returns its path.

  Raises:
    DataError: no network or the download failed; the message says where to put the file by hand.
  """
  url = url or _url
  manual_dir = os.path.expanduser(manual_dir)
  dest = os.path.join(manual_dir, "enwik8.zip")
  log.info("downloading %s to %s", url, dest)
  try:
    os.makedirs(manual_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=manual_dir, prefix=".enwik8.zip.")
    try:
      with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
        while chunk := resp.read(1 << 20):
          out.write(chunk)
      os.replace(tmp, dest)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  except (urllib.error.URLError, OSError, ValueError) as e:
    raise DataError(f"data.manual_dir={manual_dir!r} has no enwik8 or enwik8.zip, and downloading {url} failed "
                    f"({e}). Download it where a network exists and put enwik8.zip (or the unzipped enwik8) in "
                    f"that folder.") from e
  return dest


def config_name() -> str:
  """Config name of the records layout; any non-standard (test) split sizes get their own name."""
  name = f"records{_record_bytes}"
  if dict(_split_bytes) != SPLIT_BYTES:
    name += "_" + hashlib.sha1(repr(sorted(_split_bytes.items())).encode()).hexdigest()[:8]
  return name


class MegalodonEnwik8(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """enwik8 as records of raw bytes (feature `text`), standard 90M / 5M / 5M split."""

  name = "megalodon_enwik8"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Consecutive byte records per split."}
  code_path = None  # see text_files.py: TFDS would look for a checksums file via an uninstalled package

  def __init__(self, *, raw_path: Optional[str] = None, **kwargs):
    self._raw_path = raw_path
    super().__init__(config=tfds.core.BuilderConfig(name=config_name()), **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="enwik8 bytes; each split stored as consecutive records, in order.",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        homepage="http://mattmahoney.net/dc/textdata.html",
        disable_shuffling=True,  # record i is bytes [i * record_bytes, ...) of its split
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the file comes from manual_dir (or our own download), not TFDS's downloader
    if self._raw_path is None:
      raise DataError("data.manual_dir: no enwik8 file given to prepare from")
    splits = split_enwik8(read_file(self._raw_path), _split_bytes)
    return {name: self._generate_examples(to_records(view, _record_bytes)) for name, view in splits.items()}

  def _generate_examples(self, records: Sequence[memoryview]) -> Iterator[tuple[int, dict[str, bytes]]]:
    for i, r in enumerate(records):
      yield i, {"text": r.tobytes()}

  def _log_download_bytes(self) -> None:
    log.info("preparing %s in %s", self.name, self.data_dir)

  def _log_download_done(self) -> None:
    log.info("prepared %s", self.data_dir)
