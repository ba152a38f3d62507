"""The one exception of the data package."""

from __future__ import annotations


class DataError(ValueError):
  """A bad data setting or missing data; the message names the config key (e.g. `data.path`) and the fix."""
