"""`TrainConfig`: the training config, typed. Its dataclasses are the one definition of every field, its default
and its validation; `configs/*.py` are the ml_collections form (`typed_config.config_dict`) that a command line
overrides, and `TrainConfig.of(config_dict)` validates it field by field, naming each bad value by its key
(`--config.optimizer.lr=0.0: ...`). Sections: `model` (the family's config: `MegalodonSection` for Megalodon,
official `ModelConf` names), `data` (`data/config.py`), `optimizer` (`optimizer_args.py`), `mesh` (below).

Checked here, cheaply and before jax starts: types and ranges, seq_len against chunk_size, the schedule against
total_steps, and the mesh as far as its fixed sizes allow (`check_devices` repeats that with the real device count).
The data and `init_from` are checked against the disk by `check_inputs`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any, Mapping, Optional

from megalodon_jax import families, paths, typed_config
from megalodon_jax.data.config import DataConfig
from megalodon_jax.errors import CheckpointError, ConfigError, FieldError, ShardingError
from megalodon_jax.mesh_axes import PARAM_RULES
from megalodon_jax.training import mesh_checks
from megalodon_jax.training import profiling
from megalodon_jax.training.optimizer_args import OptimizerConfig, check_warmup
from megalodon_jax.training import wandb_run
from megalodon_jax.training.wandb_config import WandbConfig

PROGRESS_BAR = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh axes (data, sequence, fsdp, tensor); one size may be -1 (= all remaining devices)."""

  data: int = 1  # pure data parallelism (replicated params)
  # Chunk parallelism: the length split over this many devices, each a contiguous slice of whole chunks (seq_len a
  # multiple of sequence x chunk_size); context grows with the chips. Parameters are replicated over it.
  sequence: int = 1
  fsdp: int = -1  # data parallelism with parameters and optimizer state sharded (ZeRO-3)
  tensor: int = 1  # tensor parallelism over vocab / value / qk / mlp widths


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a training run reads. `model` is the section class of its `family` field (families.py)."""

  model: Any = dataclasses.field(default_factory=lambda: families.MEGALODON.section_class()())
  data: DataConfig = DataConfig()
  # ---- batch and schedule ----
  seed: int = 0  # parameter init, data order and dropout all derive from it
  seq_len: int = 1024  # training sequence length in tokens
  batch_size: int = 8  # global batch in sequences per optimizer step (split over data x fsdp devices)
  grad_accum_steps: int = 1  # micro-batches per step; batch_size must be divisible by it
  total_steps: int = 1000  # optimizer steps of the run (and the length of the LR schedule)
  # Positions whose logits exist at once in the loss (the largest divisor of seq_len not above it); 0 = all. Keeps
  # the (batch, seq_len, vocab) float32 logits and their gradient from ever being whole in memory.
  loss_piece: int = 2048
  optimizer: OptimizerConfig = OptimizerConfig()
  # ---- mesh and sharding ----
  mesh: MeshConfig = MeshConfig()
  # Logical parameter axis -> mesh axis (or None = replicated); a dimension not divisible by its mesh axis size
  # stays replicated. The names and the activations' fixed layout: megalodon_jax/mesh_axes.py.
  logical_axis_rules: tuple = PARAM_RULES
  # ---- checkpoints (Orbax, workdir/checkpoints) ----
  checkpoint_every: int = 500  # save every N steps (and at the end, and on SIGTERM)
  checkpoint_keep: int = 3  # keep the last K checkpoints
  async_checkpointing: bool = True  # save in the background while training continues
  init_from: str = ""  # a params-only checkpoint to start from when workdir has none (see README)
  # ---- observability ----
  log_every: int = 10  # write metrics (metrics.jsonl, TensorBoard, console) every N steps
  eval_every: int = 200  # evaluate on data.eval_split every N steps (and at the end); 0 disables
  eval_batches: int = 8  # batches (of batch_size sequences) per evaluation
  num_samples: int = 2  # generated samples printed and logged at each evaluation; 0 disables
  sample_len: int = 128  # tokens generated per sample
  sample_prompt: str = ""  # prompt for the samples ("" = a validation sequence's first 32 tokens)
  sample_temperature: float = 0.8  # sampling temperature (0 = greedy)
  tensorboard: bool = True  # write TensorBoard event files to workdir/tensorboard
  progress_bar: str = "auto"  # auto (on a terminal) | on | off
  stop_on_nan: bool = True  # stop at the first non-finite loss, keeping the last good checkpoint
  wandb: WandbConfig = WandbConfig()  # Weights & Biases logging (training/wandb_run.py); project "" = off
  # jax.profiler trace to workdir/profile of steps "START,STOP" (both included) or "N" (N steps after the first one
  # this attempt runs); "" = off. training/profiling.py.
  profile_steps: str = ""
  profile_all_processes: bool = False  # every process traces (profile/process_<i>), not only process 0

  def __post_init__(self):
    for name, minimum in (("seq_len", 1), ("batch_size", 1), ("grad_accum_steps", 1), ("total_steps", 1),
                          ("checkpoint_every", 1), ("checkpoint_keep", 1), ("log_every", 1), ("eval_every", 0),
                          ("eval_batches", 1), ("num_samples", 0), ("sample_len", 1), ("seed", 0), ("loss_piece", 0)):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        self._fail(name, value, f"must be an integer >= {minimum}")
    for name in ("tensorboard", "async_checkpointing", "stop_on_nan"):
      if not isinstance(getattr(self, name), bool):
        self._fail(name, getattr(self, name), "must be True or False")
    why = profiling.check_profile_steps(self.profile_steps, self.total_steps)
    if why is not None:
      self._fail("profile_steps", self.profile_steps, why)
    if not isinstance(self.profile_all_processes, bool):
      self._fail("profile_all_processes", self.profile_all_processes, "must be True or False")
    if self.progress_bar not in PROGRESS_BAR:
      self._fail("progress_bar", self.progress_bar, f"must be one of {PROGRESS_BAR}")
    if isinstance(self.sample_temperature, bool) or not isinstance(self.sample_temperature, (int, float)) \
        or not self.sample_temperature >= 0:
      self._fail("sample_temperature", self.sample_temperature, "must be a number >= 0 (0 = greedy)")
    if self.eval_every and self.eval_every % self.log_every:
      self._fail("eval_every", self.eval_every, f"must be a multiple of log_every={self.log_every} (evaluations are "
                 "logged with the step's training metrics), or 0 to disable evaluation")
    chunk = getattr(self.model, "chunk_size", None)  # chunk-wise attention (Megalodon): whole chunks per window
    if chunk and self.seq_len > chunk and self.seq_len % chunk:
      self._fail("seq_len", self.seq_len, f"must be <= model.chunk_size ({chunk}) or a multiple of it; the nearest "
                 f"valid lengths are {self.seq_len // chunk * chunk} and {(self.seq_len // chunk + 1) * chunk}")
    check_warmup(type(self).__name__, self.optimizer.warmup_steps, self.total_steps, self.optimizer.scheduler,
                 field="optimizer.warmup_steps")
    try:
      mesh_checks.check_rules(self.logical_axis_rules)
    except ShardingError as e:
      raise ConfigError(str(e)) from None
    # Before the backends start the device count is unknown: the fixed sizes alone (a -1 axis counts 1) must meet
    # the conditions the real mesh meets too; `check_devices` repeats this with the real count.
    fixed = math.prod(s for s in (self.mesh.data, self.mesh.sequence, self.mesh.fsdp, self.mesh.tensor)
                      if isinstance(s, int) and not isinstance(s, bool) and s >= 1)
    self.check_devices(fixed)

  def _fail(self, name: str, value: Any, why: str) -> None:
    raise FieldError(type(self).__name__, name, value, why)

  @classmethod
  def of(cls, config: Any) -> "TrainConfig":
    """The typed config of a ConfigDict (a `configs/*.py` file with its overrides), a dict, or a TrainConfig.

    Raises:
      ConfigError: the first bad field, named `--config.<key>`, or an unknown key.
    """
    if isinstance(config, cls):
      return config
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    model = values.get("model")
    if not isinstance(model, Mapping):
      family = families.get(getattr(model, "family", "megalodon"), key="model.family")
      return typed_config.from_mapping(cls, values, classes={"model": family.section_class()})
    family = families.get(model.get("family", "megalodon"), key="model.family")
    model, ignored = _split_model_section(family, model)
    typed = typed_config.from_mapping(cls, {**values, "model": model}, classes={"model": family.section_class()})
    if ignored:
      _log_once(f"model.family={family.name} ignores the fields of other families this config sets: "
                + ", ".join(f"{k}={v!r}" for k, v in ignored.items()))
    return typed

  def check_devices(self, num_devices: int) -> tuple[int, ...]:
    """The mesh sizes (data, sequence, fsdp, tensor) over `num_devices`, after checking that the batch and the
    sequence split over them. Raises ConfigError naming the key."""
    try:
      shape = mesh_checks.mesh_shape(self.mesh, num_devices)
    except ShardingError as e:
      raise ConfigError(str(e)) from None
    sizes = dict(zip(mesh_checks.MESH_AXES, shape))
    try:
      mesh_checks.check_batch(self.batch_size, self.grad_accum_steps, sizes)
    except ShardingError as e:
      raise ConfigError(f"--config.batch_size={self.batch_size!r}: {e}") from None
    try:
      mesh_checks.check_sequence(self.seq_len, getattr(self.model, "chunk_size", 1), sizes)
    except ShardingError as e:
      raise ConfigError(f"--config.mesh.sequence={sizes[mesh_checks.SEQUENCE_AXIS]!r}: {e}") from None
    return shape

  @property
  def family(self) -> str:
    """The model family's name (`model.family`)."""
    return self.model.family

  @property
  def model_family(self) -> families.ModelFamily:
    return families.get(self.family, key="model.family")

  def model_config(self, tokenizer_vocab_size: int) -> Any:
    """The model's config, vocab_size -1 taken from the tokenizer. Raises ConfigError naming model.vocab_size."""
    try:
      return self.model.with_vocab(tokenizer_vocab_size)
    except FieldError as e:
      raise typed_config.field_error("model.", e) from None

  def to_json(self, indent: Optional[int] = None) -> str:
    """The config as JSON (config.json in a run directory, the checkpoints' metadata)."""
    return json.dumps(dataclasses.asdict(self), indent=indent)

  def replace(self, **changes: Any) -> "TrainConfig":
    return dataclasses.replace(self, **changes)


def _section_defaults(family: families.ModelFamily) -> dict[str, Any]:
  defaults = family.section_class()()
  return {f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults) if f.init}


def _other_families_defaults(family: families.ModelFamily) -> dict[str, Any]:
  """{field: default} of every registered family's section but `family`'s (the first family to name a field
  gives its default)."""
  out: dict[str, Any] = {}
  for other in families.FAMILIES.values():
    if other is not family:
      for name, default in _section_defaults(other).items():
        out.setdefault(name, default)
  return out


def _split_model_section(family: families.ModelFamily, model: Mapping[str, Any]) -> tuple[dict, dict]:
  """(the fields of `family`'s section, {field: value} of the other families' fields set away from their
  defaults}). Keys no family has stay in the first, for the unknown-key error."""
  own = set(_section_defaults(family))
  others = _other_families_defaults(family)
  kept = {k: v for k, v in model.items() if k in own or k not in others}
  ignored = {k: v for k, v in model.items() if k not in kept and k != "family" and v != others[k]}
  return kept, ignored


_LOGGED: set = set()


def _log_once(message: str) -> None:
  """A warning, once per process: settings that have no effect deserve a look, and the command line checks the
  config before its logging is set up (Python's last-resort handler prints warnings then)."""
  if message not in _LOGGED:
    _LOGGED.add(message)
    logging.getLogger("megalodon_jax").warning(message)


def command_line_dict(config: Optional[TrainConfig] = None):
  """The ConfigDict of `config` (default: the defaults) that `configs/*.py` start from: its own fields, and in
  `model` also every other registered family's fields at their defaults, so one config file runs with any
  `--config.model.family` (a family reads its fields and ignores the others')."""
  c = typed_config.config_dict(config if config is not None else TrainConfig())
  for name, default in _other_families_defaults(families.get(c.model.family, key="model.family")).items():
    if name not in c.model:
      c.model[name] = default
  return c


def check_inputs(config: TrainConfig) -> Any:
  """Checks that `init_from` holds params and that the data exists (reads file metadata only); returns the data
  plan. Raises ConfigError (or DataError) naming the key."""
  if config.init_from:
    from megalodon_jax.checkpoints import layout  # pylint: disable=import-outside-toplevel
    try:
      layout.params_item(paths.abspath(config.init_from))
    except CheckpointError as e:
      raise ConfigError(f"{typed_config.PREFIX}init_from={config.init_from!r}: {e}") from None
  wandb_run.check_available(config.wandb)  # an optional extra: a missing package is refused here, not later
  from megalodon_jax import data  # pylint: disable=import-outside-toplevel  (the data package pulls in TFDS)
  try:
    return data.check_data_config(config.data)
  except data.DataError as e:
    raise ConfigError(str(e)) from None
