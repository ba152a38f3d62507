"""Checkpoint conversion between MegalodonLM and the official PyTorch state dict."""

from megalodon_jax.convert.official import (StateDictError, check_state_dict, from_official_state_dict,
                                            state_dict_entries, to_official_state_dict)

__all__ = ["StateDictError", "check_state_dict", "from_official_state_dict", "state_dict_entries",
           "to_official_state_dict", "ConvertError", "load_checkpoint", "locate_checkpoint", "save_params_checkpoint"]


def __getattr__(name):
  # Lazy: checkpoint_io pulls in orbax and the training package, which the state-dict converter does not need.
  if name in ("ConvertError", "load_checkpoint", "locate_checkpoint", "save_params_checkpoint"):
    from megalodon_jax.convert import checkpoint_io  # pylint: disable=import-outside-toplevel
    return getattr(checkpoint_io, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
