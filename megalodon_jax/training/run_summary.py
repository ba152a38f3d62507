"""What a training command prints around a run: the "already finished" line of a re-run, and the one summary line
every run ends with (steps run, final train loss and eval metrics, where the outputs went).

Everything is read back from the workdir (finished checkpoint steps, metrics.jsonl), so the summary describes what
is on disk, which is what a later resume or tool will see. No jax import beyond orbax's path helpers.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

from etils import epath

from megalodon_jax.checkpoints import layout
from megalodon_jax.training import goodput as goodput_lib
from megalodon_jax.training import metrics as metrics_lib


def latest_finished_step(workdir: str) -> Optional[int]:
  """The latest step of `workdir/checkpoints` whose save finished, or None (no checkpoint yet)."""
  steps = layout.finished_steps(layout.checkpoints_dir(workdir))
  return steps[-1] if steps else None


def already_finished(workdir: str, total_steps: int) -> Optional[str]:
  """The one line to print instead of training when the workdir's run reached `total_steps` already, else None."""
  step = latest_finished_step(workdir)
  if step is None or step < total_steps:
    return None
  return (f"already finished at step {step} of {total_steps} in {workdir}; raise --config.total_steps to "
          f"continue")


def _number(value: Any) -> str:
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return f"{value:.4g}" if math.isfinite(value) else str(value)
  return "n/a" if value is None else str(value)


def _last_with(records: list[dict[str, Any]], key: str) -> Optional[dict[str, Any]]:
  return next((r for r in reversed(records) if key in r), None)


def summary_line(workdir: str, *, start_step: int, end_step: Optional[int], total_steps: int, tensorboard: bool,
                 seconds: Optional[float] = None) -> str:
  """The run's summary, one line.

  Args:
    workdir: the run directory (its metrics.jsonl gives the losses).
    start_step: the step the run started (resumed) from.
    end_step: the latest finished checkpoint after the run (None: nothing saved); below `total_steps` means the
      run was preempted (it saved and stopped on SIGTERM).
    total_steps: the configured end of training.
    tensorboard: whether TensorBoard events were written (workdir/tensorboard).
    seconds: wall time of the run, shown when given.
  """
  end = start_step if end_step is None else end_step
  parts = []
  if end < total_steps:
    parts.append(f"preempted at step {end}: resume by re-running the same command")
  took = f" in {seconds:.0f} s" if seconds is not None else ""
  parts.append(f"trained steps {start_step} -> {end} of {total_steps}{took}")
  path = os.path.join(workdir, metrics_lib.METRICS_FILE)
  records = [r for r in metrics_lib.read_metrics(path) if r.get("step", 0) <= end] if epath.Path(path).exists() else []
  train = _last_with(records, "loss")
  if train is not None:
    extra = "".join(f", {k} {_number(train[k])}" for k in ("bpb", "ppl") if k in train)
    parts.append(f"loss {_number(train['loss'])}{extra} (step {train['step']})")
  evaluated = _last_with(records, "eval_loss")
  if evaluated is not None:
    items = ", ".join(f"{k} {_number(v)}" for k, v in evaluated.items() if k.startswith("eval_"))
    parts.append(f"{items} (step {evaluated['step']})")
  goodput = goodput_lib.workdir_summary(workdir)
  if goodput is not None:
    parts.append(goodput)
  outputs = [f"checkpoints {layout.checkpoints_dir(workdir)}", f"metrics {path}"]
  if tensorboard:
    outputs.append(f"TensorBoard {os.path.join(workdir, metrics_lib.TENSORBOARD_DIR)}")
  parts.append(", ".join(outputs))
  return "; ".join(parts)
