"""`WandbConfig`: the `wandb` section of the training config (`--config.wandb.project=...` turns W&B logging on).

The logging itself is `wandb_run.py`; this file only defines and checks the fields, without importing wandb (the
package is an optional extra, checked by `wandb_run.check_available` when a project is set). No jax import.
"""

from __future__ import annotations

import dataclasses

from megalodon_jax.errors import FieldError

MODES = ("", "online", "offline", "disabled")


@dataclasses.dataclass(frozen=True)
class WandbConfig:
  """Weights & Biases logging of a training run: every metric of metrics.jsonl, with its step, and the config."""

  project: str = ""  # the W&B project to log to; "" = no W&B logging
  entity: str = ""  # the W&B user or team owning the project; "" = the logged-in user's default entity
  name: str = ""  # the run's display name; "" = a name W&B makes up
  tags: str = ""  # comma-separated tags of the run, e.g. "tiny,baseline"
  mode: str = ""  # online | offline | disabled; "" = W&B's own choice (the WANDB_MODE environment variable, or online)

  def __post_init__(self):
    for name in ("project", "entity", "name", "tags", "mode"):
      if not isinstance(getattr(self, name), str):
        raise FieldError(type(self).__name__, name, getattr(self, name), "must be a string")
    if self.mode not in MODES:
      raise FieldError(type(self).__name__, "mode", self.mode, f"must be one of {MODES} ('' = W&B's default)")
    if self.tags and not all(t.strip() for t in self.tags.split(",")):
      raise FieldError(type(self).__name__, "tags", self.tags, "must be comma-separated non-empty tags, e.g. 'a,b'")

  @property
  def enabled(self) -> bool:
    return bool(self.project)

  @property
  def tag_list(self) -> list[str]:
    return [t.strip() for t in self.tags.split(",")] if self.tags else []
