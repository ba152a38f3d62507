"""Checkpoint conversion between MegalodonLM and the official PyTorch state dict."""

__all__ = ["StateDictError", "check_state_dict", "from_official_state_dict", "state_dict_entries",
           "to_official_state_dict", "ConvertError", "load_checkpoint", "locate_checkpoint", "save_params_checkpoint"]

_OFFICIAL = ("StateDictError", "check_state_dict", "from_official_state_dict", "state_dict_entries",
             "to_official_state_dict")


def __getattr__(name):
  # Lazy (PEP 562): the converter pulls in jax, flax and the model, and the command line (cli/convert.py, run
  # through this package) checks its flags and paths before any of them is imported. The checkpoint names are
  # defined in megalodon_jax.checkpoints and offered here too (they pull in orbax).
  if name in _OFFICIAL:
    from megalodon_jax.convert import official  # pylint: disable=import-outside-toplevel
    return getattr(official, name)
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
