"""Checkpoint conversion between MegalodonLM and the official PyTorch state dict."""

from megalodon_jax.convert.official import (StateDictError, check_state_dict, from_official_state_dict,
                                            state_dict_entries, to_official_state_dict)

__all__ = ["StateDictError", "check_state_dict", "from_official_state_dict", "state_dict_entries",
           "to_official_state_dict"]
