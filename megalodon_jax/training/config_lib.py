"""The training config: validation before anything compiles, and the MegalodonConfig it describes.

A config is an `ml_collections.ConfigDict` from `configs/*.py` (fields documented in configs/default.py).
`validate` checks everything that can be checked cheaply (types and ranges, sequence length vs chunk size,
schedule lengths, batch vs mesh vs device count, data paths, checkpoint paths) and raises a `ConfigError` whose
message names the offending key as it is spelled on the command line (`--config.<key>=...`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from megalodon_jax import paths
from megalodon_jax.config import MegalodonConfig
from megalodon_jax.errors import CheckpointError, ConfigError, ShardingError
from megalodon_jax.training import mesh_checks, optimizer_args  # jax-free: validate runs before jax starts

PROGRESS_BAR = ("auto", "on", "off")


def _fail(key: str, value: Any, why: str) -> None:
  raise ConfigError(f"--config.{key}={value!r}: {why}")


def _int(cfg: Any, key: str, minimum: int) -> None:
  value = _get(cfg, key)
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    _fail(key, value, f"must be an integer >= {minimum}")


def _get(cfg: Any, key: str) -> Any:
  for part in key.split("."):
    cfg = cfg[part]
  return cfg


def model_config(cfg: Any, tokenizer_vocab_size: int) -> MegalodonConfig:
  """The MegalodonConfig of `cfg.model`; vocab_size -1 takes the tokenizer's size.

  Raises:
    ConfigError: an invalid model field (named as `model.<field>`) or a vocab smaller than the tokenizer's.
  """
  fields = {f.name for f in dataclasses.fields(MegalodonConfig)}
  kwargs = {k: v for k, v in cfg.model.to_dict().items()}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ConfigError(f"--config.model has unknown field(s) {unknown}; known: {sorted(fields)}")
  if kwargs.get("vocab_size", -1) == -1:
    kwargs["vocab_size"] = tokenizer_vocab_size
  elif kwargs["vocab_size"] < tokenizer_vocab_size:
    _fail("model.vocab_size", kwargs["vocab_size"], f"is smaller than the tokenizer's vocabulary "
          f"({tokenizer_vocab_size}); use -1 to take the tokenizer's size")
  if kwargs.get("rope_base") is not None:
    kwargs["rope_base"] = float(kwargs["rope_base"])
  if isinstance(kwargs.get("norm_eps"), int):
    kwargs["norm_eps"] = float(kwargs["norm_eps"])
  try:
    return MegalodonConfig(**kwargs)
  except ConfigError as e:
    # "MegalodonConfig.z_dim=..." -> "--config.model.z_dim=..." so the message matches what the user typed.
    raise ConfigError(str(e).replace("MegalodonConfig.", "--config.model.")) from None


def _fixed_mesh_devices(mesh_cfg: Any) -> int:
  """The product of the mesh sizes other than -1 (1 for malformed sizes, which `mesh_shape` then reports)."""
  total = 1
  for axis in mesh_checks.MESH_AXES:
    size = getattr(mesh_cfg, axis, 1)
    if isinstance(size, int) and not isinstance(size, bool) and size >= 1:
      total *= size
  return total


def validate(cfg: Any, num_devices: Optional[int], *, check_inputs: bool = True) -> None:
  """Checks the whole training config without building anything expensive.

  Args:
    cfg: the ConfigDict.
    num_devices: jax.device_count() (all processes); None before jax's backends start (the command line validates
      first, so a typo is reported at once): the mesh is then checked as far as its fixed sizes allow.
    check_inputs: also check that the data and `init_from` exist (False when the run is only compiled).
  Raises:
    ConfigError: the first problem found, naming its key.
  """

  for key, minimum in (("seq_len", 1), ("batch_size", 1), ("grad_accum_steps", 1), ("total_steps", 1),
                       ("checkpoint_every", 1), ("checkpoint_keep", 1), ("log_every", 1), ("eval_every", 0),
                       ("eval_batches", 1), ("num_samples", 0), ("sample_len", 1), ("seed", 0),
                       ("optimizer.warmup_steps", 0), ("loss_piece", 0)):
    _int(cfg, key, minimum)
  if cfg.eval_every and cfg.eval_every % cfg.log_every:
    _fail("eval_every", cfg.eval_every, f"must be a multiple of log_every={cfg.log_every} (evaluations are logged "
          "with the step's training metrics), or 0 to disable evaluation")
  for key in ("tensorboard", "async_checkpointing", "stop_on_nan", "data.add_eos"):
    if not isinstance(_get(cfg, key), bool):
      _fail(key, _get(cfg, key), "must be True or False")
  if cfg.progress_bar not in PROGRESS_BAR:
    _fail("progress_bar", cfg.progress_bar, f"must be one of {PROGRESS_BAR}")
  if not isinstance(cfg.sample_temperature, (int, float)) or cfg.sample_temperature < 0:
    _fail("sample_temperature", cfg.sample_temperature, "must be a number >= 0 (0 = greedy)")

  chunk = cfg.model.chunk_size
  if isinstance(chunk, int) and chunk > 0 and cfg.seq_len > chunk and cfg.seq_len % chunk:
    _fail("seq_len", cfg.seq_len, f"must be <= model.chunk_size ({chunk}) or a multiple of it; the nearest valid "
          f"lengths are {cfg.seq_len // chunk * chunk} and {(cfg.seq_len // chunk + 1) * chunk}")

  o = cfg.optimizer
  try:
    optimizer_args.check_schedule_args(o.lr, cfg.total_steps, o.warmup_steps, o.scheduler, o.init_ratio, o.end_ratio,
                                       o.cycles)
    optimizer_args.check_adamw_args(b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, clip=o.clip or None,
                                    decay_mask=o.decay_mask, grad_accum_steps=1)
  except ValueError as e:
    # optimizer messages start with the argument name; map it to the config key.
    msg = str(e)
    names = {"peak_lr": "optimizer.lr", "total_steps": "total_steps", "warmup_steps": "optimizer.warmup_steps"}
    arg = msg.split(" ", 1)[0]
    key = names.get(arg, f"optimizer.{arg}")
    raise ConfigError(f"--config.{key}: {msg}") from None

  try:
    # Before the backends start the device count is unknown: check against the fixed sizes alone (a -1 axis counts
    # 1), whose conditions the real mesh must meet too; the trainer checks again with the real count.
    shape = mesh_checks.mesh_shape(cfg.mesh, _fixed_mesh_devices(cfg.mesh) if num_devices is None else num_devices)
    mesh_checks.check_rules(cfg.logical_axis_rules)
  except ShardingError as e:
    raise ConfigError(str(e)) from None
  sizes = dict(zip(mesh_checks.MESH_AXES, shape))
  try:
    mesh_checks.check_batch(cfg.batch_size, cfg.grad_accum_steps, sizes)
    if isinstance(chunk, int) and chunk > 0:
      mesh_checks.check_sequence(cfg.seq_len, chunk, sizes)
  except ShardingError as e:
    raise ConfigError(f"--config.batch_size={cfg.batch_size!r}: {e}" if "batch_size" in str(e).split(" ", 1)[0]
                      else f"--config.mesh.sequence={sizes['sequence']!r}: {e}") from None

  if check_inputs:
    validate_inputs(cfg)


def validate_inputs(cfg: Any) -> None:
  """Checks that `init_from` holds params and that the data exists (reads file metadata only).

  Raises:
    ConfigError: naming the key.
  """
  if cfg.init_from:
    from megalodon_jax.checkpoints import layout  # pylint: disable=import-outside-toplevel
    try:
      layout.params_item(paths.abspath(cfg.init_from))
    except CheckpointError as e:
      _fail("init_from", cfg.init_from, str(e))

  from megalodon_jax import data  # local: the data package pulls in tensorflow_datasets
  try:
    data.check_data_config(cfg.data)
  except data.DataError as e:
    raise ConfigError(str(e)) from None
