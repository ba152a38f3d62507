"""Checkpoint conversion between MegalodonLM and the official PyTorch state dict."""

from megalodon_jax.convert.official import (StateDictError, check_state_dict, from_official_state_dict,
                                            state_dict_entries, to_official_state_dict)

__all__ = ["StateDictError", "check_state_dict", "from_official_state_dict", "state_dict_entries",
           "to_official_state_dict", "ConvertError", "load_checkpoint", "locate_checkpoint", "save_params_checkpoint"]


def __getattr__(name):
  # Defined in megalodon_jax.checkpoints and offered here too. Lazy: they pull in orbax, which the state-dict
  # converter does not need.
  if name == "ConvertError":
    from megalodon_jax.errors import ConvertError  # pylint: disable=import-outside-toplevel
    return ConvertError
  if name == "locate_checkpoint":
    from megalodon_jax.checkpoints.locate import locate_checkpoint  # pylint: disable=import-outside-toplevel
    return locate_checkpoint
  if name in ("load_checkpoint", "save_params_checkpoint"):
    from megalodon_jax.checkpoints import model_io  # pylint: disable=import-outside-toplevel
    return getattr(model_io, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
