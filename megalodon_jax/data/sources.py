"""From `config.data` to prepared TFDS array_record splits: the plan, preparation and random-access sources.

`plan(config.data)` checks the config and resolves it once into a `DataPlan` (which dataset, which files, where);
`prepare`, `open_split` and the pipeline take the plan and never resolve again.

Every dataset ends up as a TFDS dataset in array_record format under `data.data_dir`, read with
`as_data_source()` (random access, no TensorFlow). `stdlib`, `text_files`, `jsonl` and `enwik8` are prepared by our
builders; `tfds` names a dataset someone prepared there already.

Concurrent preparation: processes (e.g. the hosts of one job) sharing `data_dir` take an exclusive `flock` on
`<data_dir>/<builder>/<config>/.<version>.lock`; the first prepares, the others wait and then find it done. TFDS
itself writes into an `incomplete.*` folder and renames it when complete, so an interrupted preparation never looks
finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any, Iterator, Optional, Union

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import read_only_builder

from megalodon_jax import paths
from megalodon_jax.data import enwik8, jsonl, mixture, text_files
from megalodon_jax.data.config import FIELDS, DataConfig
from megalodon_jax.data.stdlib_corpus import stdlib_documents
from megalodon_jax.data.tokenizers import check_tokenizer_config
from megalodon_jax.errors import DataError

try:
  import fcntl
except ImportError:  # not on Windows: prepare without the lock
  fcntl = None

log = logging.getLogger(__name__)

DATASETS = ("stdlib", "text_files", "jsonl", "enwik8", "tfds")
DOCUMENT_BOUNDARIES = ("carry", "reset")

_DEFAULTS = DataConfig()  # what an object lacking a field (an older config, a namespace) gets: its one default

tfds.disable_progress_bar()


def check_number(name: str, value: Any, low: float, high: Optional[float] = None, integer: bool = True) -> None:
  """Raises DataError unless `value` is an int (a number when not `integer`; never a bool) in [low, high]."""
  types = (int,) if integer else (int, float)
  if isinstance(value, bool) or not isinstance(value, types) or value < low or (high is not None and value > high):
    kind = "an int" if integer else "a number"
    bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
    raise DataError(f"{name}={value!r}: must be {kind} {bounds}")


@dataclasses.dataclass(frozen=True)
class DataPlan:
  """`config.data` checked and resolved once (`plan`): the dataset, where it is prepared, its split names and the
  settings the pipeline reads. `prepare`, `open_split`, the iterators and `make_tokenizer` take it and resolve
  nothing again (no listing, stat or text check of the files), so a run reads the files as they were planned."""
  dataset: str
  splits: tuple[str, ...]
  data_dir: str  # `data.data_dir`, `~` expanded ("" became TFDS's default)
  train_split: str
  eval_split: str
  add_eos: bool
  document_boundaries: str
  tokenizer: str  # with tokenizer_path: what `make_tokenizer` builds
  tokenizer_path: str
  manual_dir: str = ""  # enwik8: the folder of its file, read when preparing
  documents: Optional[text_files.DocumentSet] = None  # stdlib / text_files / jsonl
  builder_dir: Optional[str] = None  # tfds
  text_key: str = "text"  # the feature holding the text


def plan(data_cfg: Any) -> Union[DataPlan, mixture.MixturePlan]:
  """Checks `config.data` cheaply and resolves it; prepares and reads nothing big. Checks: `dataset` known; `path`
  non-empty with every entry matching a file, each UTF-8 text while text_files is not prepared
  (`text_files.check_text_files`); enwik8 not prepared: `manual_dir` set, its file of the right size; tfds: `name`
  prepared under `data_dir` in array_record with feature `text_key`; `tokenizer` known, `tokenizer_path` present for
  sentencepiece; the splits existing, the training split non-empty; the numbers and flags valid. With
  `data.mixture` every source is checked so and the result is a `mixture.MixturePlan` of their plans.

  Raises:
    DataError: the first problem, naming its `data.*` key; ConfigError: a `tokenizer_path` with the byte tokenizer.
  """
  cfg = DataConfig(**{k: getattr(data_cfg, k, getattr(_DEFAULTS, k)) for k in FIELDS})
  if cfg.mixture:  # several sources, each planned here as the run's settings with its overrides
    return mixture.plan_mixture(cfg, plan, DATASETS)
  dataset = cfg.dataset
  if dataset not in DATASETS:
    raise DataError(f"data.dataset={dataset!r} is unknown; use one of {DATASETS}")
  check_tokenizer_config(cfg)
  if paths.is_remote(cfg.data_dir):
    raise DataError(f"data.data_dir={cfg.data_dir!r}: the prepared records are read with local file "
                    f"IO (array_record), so it must be a local folder; data.path and data.tokenizer_path may be "
                    f"gs:// URLs")
  if cfg.worker_count != 0:
    raise DataError(f"data.worker_count={cfg.worker_count!r}: only 0 is supported (documents are tokenized and "
                    f"packed in the main process, which keeps up with training on the datasets here)")
  if cfg.document_boundaries not in DOCUMENT_BOUNDARIES:
    raise DataError(f"data.document_boundaries={cfg.document_boundaries!r}: use 'carry' (state flows "
                    f"across packed documents, the official training) or 'reset' (the model restarts at each)")
  if not isinstance(cfg.add_eos, bool):
    raise DataError(f"data.add_eos={cfg.add_eos!r}: must be True or False")
  for key in ("train_split", "eval_split"):
    if not isinstance(getattr(cfg, key), str) or not getattr(cfg, key):
      raise DataError(f"data.{key}={getattr(cfg, key)!r}: must be a split name such as 'train'")
  # data_dir "" is TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
  root = os.path.expanduser(cfg.data_dir or tfds.core.constants.DATA_DIR)
  out = DataPlan(dataset, (), root, cfg.train_split, cfg.eval_split, cfg.add_eos, cfg.document_boundaries,
                 cfg.tokenizer, cfg.tokenizer_path or "", cfg.manual_dir)

  if dataset in ("stdlib", "text_files", "jsonl"):
    percent, max_docs = cfg.validation_percent, cfg.max_documents
    check_number("data.validation_percent", percent, 0, 100, integer=False)
    check_number("data.max_documents", max_docs, 0)
    if dataset == "stdlib":
      docs = stdlib_documents(percent, max_docs)
      if not docs.files:
        raise DataError(f"data.dataset='stdlib': no .py files found under {docs.root}")
    elif dataset == "jsonl":
      docs = jsonl.jsonl_documents(cfg.path, percent, max_docs, cfg.text_key)
    else:
      docs = text_files.text_files_documents(cfg.path, percent, max_docs)
    out = dataclasses.replace(out, splits=text_files.SPLITS, documents=docs)
    if dataset == "text_files" and not _prepared(_builder(out)):  # once prepared, the files were checked
      text_files.check_text_files(docs.files)
  elif dataset == "enwik8":
    if out.tokenizer != "bytes":
      raise DataError(f"data.tokenizer={out.tokenizer!r}: enwik8 is stored as raw byte records, which "
                      f"may cut characters; use data.tokenizer='bytes'")
    out = dataclasses.replace(out, splits=enwik8.SPLITS)
    if not _prepared(_builder(out)):
      if not out.manual_dir:
        raise DataError("data.manual_dir is empty; data.dataset='enwik8' needs the folder holding enwik8 or "
                        f"enwik8.zip (downloaded there when online from {enwik8.URL})")
      path = enwik8.find_file(out.manual_dir)
      expected = enwik8.total_bytes()
      if path is not None and (size := enwik8.file_size(path)) != expected:
        raise DataError(f"data.manual_dir: {path} holds {size:,} bytes of enwik8, expected exactly {expected:,}; "
                        f"the file is truncated or not enwik8 (re-download {enwik8.URL})")
  else:
    out = _tfds_plan(cfg, out)

  for key in ("train_split", "eval_split"):  # both exist, then the training split has documents
    _check_split(out, getattr(out, key), f"data.{key}", documents=False)
  _check_split(out, out.train_split, "data.train_split")
  return out


check_data_config = plan  # the name train_config.check_inputs calls


def as_plan(data: Union[DataPlan, mixture.MixturePlan, Any]) -> Union[DataPlan, mixture.MixturePlan]:
  """`data` when it is a plan, else `plan(data)`: a `config.data` is resolved here, once per call."""
  return data if isinstance(data, (DataPlan, mixture.MixturePlan)) else plan(data)


def _tfds_plan(cfg: DataConfig, base: DataPlan) -> DataPlan:
  name, root, text_key = cfg.name, base.data_dir, cfg.text_key
  if not name:
    raise DataError("data.name is empty; data.dataset='tfds' needs a prepared TFDS dataset name, e.g. 'pg19' or "
                    "'lm1b/<config>'")
  try:
    builder = read_only_builder.builder_from_files(name, data_dir=root)
  except Exception as e:  # pylint: disable=broad-except  # TFDS raises several types; all mean "not there"
    here = os.path.join(root, name.split(":")[0].split("/")[0])
    configs = sorted(d for d in os.listdir(here) if not d.startswith(".")) if os.path.isdir(here) else []
    hint = f" {here} holds {configs}: name one as data.name='<dataset>/<config>'." if configs else ""
    raise DataError(f"data.name={name!r}: no prepared TFDS dataset of that name under data.data_dir={root!r}.{hint} "
                    f"This machine cannot download it: prepare it where a network exists with `tfds build "
                    f"{name.split(':')[0]} --file_format=array_record --data_dir=DIR` and copy DIR's contents here. "
                    f"({str(e).splitlines()[0]})") from e
  fmt = builder.info.file_format
  if fmt is None or getattr(fmt, "value", fmt) != "array_record":
    raise DataError(f"data.name={name!r} in {builder.data_dir} is prepared as {getattr(fmt, 'value', fmt)}, but "
                    f"reading without TensorFlow needs array_record: rebuild it with --file_format=array_record")
  features = builder.info.features
  if text_key not in features.keys():
    raise DataError(f"data.text_key={text_key!r}: {name!r} has no such feature; it has {sorted(features.keys())}")
  return dataclasses.replace(base, splits=tuple(builder.info.splits.keys()), builder_dir=os.fspath(builder.data_dir),
                             text_key=text_key)


def _check_split(data_plan: DataPlan, split: str, label: str, documents: bool = True) -> None:
  """Raises DataError unless the dataset has `split` and, when `documents`, that split holds a document; `label`
  names the setting it came from in messages."""
  if split not in data_plan.splits:
    raise DataError(f"{label}={split!r}: data.dataset={data_plan.dataset!r} has no such split; it has "
                    f"{list(data_plan.splits)}")
  if not documents or data_plan.documents is None or data_plan.documents.split(split):
    return
  n, percent = len(data_plan.documents.files), data_plan.documents.validation_percent
  if data_plan.documents.rule == "position":
    raise DataError(f"{label}={split!r} has no documents: the {n} selected files are too small to cut in two (each "
                    f"needs 2 bytes or more)")
  raise DataError(f"{label}={split!r} has no documents: data.validation_percent={percent} "
                  f"puts {'all' if split == 'train' else 'none'} of the {n} selected files in 'validation' (raise "
                  f"data.max_documents or add files{'' if split == 'train' else ', or raise data.validation_percent'})")


_DOCUMENT_BUILDERS = {"stdlib": text_files.MegalodonStdlib, "text_files": text_files.MegalodonTextFiles,
                      "jsonl": jsonl.MegalodonJsonl}


def _builder(data_plan: DataPlan, raw_path: Optional[str] = None) -> tfds.core.DatasetBuilder:
  if data_plan.documents is not None:  # stdlib / text_files / jsonl
    return _DOCUMENT_BUILDERS[data_plan.dataset](documents=data_plan.documents, data_dir=data_plan.data_dir,
                                                 file_format="array_record")
  if data_plan.dataset == "enwik8":
    return enwik8.MegalodonEnwik8(raw_path=raw_path, data_dir=data_plan.data_dir, file_format="array_record")
  return tfds.builder_from_directory(data_plan.builder_dir)


def _prepared(builder: tfds.core.DatasetBuilder) -> bool:
  return os.path.exists(os.path.join(builder.data_dir, "dataset_info.json"))


@contextlib.contextmanager
def _lock(builder: tfds.core.DatasetBuilder) -> Iterator[None]:
  """Exclusive lock for preparing `builder`, next to its version folders."""
  folder = os.path.dirname(os.fspath(builder.data_dir))
  os.makedirs(folder, exist_ok=True)
  if fcntl is None:
    yield
    return
  with open(os.path.join(folder, f".{builder.version}.lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def prepare(data: Union[DataPlan, Any]) -> DataPlan:
  """Prepares the dataset under `data.data_dir` unless it is there already (then this returns in milliseconds);
  safe when processes share the folder. Returns the plan (`data` itself, or a `config.data` planned here).
  Raises DataError: as `plan`, or the enwik8 file could not be found or downloaded.
  """
  data_plan = as_plan(data)
  if isinstance(data_plan, mixture.MixturePlan):
    log.info("data.mixture: %s", data_plan.describe())
    for source in data_plan.sources:
      prepare(source.plan)
    return data_plan
  if data_plan.dataset == "tfds":
    return data_plan  # prepared elsewhere; `plan` found it
  if data_plan.documents is not None:
    log.info("data.dataset=%r: %s", data_plan.dataset, data_plan.documents.describe_rule())
  builder = _builder(data_plan)
  if _prepared(builder):
    return data_plan
  with _lock(builder):
    if _prepared(builder):
      return data_plan  # another process prepared it while we waited
    if data_plan.dataset == "enwik8":
      path = enwik8.find_file(data_plan.manual_dir) or enwik8.download(data_plan.manual_dir)
      builder = _builder(data_plan, raw_path=path)
    log.info("preparing data.dataset=%r in %s", data_plan.dataset, builder.data_dir)
    builder.download_and_prepare(file_format="array_record")
  return data_plan

class TextSource:
  """Random access to one split's documents as UTF-8 bytes: `len(src)`, `src[i] -> bytes`."""

  def __init__(self, source: Any, text_key: str, description: str):
    self._source = source
    self._key = text_key
    self.description = description

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> bytes:
    return as_bytes(self._source[index][self._key])

  def __repr__(self) -> str:
    return f"TextSource({self.description}, {len(self)} documents)"


def as_bytes(value: Union[bytes, str, np.ndarray]) -> bytes:
  """A text feature value (bytes from Text features, str, or a 0-d numpy array of either) as UTF-8 bytes."""
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, str):
    return value.encode("utf-8")
  if isinstance(value, bytes):
    return value
  raise DataError(f"data.text_key: expected a text feature (str or bytes), got {type(value).__name__}")


def open_split(data: Union[DataPlan, Any], split: str, key: str) -> TextSource:
  """The documents of `split`, in stored order; `key` names the setting it came from in messages ("eval_split").
  `data`: a DataPlan (`plan`), or a `config.data`, planned here.

  Raises:
    DataError: the dataset is not prepared (call `prepare` first), or the split is missing or empty.
  """
  data_plan = as_plan(data)
  if isinstance(data_plan, mixture.MixturePlan):
    raise DataError(f"data.mixture names several sources ({', '.join(data_plan.labels)}); to read one source's "
                    f"split, give data.mixture='' and that source's data settings (megalodon-evaluate: --data "
                    f"mixture= --data dataset=...)")
  label = f"data.{key}" if key in ("train_split", "eval_split") else key
  _check_split(data_plan, split, label)
  builder = _builder(data_plan)
  if data_plan.dataset != "tfds" and not _prepared(builder):
    raise DataError(f"data.dataset={data_plan.dataset!r} is not prepared in data.data_dir={data_plan.data_dir!r}; "
                    f"call megalodon_jax.data.prepare(config.data) first")
  source = builder.as_data_source(split=split)
  if len(source) == 0:
    raise DataError(f"{label}={split!r} of {builder.data_dir} has no documents")
  return TextSource(source, data_plan.text_key, f"{builder.name}/{builder.builder_config_name or ''}:{split}")
