"""Model families: the one interface through which training, the planner, generation, evaluation and checkpoints
reach a model, and the registry that `--config.family` names.

A family is a config class, a module class and its FLOP counts. The config class (a frozen dataclass with
`vocab_size`, `chunk_size` (the block length sequences split into and prefill pieces align to; 1 for a model
without chunks), `num_params()` and `official_kwargs()`, what a checkpoint records as its model) and its training
section (the same fields, `vocab_size=-1` meaning "the tokenizer's", `with_vocab(n)` giving the config) are the
schema of the training config's `model` section (`typed_config`). The module class is an `nnx.Module` built as `module(config, rngs=...)` that provides the
`LanguageModel` methods. Adding a family (e.g. a Llama baseline) is one `register(...)` call; the trainer loop does
not change.

Nothing here imports jax: the command line validates a config's model section before jax starts, and the module
class is imported only when a model is built.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Optional, Protocol

from megalodon_jax.errors import ConfigError, did_you_mean


class LanguageModel(Protocol):
  """What the train step, the samplers and the planner call on a model (shapes: B batch, L length, D width,
  V vocabulary; int32 ids)."""

  config: Any

  def features(self, input_ids, *, positions=None):
    """(B, L) ids -> (B, L, D) final hidden states; `positions` (B, L) restart documents where they are 0."""

  def head(self, features):
    """(B, T, D) -> (B, T, V) float32 logits (the loss applies it a piece at a time)."""

  def init_cache(self, batch_size: int, max_length: Optional[int] = None):
    """The empty streaming state for `batch_size` sequences (a pytree) that will hold up to `max_length` tokens
    (a constant-size cache ignores it; a KV cache needs it)."""

  def __call__(self, input_ids, cache=None, *, last_only=False):
    """(B, L) ids -> (B, L, V) logits, and with a cache the cache after them: (logits, cache); with a cache and
    `last_only`, the logits of the last position only, (B, 1, V). `last_only` is optional: the generator's prefill
    uses it where `__call__` has it (it spares the (B, L, V) logits), else slices the full logits."""


@dataclasses.dataclass(frozen=True)
class ModelFamily:
  """A registered family. `section`, `module` and `flops` are import paths ("package.module:Name" for classes),
  imported on first use."""

  name: str
  section: str  # the training config's `model` section; `with_vocab(n)` gives the model's config
  module: str  # the nnx.Module class, built as module(config, rngs=rngs)
  flops: str  # a module with train_step_flops(config, batch, seq_len, *, causal_attention) and forward_flops(...)
  # The model's config class (what `section.with_vocab(n)` returns; its `from_checkpoint(model, execution)` and
  # `execution_fields()` read checkpoints); "" = the section class itself.
  config: str = ""

  def section_class(self) -> type:
    return _load(self.section)

  def config_class(self) -> type:
    return _load(self.config or self.section)

  def flops_module(self) -> Any:
    return importlib.import_module(self.flops)

  def module_class(self) -> type:
    return _load(self.module)

  def build(self, config: Any, rngs: Any) -> LanguageModel:
    """The model of `config` (vocab_size set), parameters drawn from `rngs` (an `nnx.Rngs`)."""
    return self.module_class()(config, rngs=rngs)


def _load(path: str) -> Any:
  module, _, name = path.partition(":")
  return getattr(importlib.import_module(module), name)


FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
  """Adds `family` under its name (a second registration of a name is an error)."""
  if family.name in FAMILIES:
    raise ValueError(f"model family {family.name!r} is already registered")
  FAMILIES[family.name] = family
  return family


def of_config(config: Any) -> ModelFamily:
  """The registered family whose model config `config` is (ValueError for none)."""
  for family in FAMILIES.values():
    if isinstance(config, family.config_class()):
      return family
  raise ValueError(f"{type(config).__name__} is the config of no registered model family")


def get(name: str, key: Optional[str] = "family") -> ModelFamily:
  """The family called `name`; ConfigError for an unknown one, naming `--config.<key>` unless key is None (a
  checkpoint's family)."""
  if name not in FAMILIES:
    where = f"--config.{key}={name!r}: unknown" if key else "unknown"
    raise ConfigError(f"{where} model family{'' if key else f' {name!r}'}{did_you_mean(name, FAMILIES)}; "
                      f"registered: {', '.join(FAMILIES)}")
  return FAMILIES[name]


MEGALODON = register(ModelFamily("megalodon", section="megalodon_jax.config:MegalodonSection",
                                 module="megalodon_jax.model:MegalodonLM", flops="megalodon_jax.flops",
                                 config="megalodon_jax.config:MegalodonConfig"))
# The Llama-style baseline (megalodon_jax/llama/): the same trainer, data, sharding, checkpoints and planner.
LLAMA = register(ModelFamily("llama", section="megalodon_jax.llama.config:LlamaSection",
                             module="megalodon_jax.llama.model:LlamaLM", flops="megalodon_jax.llama.flops",
                             config="megalodon_jax.llama.config:LlamaConfig"))
