"""Weights & Biases logging of a training run (`--config.wandb.project=...`), a sink of `MetricsLogger`.

(Not named wandb.py: that would shadow the package it imports.)

What goes to W&B: the config once per attempt (`wandb.init(config=...)`), and every record metrics.jsonl gets, with
the same step (`run.log(metrics, step=step)`); a value metrics.jsonl writes as null (unknown, e.g. `mfu` on a
device with no known peak) is left out of the W&B row. Samples stay in samples.jsonl and TensorBoard. Only process
0 logs (the trainer makes a sink there alone).

Resuming: the first attempt stores the W&B run id in `<workdir>/wandb_run_id` (through `paths`, so a gs:// workdir
works); an attempt resuming from a checkpoint reads it and continues that run (`id=..., resume="allow"`), so a run
stopped and resumed any number of times is one W&B run. An attempt starting at step 0 (a new run, or one whose
checkpoints were all removed) starts a new W&B run and stores its id.

Repeated steps: W&B's history only moves forward (a row with a step below the run's last is ignored with a warning).
A run stopped by SIGTERM, Ctrl-C or reaching total_steps saves its last logged step, so its resume logs only new
steps and W&B's history equals metrics.jsonl. A run killed (SIGKILL, a crash) after logging steps past its last
checkpoint resumes from that checkpoint: metrics.jsonl drops the killed attempt's later records and the resumed
attempt logs those steps again, but W&B keeps the first values it got for them. Online, the resumed run reports
where its history stands (`run.starting_step`) and the sink skips the steps below it, with one warning; offline,
each attempt writes its own file and `wandb sync` drops the repeated rows on upload. The losses of those steps are
the same (resume is exact); their timings are the killed attempt's.

`import wandb` happens only when a project is set: the trainer runs without the package, and asking for W&B
without it is a ConfigError before anything is built (`check_available`, called by `TrainConfig.check_inputs`).
No jax import.
"""

from __future__ import annotations

import json
import logging
import numbers
from typing import Any, Mapping, Optional

from megalodon_jax import paths
from megalodon_jax.errors import ConfigError
from megalodon_jax.training.wandb_config import WandbConfig

log = logging.getLogger("megalodon_jax")

RUN_ID_FILE = "wandb_run_id"  # in the workdir: the W&B run id a resumed run continues


def _import_wandb(config: WandbConfig) -> Any:
  try:
    import wandb  # pylint: disable=import-outside-toplevel  (an optional extra)
  except ImportError as e:
    raise ConfigError(f"--config.wandb.project={config.project!r}: logging to Weights & Biases needs the wandb "
                      f"package, which cannot be imported ({e}); install it (pip install 'megalodon-jax[wandb]') "
                      f"or leave wandb.project empty") from None
  return wandb


def check_available(config: WandbConfig) -> None:
  """Raises ConfigError when W&B logging is asked for (a project is set) and `wandb` cannot be imported."""
  if config.enabled:
    _import_wandb(config)


def read_run_id(workdir: str) -> Optional[str]:
  """The W&B run id stored in `workdir`, or None."""
  path = paths.as_path(paths.join(workdir, RUN_ID_FILE))
  if not path.exists():
    return None
  return path.read_text(encoding="utf-8").strip() or None


def _scalar(value: Any) -> Optional[float]:
  """A metric value as W&B gets it: an int or a float; None (unknown), text and anything else give None (left
  out)."""
  if value is None or isinstance(value, (bool, str)):
    return None
  if isinstance(value, numbers.Integral):
    return int(value)
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


class WandbSink:
  """Logs a training run to W&B: construct it on process 0, `start(step)` before the first log, pass it to
  `MetricsLogger(sinks=[...])`, which calls `log` and `close`.

  A `log` after `close` (or without `start`) starts the run first, continuing the stored one when `step` > 0.
  """

  def __init__(self, config: WandbConfig, workdir: str, run_config: Mapping[str, Any]):
    """config: the `wandb` section (a project set); workdir: the run directory (local or gs://); run_config: the
    whole training config as plain data (its JSON), logged once per attempt."""
    if not config.enabled:
      raise ValueError("WandbSink needs config.project")
    self.config, self.workdir, self.run_config = config, workdir, dict(run_config)
    self.run: Any = None
    self._skip_below = 0  # steps W&B already holds (a killed attempt's, see the module docstring)
    self._warned = False

  def start(self, step: int) -> None:
    """Starts the W&B run of an attempt that trains from `step`: continues the stored run when `step` > 0 and the
    workdir has its id, else starts a new one; stores the run's id. Raises ConfigError when W&B refuses (no login
    online, a bad entity), before the trainer compiles anything."""
    if self.run is not None:
      return
    wandb = _import_wandb(self.config)
    run_id = read_run_id(self.workdir) if step > 0 else None
    c = self.config
    try:
      self.run = wandb.init(project=c.project, entity=c.entity or None, name=c.name or None,
                            tags=c.tag_list or None, mode=c.mode or None, config=self.run_config,
                            id=run_id, resume="allow" if run_id else None)
    except wandb.errors.Error as e:
      raise ConfigError(f"--config.wandb.project={c.project!r}: W&B could not start the run ({type(e).__name__}: "
                        f"{e}); log in (wandb login, or WANDB_API_KEY) or log offline "
                        f"(--config.wandb.mode=offline)") from None
    if self.run.id != run_id and not getattr(self.run, "disabled", False):  # mode=disabled: an id of nothing
      paths.write_text_atomic(paths.join(self.workdir, RUN_ID_FILE), self.run.id + "\n")
    # Online, a resumed run starts after the last step W&B holds; offline it does not know it (0).
    self._skip_below = int(self.run.starting_step) if run_id else 0
    log.info("W&B run %s %s %s", self.run.id, "continues from step" if run_id else "starts at step", step)

  def log(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Logs one metrics.jsonl record: its numeric values (None left out) at W&B step `step`."""
    if self.run is None:
      self.start(step)
    if step < self._skip_below:
      if not self._warned:
        log.warning("W&B run %s already holds steps up to %d (logged by an attempt killed after its last "
                    "checkpoint); it keeps those values, metrics.jsonl has this attempt's", self.run.id,
                    self._skip_below - 1)
        self._warned = True
      return
    row = {k: x for k, x in ((k, _scalar(v)) for k, v in metrics.items()) if x is not None}
    self.run.log(row, step=int(step))

  def close(self) -> None:
    """Finishes the W&B run (uploads what is left online); safe to call twice."""
    if self.run is not None:
      run, self.run = self.run, None
      run.finish()


def sink(cfg: Any, workdir: str) -> Optional[WandbSink]:
  """The trainer's W&B sink for TrainConfig `cfg` (None when `wandb.project` is empty)."""
  if not cfg.wandb.enabled:
    return None
  return WandbSink(cfg.wandb, workdir, json.loads(cfg.to_json()))


__all__ = ["RUN_ID_FILE", "WandbSink", "check_available", "read_run_id", "sink"]
