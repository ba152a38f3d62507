"""Tests of the training observability: derived metrics, metrics.jsonl, TensorBoard event files, the progress bar."""

from __future__ import annotations

import glob
import io
import json
import math
import os
import struct

import numpy as np
import pytest
from tensorboardX.proto import event_pb2
from tqdm import tqdm

from megalodon_jax.training import metrics as metrics_lib
from megalodon_jax.training.metrics import MetricsLogger, loss_metrics, read_metrics, throughput
from megalodon_jax.training.trainer import progress_bar


class FakeTTY(io.StringIO):

  def isatty(self) -> bool:
    return True


# --- TFRecord / event-file reading, written from the format description, independent of tensorboardX's writer.

def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli polynomial, reflected
    table.append(c)
  return table


_CRC_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
  c = 0xFFFFFFFF
  for b in data:
    c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
  c ^= 0xFFFFFFFF
  return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _read_events(path: str) -> list[event_pb2.Event]:
  with open(path, "rb") as f:
    data = f.read()
  events, pos = [], 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (length_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    assert length_crc == _masked_crc32c(header)
    payload = data[pos + 12:pos + 12 + length]
    (payload_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
    assert payload_crc == _masked_crc32c(payload)
    event = event_pb2.Event()
    event.ParseFromString(payload)
    events.append(event)
    pos += 16 + length
  assert pos == len(data)
  return events


def _event_files(workdir: str) -> list[str]:
  files = sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")))
  assert files
  return files


def _tensorboard_view(workdir: str) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, str]], list[int]]:
  """Scalars and texts as TensorBoard shows them: a SessionLog START at step s hides earlier events at steps >= s."""
  scalars: dict[str, dict[int, float]] = {}
  texts: dict[str, dict[int, str]] = {}
  starts = []
  for path in _event_files(workdir):
    for event in _read_events(path):
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        starts.append(event.step)
        for series in (*scalars.values(), *texts.values()):
          for s in [s for s in series if s >= event.step]:
            del series[s]
      if not event.HasField("summary"):
        continue
      for value in event.summary.value:
        if value.HasField("simple_value"):
          scalars.setdefault(value.tag, {})[event.step] = value.simple_value
        else:
          texts.setdefault(value.tag, {})[event.step] = value.tensor.string_val[0].decode("utf-8")
  return scalars, texts, starts


# --- derived metrics

def test_loss_metrics_bpb_and_ppl():
  assert loss_metrics(3.2, byte_level=True) == {"loss": 3.2, "bpb": pytest.approx(3.2 / math.log(2), rel=1e-15)}
  out = loss_metrics(np.float32(2.5), byte_level=False, prefix="eval_")
  assert set(out) == {"eval_loss", "eval_ppl"} and type(out["eval_loss"]) is float
  assert out["eval_ppl"] == pytest.approx(math.exp(2.5), rel=1e-15)
  assert loss_metrics(1e4, byte_level=False)["ppl"] == math.inf  # math.exp would raise OverflowError
  assert math.isnan(loss_metrics(math.nan, byte_level=False)["ppl"])
  assert math.isnan(loss_metrics(math.nan, byte_level=True)["bpb"])


def test_throughput_against_hand_computed_values():
  # 8 devices, 0.25 s per step, 64 x 2048 tokens, 4e15 model FLOPs per step, H100-like peak 989.4 TFLOP/s.
  out = throughput(step_time_s=0.25, tokens_per_step=64 * 2048, num_devices=8, flops_per_step=4e15,
                   peak_flops_per_device=989.4e12)
  assert out["tokens_per_sec"] == pytest.approx(524288.0)  # 131072 / 0.25
  assert out["tokens_per_sec_per_device"] == pytest.approx(65536.0)
  assert out["tflops_per_device"] == pytest.approx(2000.0)  # 4e15 / 0.25 / 8 / 1e12
  assert out["mfu"] == pytest.approx(2000e12 / 989.4e12)
  assert throughput(step_time_s=2.0, tokens_per_step=100, num_devices=1, flops_per_step=1e12,
                    peak_flops_per_device=None) == {"tokens_per_sec": 50.0, "tokens_per_sec_per_device": 50.0,
                                                    "tflops_per_device": 0.5, "mfu": None}
  with pytest.raises(ValueError):
    throughput(step_time_s=0.0, tokens_per_step=1, num_devices=1, flops_per_step=1.0, peak_flops_per_device=None)


def test_jsonl_round_trip_with_non_finite_values(tmp_path):
  workdir = str(tmp_path / "run")
  logger = MetricsLogger(workdir, tensorboard=False, stream=io.StringIO())
  logger.log(0, {"eval_loss": 5.5, "eval_bpb": 5.5 / math.log(2)})
  logger.log(10, {"loss": np.float32(3.25), "learning_rate": 3e-4, "grad_norm": math.nan, "ppl": math.inf,
                  "neg": -math.inf, "mfu": None, "tokens": np.int64(4096), "note": "text"})
  path = os.path.join(workdir, "metrics.jsonl")
  # Flushed per call: readable before close.
  assert [r["step"] for r in read_metrics(path)] == [0, 10]
  logger.close()

  def strict(token):
    raise AssertionError(f"non-standard JSON token {token}")

  lines = open(path).read().splitlines()
  raw = [json.loads(line, parse_constant=strict) for line in lines]
  assert raw[1]["grad_norm"] == "NaN" and raw[1]["ppl"] == "Infinity" and raw[1]["neg"] == "-Infinity"
  assert raw[1]["mfu"] is None and raw[1]["tokens"] == 4096 and type(raw[1]["tokens"]) is int

  records = read_metrics(path)
  assert records[0] == {"step": 0, "eval_loss": 5.5, "eval_bpb": 5.5 / math.log(2)}
  r = records[1]
  assert r["loss"] == 3.25 and r["learning_rate"] == 3e-4 and math.isnan(r["grad_norm"])
  assert r["ppl"] == math.inf and r["neg"] == -math.inf and r["mfu"] is None and r["note"] == "text"
  assert list(r) == ["step", "loss", "learning_rate", "grad_norm", "ppl", "neg", "mfu", "tokens", "note"]


def test_console_line(tmp_path):
  out = io.StringIO()
  logger = MetricsLogger(str(tmp_path), tensorboard=False, stream=out)
  logger.log(120, {"loss": 3.214, "bpb": 4.6368, "learning_rate": 3e-4, "grad_norm": 0.51234, "step_time": 0.25,
                   "tokens_per_sec": 524288.0, "tokens_per_sec_per_device": 65536.0, "tflops_per_device": 123.456,
                   "mfu": 0.4123, "eval_ppl": math.nan})
  logger.log(130, {"mfu": None, "step_time": 1.5})
  logger.close()
  assert out.getvalue().splitlines() == [
      "step 120 | loss 3.2140 | bpb 4.637 | lr 3.0e-04 | grad_norm 0.5123 | step_time 250ms | tok/s 524,288 | "
      "tok/s/dev 65,536 | TFLOP/s/dev 123 | mfu 41.2% | eval_ppl nan",
      "step 130 | mfu n/a | step_time 1.50s"]


def _write_run(workdir: str, steps: list[int]) -> None:
  logger = MetricsLogger(workdir, stream=io.StringIO())
  for s in steps:
    logger.log(s, {"loss": 10.0 - s / 10})
    logger.log_text(s, "sample_0", f"text at {s}")
  logger.close()


def test_truncate_after_drops_later_steps_and_torn_line(tmp_path):
  workdir = str(tmp_path)
  _write_run(workdir, [10, 20, 30, 40, 50])
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path, "a") as f:
    f.write('{"step": 60, "loss": 4.')  # killed mid-write
  assert [r["step"] for r in read_metrics(path)] == [10, 20, 30, 40, 50]  # the torn line is skipped on read

  logger = MetricsLogger(workdir, stream=io.StringIO())
  logger.truncate_after(30)  # resumed from the checkpoint of step 30
  assert [r["step"] for r in read_metrics(path)] == [10, 20, 30]
  assert open(path).read().endswith("}\n") and not os.path.exists(path + ".tmp")
  samples = [json.loads(line) for line in open(os.path.join(workdir, "samples.jsonl"))]
  assert [s["step"] for s in samples] == [10, 20, 30]
  logger.log(40, {"loss": 1.5})
  logger.close()
  assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(10, 9.0), (20, 8.0), (30, 7.0), (40, 1.5)]

  # Nothing to drop: the file is left alone (same inode, no rewrite).
  inode = os.stat(path).st_ino
  MetricsLogger(workdir, stream=io.StringIO()).truncate_after(100)
  assert os.stat(path).st_ino == inode


def test_append_repairs_torn_line_and_read_rejects_corrupt_middle(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  with open(path, "w") as f:
    f.write('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
  logger = MetricsLogger(str(tmp_path), tensorboard=False, stream=io.StringIO())
  logger.log(2, {"loss": 1.0})  # no truncate_after: the torn line must not glue onto this record
  logger.close()
  assert read_metrics(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
  with open(path, "w") as f:
    f.write('{"step": 1}\ngarbage\n{"step": 2}\n')
  with pytest.raises(ValueError, match=":2:"):
    read_metrics(path)


# --- TensorBoard

def test_tensorboard_scalars_and_text(tmp_path):
  workdir = str(tmp_path)
  logger = MetricsLogger(workdir, stream=io.StringIO())
  logger.log(0, {"eval_loss": 5.25})
  logger.log(10, {"loss": 3.5, "learning_rate": 3e-4, "mfu": None, "grad_norm": math.inf})
  logger.log(20, {"loss": 3.0, "learning_rate": 2e-4, "mfu": 0.25})
  logger.log_text(20, "sample_0", "héllo ▶ world")
  logger.close()
  logger.close()  # idempotent

  scalars, texts, starts = _tensorboard_view(workdir)
  assert starts == []
  assert scalars == {"eval_loss": {0: 5.25}, "loss": {10: 3.5, 20: 3.0},
                     "learning_rate": {10: float(np.float32(3e-4)), 20: float(np.float32(2e-4))},
                     "grad_norm": {10: math.inf}, "mfu": {20: 0.25}}  # None (unknown) is not a scalar
  assert texts == {"sample_0/text_summary": {20: "héllo ▶ world"}}
  assert [json.loads(line) for line in open(os.path.join(workdir, "samples.jsonl"))] == [
      {"step": 20, "tag": "sample_0", "text": "héllo ▶ world"}]


def test_tensorboard_resume_purges_steps_after_checkpoint(tmp_path):
  workdir = str(tmp_path)
  _write_run(workdir, [10, 20, 30, 40, 50])
  logger = MetricsLogger(workdir, stream=io.StringIO())
  logger.truncate_after(30)
  logger.log(40, {"loss": 1.5})
  logger.close()
  assert len(_event_files(workdir)) == 2  # the killed run's file is kept, not clobbered
  scalars, texts, starts = _tensorboard_view(workdir)
  assert starts == [31]
  assert scalars == {"loss": {10: 9.0, 20: 8.0, 30: 7.0, 40: 1.5}}
  assert texts == {"sample_0/text_summary": {s: f"text at {s}" for s in (10, 20, 30)}}


def test_tensorboard_off(tmp_path):
  logger = MetricsLogger(str(tmp_path), tensorboard=False, stream=io.StringIO())
  logger.truncate_after(0)  # a fresh run: nothing to truncate
  logger.log(1, {"loss": 1.0})
  logger.log_text(1, "sample_0", "x")
  logger.close()
  assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "samples.jsonl"]


def test_disabled_logger_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  out, tty = io.StringIO(), FakeTTY()
  bar = tqdm(total=10, file=tty, disable=True)
  logger = MetricsLogger(str(workdir), enabled=False, progress=bar, stream=out)
  logger.truncate_after(0)
  logger.log(1, {"loss": 1.0})
  logger.log_text(1, "sample_0", "x")
  logger.close()
  assert not workdir.exists() and out.getvalue() == "" and tty.getvalue() == ""


# --- progress bar (tqdm)

@pytest.mark.parametrize("mode, tty, drawn", [("auto", True, True), ("auto", False, False), ("on", False, True),
                                              ("off", True, False)])
def test_progress_bar_modes(monkeypatch, mode, tty, drawn):
  """config.progress_bar: auto draws only on a terminal, on always, off never; the bar goes to stderr."""
  err = FakeTTY() if tty else io.StringIO()
  monkeypatch.setattr("sys.stderr", err)
  bar = progress_bar(mode, 100, 40)
  assert bar.disable is not drawn
  bar.update(2)
  bar.close()
  assert ("42/100" in err.getvalue()) is drawn and ("40/100" in err.getvalue()) is drawn  # resumed at step 40


def test_logger_prints_through_active_bar(tmp_path):
  tty = FakeTTY()
  bar = tqdm(total=100, initial=10, file=tty, ncols=60, mininterval=0)
  drawn = tty.getvalue()
  assert drawn.startswith("\r") and "10/100" in drawn
  logger = MetricsLogger(str(tmp_path), tensorboard=False, progress=bar, stream=tty)
  logger.log(10, {"loss": 3.0})
  logger.log_text(10, "sample_0", "abc")
  after = tty.getvalue()[len(drawn):]
  # Each line: the bar is erased ('\r', blanks, '\r'), the line printed whole, then the bar drawn again below it.
  for line in ("step 10 | loss 3.0000\n", "step 10 | sample_0: abc\n"):
    erase_at = after.index("\r" + " " * 10)
    assert after[erase_at:].lstrip("\r ").startswith(line)
    after = after[after.index(line) + len(line):]
    assert after.startswith("\r") and "10/100" in after.split("\n")[0]
  bar.close()
  logger.close()
  # Without a drawn bar (a disabled one: off a terminal) the same logger prints plain lines to its own stream.
  out2 = io.StringIO()
  logger2 = MetricsLogger(str(tmp_path / "b"), tensorboard=False, stream=out2,
                          progress=tqdm(total=100, file=io.StringIO(), disable=None))
  logger2.log(10, {"loss": 3.0})
  assert out2.getvalue() == "step 10 | loss 3.0000\n"
  assert metrics_lib.METRICS_FILE == "metrics.jsonl"
