"""Training metrics: derived numbers (bpb/ppl, throughput, MFU) and their sinks (jsonl, TensorBoard, console).

`workdir/metrics.jsonl` holds one strict-JSON object per logged step, `{"step": ..., **metrics}`, flushed on every
call so a killed run keeps everything it logged. JSON has no NaN or infinity, so non-finite floats are written as
the strings "NaN", "Infinity" and "-Infinity" (any JSON reader accepts them; `read_metrics` turns them back into
floats) and an unknown value (e.g. `mfu` on a device with no known peak) as null. Samples generated at eval steps
go to `workdir/samples.jsonl` as {"step", "tag", "text"}.

Only process 0 writes: construct `MetricsLogger(enabled=False)` elsewhere and every call is a no-op. No jax
import, so the module is usable without starting a backend.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import numbers
import os
import sys
from typing import Any, Optional, Sequence, TextIO

from tqdm import tqdm

from megalodon_jax import paths

__all__ = ["MetricsLogger", "loss_metrics", "read_metrics", "throughput"]

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TENSORBOARD_DIR = "tensorboard"

# tensorboardX names event files by the second and opens them with "wb": two writers within one second (a
# truncate_after reopening it, tests) would clobber each other without a unique suffix.
_EVENT_FILE_IDS = itertools.count()
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
# Console labels and formats; other keys print as "key value" with 4 significant digits.
_CONSOLE = {
    **{k: (k, "{:.4f}".format) for k in ("loss", "eval_loss")},
    **{k: (k, "{:.3f}".format) for k in ("bpb", "eval_bpb", "ppl", "eval_ppl")},
    "learning_rate": ("lr", "{:.1e}".format),
    "step_time": ("step_time", lambda v: f"{v * 1e3:.0f}ms" if v < 1 else f"{v:.2f}s"),
    "tokens_per_sec": ("tok/s", "{:,.0f}".format),
    "tokens_per_sec_per_device": ("tok/s/dev", "{:,.0f}".format),
    "tflops_per_device": ("TFLOP/s/dev", "{:.3g}".format),
    "mfu": ("mfu", lambda v: f"{v * 100:.3g}%"),
    "goodput": ("goodput", lambda v: f"{v * 100:.3g}%"),
}
# Keys kept off the console line (still in metrics.jsonl and TensorBoard): goodput's breakdown (training/goodput.py).
_CONSOLE_HIDDEN = ("goodput/",)


def throughput(*, step_time_s: float, tokens_per_step: int, num_devices: int, flops_per_step: float,
               peak_flops_per_device: Optional[float]) -> dict[str, Optional[float]]:
  """Throughput of one training step over the whole job.

  Args:
    step_time_s: Wall time of one step, > 0.
    tokens_per_step: Tokens in the global batch.
    num_devices: Devices sharing the step, >= 1.
    flops_per_step: Model FLOPs of one global step (forward + backward, no rematerialisation).
    peak_flops_per_device: Peak FLOP/s of one device, or None when unknown (e.g. CPU).

  Returns:
    tokens_per_sec (global), tokens_per_sec_per_device, tflops_per_device (achieved model TFLOP/s per device) and
    mfu (achieved / peak, a fraction; None when the peak is unknown).
  """
  if not step_time_s > 0:
    raise ValueError(f"step_time_s must be > 0, got {step_time_s!r}")
  if num_devices < 1:
    raise ValueError(f"num_devices must be >= 1, got {num_devices!r}")
  flops_per_device = flops_per_step / step_time_s / num_devices
  mfu = None
  if peak_flops_per_device is not None and peak_flops_per_device > 0:
    mfu = flops_per_device / peak_flops_per_device
  tokens_per_sec = tokens_per_step / step_time_s
  return {"tokens_per_sec": tokens_per_sec, "tokens_per_sec_per_device": tokens_per_sec / num_devices,
          "tflops_per_device": flops_per_device / 1e12, "mfu": mfu}


def loss_metrics(loss_nats: float, *, byte_level: bool, prefix: str = "") -> dict[str, float]:
  """The loss (mean nats/token) and, for byte tokenizers, bits per byte, else perplexity.

  Bits per byte is tokenizer-independent only when a token is a byte, hence the split; exp overflow (a diverged
  run) gives perplexity inf rather than an exception.
  """
  loss = float(loss_nats)
  if byte_level:
    return {prefix + "loss": loss, prefix + "bpb": loss / math.log(2)}
  try:
    ppl = math.exp(loss)
  except OverflowError:
    ppl = math.inf
  return {prefix + "loss": loss, prefix + "ppl": ppl}


def _as_float(value: Any) -> Optional[float]:
  """`value` as a float (also numpy / jax scalars), or None for None, text and anything else not a number."""
  if value is None or isinstance(value, str):
    return None
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def _to_json(value: Any) -> Any:
  if value is None or isinstance(value, (bool, str)):
    return value
  if isinstance(value, numbers.Integral):
    return int(value)
  x = _as_float(value)
  if x is None:
    return str(value)
  return x if math.isfinite(x) else "NaN" if math.isnan(x) else "Infinity" if x > 0 else "-Infinity"


def _from_json(value: Any) -> Any:
  return _NONFINITE.get(value, value) if isinstance(value, str) else value


def read_metrics(path: str) -> list[dict[str, Any]]:
  """Reads a metrics.jsonl back, non-finite strings as floats; a torn (unterminated, unparsable) last line is
  skipped, any other unparsable line raises ValueError."""
  lines = paths.as_path(path).read_text(encoding="utf-8").split("\n")
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:  # no newline after it: a write cut short by a kill
        break
      raise ValueError(f"{path}:{i + 1}: not a JSON object: {line[:80]!r}") from e
    records.append({k: _from_json(v) for k, v in record.items()})
  return records


def _step_at_most(line: str, step: int, path: str) -> bool:
  try:
    return json.loads(line)["step"] <= step
  except (json.JSONDecodeError, TypeError, KeyError):
    log.warning("%s: dropping an unparsable line (a run killed mid-write?): %r", path, line[:80])
    return False


def _truncate_jsonl(path: str, step: int) -> None:
  """Drops records with step > `step` and unparsable lines, atomically (tmp + os.replace; one object write on an
  object store), if any need dropping."""
  if not paths.as_path(path).exists():
    return
  text = paths.as_path(path).read_text(encoding="utf-8")
  new = "".join(line + "\n" for line in text.split("\n") if line.strip() and _step_at_most(line, step, path))
  if new == text:
    return  # a clean file with nothing after `step`: no rewrite
  paths.write_text_atomic(path, new)  # a kill now leaves either the old or the new file, never half of one


def _open_append(path: str) -> TextIO:
  # A torn last line (killed mid-write, no truncate_after) would glue itself to the next record: cut it first.
  if paths.is_remote(path):  # no append on object stores: the file is rewritten whole (paths.ObjectAppender)
    text = paths.as_path(path).read_text(encoding="utf-8") if paths.as_path(path).exists() else ""
    return paths.ObjectAppender(path, text[:text.rfind("\n") + 1])  # type: ignore[return-value]
  if os.path.exists(path) and os.path.getsize(path):
    with open(path, "rb+") as f:
      data = f.read()
      if not data.endswith(b"\n"):
        f.truncate(data.rfind(b"\n") + 1)
  return open(path, "a", encoding="utf-8")


class MetricsLogger:
  """Writes logged metrics to metrics.jsonl, TensorBoard and the console (above the progress bar if one is drawn).

  TensorBoard events are written by tensorboardX's background thread and reach the disk within a few seconds
  (`flush` on every log, `flush_secs` for what the thread writes later); metrics.jsonl is the durable record.
  A remote workdir (gs://...) has no append: metrics.jsonl and samples.jsonl are uploaded whole, and the event files
  written to a local staging folder are copied up, at most every 5 s and at `close` (paths.py).
  """

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True,
               progress: Optional[tqdm] = None, stream: Optional[TextIO] = None, sinks: Sequence[Any] = ()):
    """Creates `workdir` (if enabled); the files are opened on first use.

    Args:
      workdir: Run directory holding metrics.jsonl, samples.jsonl and tensorboard/.
      enabled: False on processes other than 0: every method is then a no-op and nothing touches the disk.
      tensorboard: Also write TensorBoard event files under workdir/tensorboard.
      progress: The tqdm bar to print console lines above (`tqdm.write` clears it, prints, redraws it) while it is
        drawn; a disabled bar (off a terminal) changes nothing.
      stream: Console stream when no bar is drawn; None means `sys.stdout` at construction time.
      sinks: More destinations of every `log` (e.g. `wandb_run.WandbSink`): objects with `log(step, metrics)` and
        `close()`, called with the same step and metrics as metrics.jsonl gets.
    """
    self.enabled = enabled
    self.workdir = workdir
    self._tensorboard = tensorboard
    self._progress = progress
    self._stream = sys.stdout if stream is None else stream
    self._files: dict[str, TextIO] = {}
    self._writer: Any = None
    self._purge_step: Optional[int] = None
    self._tb_folder: Optional[paths.SyncedFolder] = None  # TensorBoard's local stand-in for a remote workdir
    self._sinks = list(sinks) if enabled else []
    if enabled:
      paths.makedirs(workdir)

  def truncate_after(self, step: int) -> None:
    """Forgets everything logged after `step` (the restored checkpoint) by a previous, killed run.

    Rewrites metrics.jsonl and samples.jsonl without records with step > `step` or torn lines, and makes the next
    TensorBoard event file start with a purge marker at step + 1, which hides the killed run's later events.
    """
    if not self.enabled:
      return
    self.close()  # files reopen on the next write; the purge marker only goes at the start of an event file
    for name in (METRICS_FILE, SAMPLES_FILE):
      _truncate_jsonl(paths.join(self.workdir, name), step)
    self._purge_step = step + 1

  def log(self, step: int, metrics: dict[str, Any]) -> None:
    """Logs `metrics` of `step`: one jsonl record, TensorBoard scalars (tag = key), one console line."""
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _to_json(v) for k, v in metrics.items()}}
    self._append(METRICS_FILE, record)
    for sink in self._sinks:
      sink.log(int(step), metrics)
    writer = self._tb()
    if writer is not None:
      for k, v in metrics.items():
        x = _as_float(v)
        if x is not None:  # None (unknown) and text are not scalars
          writer.add_scalar(k, x, int(step))
      writer.flush()
      self._tb_folder.sync()
    self._print(" | ".join([f"step {step}"] + [_console_item(k, v) for k, v in metrics.items()
                                               if not k.startswith(_CONSOLE_HIDDEN)]))

  def log_text(self, step: int, tag: str, text: str) -> None:
    """Logs a generated sample: TensorBoard text (tag + "/text_summary"), console and samples.jsonl."""
    if not self.enabled:
      return
    self._append(SAMPLES_FILE, {"step": int(step), "tag": tag, "text": text})
    writer = self._tb()
    if writer is not None:
      writer.add_text(tag, text, int(step))
      writer.flush()
      self._tb_folder.sync()
    self._print(f"step {step} | {tag}: {text}")

  def sync(self) -> None:
    """Makes everything logged so far durable now: a remote workdir otherwise uploads at most every 5 s. The
    trainer calls it at every checkpoint, so a run killed later resumes with its logs complete up to there."""
    for f in self._files.values():
      if isinstance(f, paths.ObjectAppender):
        f.sync()
    if self._tb_folder is not None:
      self._tb_folder.sync(force=True)

  def close(self) -> None:
    """Flushes and closes every file; safe to call twice (a later `log` reopens them)."""
    for name in list(self._files):
      self._files.pop(name).close()
    for sink in self._sinks:
      sink.close()
    if self._writer is not None:
      self._writer.close()
      self._writer = None
      self._tb_folder.close()  # uploads the event files of a remote workdir
      self._tb_folder = None

  def _append(self, name: str, record: dict[str, Any]) -> None:
    f = self._files.get(name)
    if f is None:
      f = self._files[name] = _open_append(paths.join(self.workdir, name))
    # ensure_ascii=False keeps generated text readable; allow_nan=False: _to_json already encoded non-finite values.
    f.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
    f.flush()

  def _tb(self) -> Any:
    if not self._tensorboard:
      return None
    if self._writer is None:
      from tensorboardX import SummaryWriter  # deferred: a run without TensorBoard does not need it installed
      self._tb_folder = paths.SyncedFolder(paths.join(self.workdir, TENSORBOARD_DIR))
      self._writer = SummaryWriter(self._tb_folder.local, purge_step=self._purge_step,
                                   flush_secs=5, filename_suffix=f".{os.getpid()}.{next(_EVENT_FILE_IDS)}")
    return self._writer

  def _print(self, line: str) -> None:
    if self._progress is not None and not self._progress.disable:
      self._progress.write(line, file=self._stream)
    else:
      self._stream.write(line + "\n")
      self._stream.flush()


def _console_item(key: str, value: Any) -> str:
  label, fmt = _CONSOLE.get(key, (key, "{:.4g}".format))
  x = _as_float(value)
  if x is None:
    return f"{label} {'n/a' if value is None else value}"
  return f"{label} {fmt(x) if math.isfinite(x) else x}"
