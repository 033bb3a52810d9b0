"""Did-you-mean suggestions for the one-line errors that name a misspelt choice."""

from __future__ import annotations

import difflib


def closest(name: str, choices) -> str:
  """' (did you mean X?)' for the nearest of `choices`, or '' when none is near."""
  near = difflib.get_close_matches(name, list(choices), n=1)
  return f" (did you mean {near[0]!r}?)" if near else ""
