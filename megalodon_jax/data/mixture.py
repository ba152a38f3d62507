"""Data mixtures (`data.mixture`): several sources, each a `DataConfig`, drawn with weights. No jax import.

The setting is one string, sources separated by ";":

    --config.data.mixture="stdlib:3; code:1 dataset=text_files path=/data/code/*.py validation_percent=10"

Each source is `LABEL:WEIGHT` followed by `key=value` overrides of the `data.*` fields (shell-quoted values may
hold spaces; no value may hold ";"). A source starts from the run's own `data.*` settings, so those are the
defaults every source shares. Its dataset is `dataset=` when given, else its label when that names a dataset
(`stdlib:1`, `enwik8:1 manual_dir=/data`); labels are unique (letters, digits, "_", "-", "."), and name the
source's metrics (`eval_loss/<label>`). Weights are positive numbers, normalised to sum to 1 (3 and 1 are 0.75 and
0.25). The settings that shape the batch are one for the whole run and cannot be overridden per source:
`tokenizer`, `tokenizer_path`, `document_boundaries`, `worker_count`.

Which source feeds a row (`row_sources`): global batch row r of step k is global row g = k * batch_size + r; its
source is the one whose interval of the cumulative weights (sources in label order) holds
u_g = frac(s + g / phi) (phi the golden ratio, s from the seed), computed exactly in 64-bit integers. This Weyl
sequence has low discrepancy: every stretch of rows follows the weights to within O(log n / n), where an
independent draw per row would wander by about 1 / sqrt(n). It depends on the seed, g and the weights only, so the
global batches do not depend on the process count, and a resumed run draws the rows it would have drawn
(`mixture_pipeline.py`: each source keeps its own row streams; the state saves their positions and the step).
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import math
import re
import shlex
from typing import Any, Callable, Iterable, Mapping, Sequence

from megalodon_jax.data.config import FIELDS, DataConfig
from megalodon_jax.errors import DataError, did_you_mean

# The fields every source shares: one tokenizer (one vocabulary), one batch layout, one reader.
SHARED_FIELDS = ("tokenizer", "tokenizer_path", "document_boundaries", "worker_count", "mixture")
SOURCE_FIELDS = tuple(f for f in FIELDS if f not in SHARED_FIELDS)
_LABEL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
_ONE = 1 << 64
_GOLDEN = 0x9E3779B97F4A7C15  # round(2**64 / golden ratio): the Weyl sequence's step (odd, so full period)
_EXAMPLE = "e.g. 'stdlib:3; code:1 dataset=text_files path=/data/*.txt'"


@dataclasses.dataclass(frozen=True)
class MixtureSource:
  """One source: its label, normalised weight, and its own planned `DataPlan` (`sources.plan`)."""
  label: str
  weight: float
  plan: Any


@dataclasses.dataclass(frozen=True)
class MixturePlan:
  """`data.mixture` checked and resolved: its sources in label order, and the settings they all share (what
  `make_tokenizer` and the trainer read of a plan)."""
  sources: tuple[MixtureSource, ...]
  tokenizer: str
  tokenizer_path: str
  document_boundaries: str
  dataset: str = "mixture"

  @property
  def labels(self) -> tuple[str, ...]:
    return tuple(s.label for s in self.sources)

  @property
  def weights(self) -> dict[str, float]:
    return {s.label: s.weight for s in self.sources}

  def describe(self) -> str:
    return ", ".join(f"{s.label} {s.weight:.4g} ({s.plan.dataset})" for s in self.sources)


def parse_mixture(text: str) -> list[tuple[str, float, dict[str, Any]]]:
  """`data.mixture` as [(label, weight as given, {field: value})], in the order given; values converted to the
  type of the field's default.

  Raises:
    DataError: a malformed source, a label used twice, a weight that is not a positive number, an unknown or
      shared field, a value of the wrong type.
  """
  if not isinstance(text, str):
    raise DataError(f"data.mixture={text!r}: must be a string, {_EXAMPLE}")
  out, seen = [], set()
  for entry in (e.strip() for e in text.split(";")):
    if not entry:
      continue
    try:
      tokens = shlex.split(entry)
    except ValueError as e:
      raise DataError(f"data.mixture source {entry!r}: {e}") from None
    label, sep, weight_text = tokens[0].rpartition(":")
    if not sep or not label:
      raise DataError(f"data.mixture source {entry!r}: expected LABEL:WEIGHT first, {_EXAMPLE}")
    if not _LABEL.match(label):
      raise DataError(f"data.mixture source {label!r}: a label is letters, digits, '_', '-' and '.'")
    if label in seen:
      raise DataError(f"data.mixture: label {label!r} is used twice; give each source its own label")
    seen.add(label)
    try:
      weight = float(weight_text)
    except ValueError:
      weight = math.nan
    if not (math.isfinite(weight) and weight > 0):
      raise DataError(f"data.mixture source {label!r}: weight {weight_text!r} must be a number > 0")
    out.append((label, weight, _overrides(label, tokens[1:])))
  if not out:
    raise DataError(f"data.mixture={text!r} names no source, {_EXAMPLE}")
  return out


def _overrides(label: str, items: Sequence[str]) -> dict[str, Any]:
  defaults = DataConfig()
  out: dict[str, Any] = {}
  for item in items:
    key, sep, value = item.partition("=")
    where = f"data.mixture source {label!r}"
    if not sep or not key:
      raise DataError(f"{where}: {item!r} is not key=value, {_EXAMPLE}")
    if key in SHARED_FIELDS:
      raise DataError(f"{where}: {key} is one for the whole run; set it as --config.data.{key}")
    if key not in SOURCE_FIELDS:
      raise DataError(f"{where}: unknown data field {key!r}{did_you_mean(key, SOURCE_FIELDS)}")
    if key in out:
      raise DataError(f"{where}: {key} is set twice")
    out[key] = _typed(where, key, value, getattr(defaults, key))
  return out


def _typed(where: str, key: str, value: str, default: Any) -> Any:
  if isinstance(default, bool):
    if value.lower() not in ("true", "false"):
      raise DataError(f"{where}: {key}={value!r} must be true or false")
    return value.lower() == "true"
  if isinstance(default, int):
    for kind in (int, float):  # data.validation_percent takes a fraction too; plan() checks the ranges
      try:
        return kind(value)
      except ValueError:
        pass
    raise DataError(f"{where}: {key}={value!r} must be a number")
  return value


def plan_mixture(cfg: DataConfig, plan_source: Callable[[DataConfig], Any], datasets: Sequence[str]) -> MixturePlan:
  """Plans every source of `cfg.mixture` with `plan_source` (`sources.plan`), each as `cfg` with its overrides.

  Raises:
    DataError: as `parse_mixture`, a source with no dataset, or the first source `plan_source` refuses (its
      message prefixed with the source's label).
  """
  parsed = parse_mixture(cfg.mixture)
  total = math.fsum(w for _, w, _ in parsed)
  planned = []
  for label, weight, overrides in sorted(parsed):
    dataset = overrides.pop("dataset", label if label in datasets else None)
    if dataset is None:
      raise DataError(f"data.mixture source {label!r}: its label is no dataset {tuple(datasets)}; name its "
                      f"dataset, e.g. '{label}:{weight:g} dataset=text_files path=...'")
    try:
      source_plan = plan_source(cfg.replace(mixture="", dataset=dataset, **overrides))
    except DataError as e:
      raise DataError(f"data.mixture source {label!r}: {e}") from None
    planned.append(MixtureSource(label, weight / total, source_plan))
  return MixturePlan(tuple(planned), cfg.tokenizer, cfg.tokenizer_path or "", cfg.document_boundaries)


def _start(seed: int) -> int:
  return int.from_bytes(hashlib.sha256(f"megalodon-data/mixture/{int(seed)}".encode()).digest()[:8], "little")


def row_sources(weights: Sequence[float], seed: int, rows: Iterable[int]) -> list[int]:
  """The source (an index into `weights`, which sum to 1) of each global row index in `rows` (module docstring)."""
  bounds, cumulative = [], 0.0
  for w in weights[:-1]:
    cumulative += w
    bounds.append(min(_ONE, round(cumulative * _ONE)))
  start = _start(seed)
  return [bisect.bisect_right(bounds, (start + g * _GOLDEN) % _ONE) for g in rows]


def same_weights(old: Mapping[str, float], new: Mapping[str, float]) -> bool:
  """Whether two {label: normalised weight} mixtures are the same (to rounding)."""
  return set(old) == set(new) and all(math.isclose(old[k], new[k], rel_tol=1e-9, abs_tol=1e-12) for k in new)
