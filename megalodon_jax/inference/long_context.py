"""Long-context evaluation of documents: loss over all tokens, by position, and for capped context lengths.

Scored tokens: every token of a document after its first (with an EOS prepended, when the tokenizer has one,
so the first token is scored too, as training packs documents after an EOS). All statistics below are over the
same scored tokens, so they are comparable.

- Full context: each document streams through the model from an empty cache, however long it is; a token is
  predicted from everything before it in its document.
- By position: the full-context losses grouped by the scored token's position p in its document (p >= 1 tokens
  before it), in power-of-two buckets [2^k, 2^(k+1)).
- Maximum context length L (the paper's perplexity-vs-context figure): the scored tokens of a document are cut
  into consecutive blocks of L and the model restarts from an empty cache at every block, so the i-th token of a
  block is predicted from the i tokens before it in the block: at most L, L/2 on average. L greater than or
  equal to a document's length gives that document's full-context losses. Longer contexts lower the loss only
  if the model uses information from farther back.

Rows (documents, or blocks of one context length) are batched by padded length (`evaluation.length_bucket`),
with a fixed number of rows per width (`rows_budget` tokens, at least one row), so that few shapes compile.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Iterable, Optional, Sequence

import numpy as np

from megalodon_jax.errors import InferenceError
from megalodon_jax.inference.evaluation import Evaluator, length_bucket

_MAX_BUCKETS = 64


@dataclasses.dataclass
class Tally:
  """Sum of NLL (nats, float64) and the number of scored tokens."""
  nll: float = 0.0
  tokens: int = 0

  def add(self, nll: np.ndarray) -> None:
    self.nll += float(np.sum(nll, dtype=np.float64))
    self.tokens += int(nll.size)

  @property
  def loss(self) -> float:
    return self.nll / self.tokens if self.tokens else float("nan")


@dataclasses.dataclass
class Results:
  """What `evaluate_documents` measured."""
  full: Tally
  by_context: dict  # L -> Tally
  position_nll: np.ndarray  # (_MAX_BUCKETS,) float64 NLL sums per power-of-two position bucket
  position_tokens: np.ndarray  # (_MAX_BUCKETS,) int64
  documents: int
  skipped_documents: int
  longest_document: int
  seconds: float


@dataclasses.dataclass
class _Row:
  x: np.ndarray
  y: np.ndarray
  first_position: int  # position in its document of the row's first scored token
  context: Optional[int]  # None: a whole document (full context); else a block of this context length
  also: tuple  # context lengths for which this full-context row is also the answer (L >= document)


class _Batcher:
  """Collects rows by padded length and evaluates a batch once it holds `rows_budget` tokens (or at the end)."""

  def __init__(self, evaluator: Evaluator, rows_budget: int, results: Results):
    self.evaluator = evaluator
    self.budget = rows_budget
    self.results = results
    self.pending: dict = {}

  def _key(self, row: _Row) -> tuple:
    """(width, rows per batch[, exact length]): rows with one key are evaluated together, in one shape."""
    n = row.x.size
    seg = self.evaluator.segment_len
    # A block row takes its context length's width, so a document's last, shorter block joins the others.
    target = n if row.context is None else row.context
    if target > seg:  # long rows go alone, padded to whole segments only
      width, count = -(-n // seg) * seg, 1
    else:  # short rows share power-of-two widths, as many per batch as the budget allows
      width = length_bucket(target, self.evaluator.config.chunk_size)
      count = max(1, self.budget // width)
    # With the window option only rows of equal length share a call (the official schedule depends on it).
    return (width, count, n) if self.evaluator.window is not None else (width, count)

  def add(self, row: _Row) -> None:
    key = self._key(row)
    rows = self.pending.setdefault(key, [])
    rows.append(row)
    if len(rows) >= key[1]:
      self._run(key)

  def finish(self) -> None:
    for key in list(self.pending):
      self._run(key)

  def _run(self, key) -> None:
    rows = self.pending.pop(key)
    width, count = key[0], key[1]  # a batch that is not full is padded with empty rows: one shape per key
    xy = np.zeros((2, count, width), np.int32)  # inputs, targets
    for i, row in enumerate(rows):
      xy[:, i, :row.x.size] = row.x, row.y
    nll = self.evaluator.rows_nll(*xy, length=max(r.x.size for r in rows))
    res = self.results
    for i, row in enumerate(rows):
      values = nll[i, :row.x.size]
      if not np.all(np.isfinite(values)):
        raise FloatingPointError(f"non-finite loss in a row at document position {row.first_position}")
      if row.context is None:
        res.full.add(values)
        positions = row.first_position + np.arange(values.size)
        buckets = np.minimum(np.floor(np.log2(positions)).astype(np.int64), _MAX_BUCKETS - 1)
        res.position_nll += np.bincount(buckets, weights=values.astype(np.float64), minlength=_MAX_BUCKETS)
        res.position_tokens += np.bincount(buckets, minlength=_MAX_BUCKETS)
        for length in row.also:
          res.by_context[length].add(values)
      else:
        res.by_context[row.context].add(values)


def evaluate_documents(evaluator: Evaluator, documents: Iterable[np.ndarray], *, context_lengths: Sequence[int] = (),
                       eos_id: Optional[int] = None, max_document_tokens: Optional[int] = None,
                       rows_budget: Optional[int] = None) -> Results:
  """Evaluates token-id documents (see the module docstring for what is measured).

  Args:
    evaluator: the model's Evaluator (segment size, window option).
    documents: (n,) integer arrays, read one at a time.
    context_lengths: maximum context lengths L >= 1 to evaluate besides the full context.
    eos_id: prepended to every document when not None.
    max_document_tokens: keep only the first this-many tokens of each document (after the EOS).
    rows_budget: tokens of rows evaluated side by side (default: the evaluator's segment length).
  Raises:
    InferenceError: bad lengths, or no document with at least two tokens.
  """
  lengths = sorted(set(int(x) for x in context_lengths))
  if any(length < 1 for length in lengths):
    raise InferenceError(f"context lengths must be >= 1, got {list(context_lengths)}")
  if max_document_tokens is not None and max_document_tokens < 2:
    raise InferenceError(f"max_document_tokens must be >= 2, got {max_document_tokens}")
  results = Results(Tally(), {length: Tally() for length in lengths}, np.zeros(_MAX_BUCKETS),
                    np.zeros(_MAX_BUCKETS, np.int64), 0, 0, 0, 0.0)
  batcher = _Batcher(evaluator, rows_budget or evaluator.segment_len, results)
  start = time.perf_counter()
  for doc in documents:
    ids = np.asarray(doc, np.int64).reshape(-1)
    if eos_id is not None:
      ids = np.concatenate([[eos_id], ids])
    ids = ids[:max_document_tokens]  # (None: all)
    if ids.size < 2:
      results.skipped_documents += 1
      continue
    results.documents += 1
    results.longest_document = max(results.longest_document, int(ids.size))
    x, y = ids[:-1], ids[1:]
    n = x.size
    shorter = [length for length in lengths if length < n]  # `lengths` is sorted: the others follow
    batcher.add(_Row(x, y, 1, None, tuple(lengths[len(shorter):])))
    for length in shorter:
      for s in range(0, n, length):
        batcher.add(_Row(x[s:s + length], y[s:s + length], s + 1, length, ()))
  batcher.finish()
  if results.documents == 0:
    raise InferenceError(f"no document has two or more tokens to evaluate ({results.skipped_documents} skipped)")
  results.seconds = time.perf_counter() - start
  return results


def metrics(loss: float, byte_level: bool) -> dict:
  """loss (nats per token) -> {"loss", "ppl"} plus "bpb" (bits per byte) when tokens are bytes."""
  out = {"loss": loss, "ppl": math.exp(loss) if loss < 700 else float("inf")}
  if byte_level:
    out["bpb"] = loss / math.log(2.0)
  return out


def report(results: Results, *, byte_level: bool, settings: dict) -> dict:
  """The JSON report: settings, totals, by position, by maximum context length."""
  counts = results.position_tokens
  positions = [{"start": 1 << int(k), "end": 1 << (int(k) + 1), "tokens": int(counts[k]),
                **metrics(float(results.position_nll[k] / counts[k]), byte_level)} for k in np.nonzero(counts)[0]]
  contexts = [{"context_length": length, "tokens": t.tokens, **metrics(t.loss, byte_level)}
              for length, t in [*sorted(results.by_context.items()), (None, results.full)]]  # None: full context
  return {
      **settings,
      "documents": results.documents, "skipped_documents": results.skipped_documents,
      "longest_document_tokens": results.longest_document, "tokens": results.full.tokens,
      **metrics(results.full.loss, byte_level),
      "by_position": positions, "by_context_length": contexts,
      "seconds": results.seconds, "tokens_per_second": results.full.tokens / max(results.seconds, 1e-9),
  }


def plot(report_dict: dict, path: str) -> None:
  """A PNG: loss vs position (full context) and loss vs maximum context length."""
  import matplotlib  # pylint: disable=import-outside-toplevel  # only --plot needs it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  key = "bpb" if "bpb" in report_dict else "loss"
  label = "bits per byte" if key == "bpb" else "loss (nats/token)"
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  pos = report_dict["by_position"]
  axes[0].plot([math.sqrt(p["start"] * p["end"]) for p in pos], [p[key] for p in pos], marker="o")
  axes[0].set_xscale("log", base=2)
  axes[0].set(xlabel="position in document (tokens before)", ylabel=label, title="full context: loss by position")
  ctx = [c for c in report_dict["by_context_length"] if c["context_length"] is not None]
  if ctx:
    axes[1].plot([c["context_length"] for c in ctx], [c[key] for c in ctx], marker="o", label="max context L")
    axes[1].set_xscale("log", base=2)
  axes[1].axhline(report_dict[key], color="gray", linestyle="--", label="full context")
  axes[1].set(xlabel="maximum context length L (tokens)", ylabel=label, title="loss vs context length")
  axes[1].legend()
  window = report_dict.get("window", {})
  fig.suptitle(f"{report_dict.get('checkpoint', '')}  (TimestepNorm window: "
               f"{'on' if window.get('enabled') else 'off'})", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
