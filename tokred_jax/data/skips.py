"""Bad training samples: what is wrong with one, and the tally of those left out.

Every check in the data path raises `BadSample` with the sample's id. The caller's
`on_bad_sample` setting decides what happens next: "error" stops with that exception,
"skip" leaves the sample out and records it in a `SkipLog`, which logs each skip as it
happens and sums them up ("skipped 3 of 100 samples: 1 missing image (id a), ...").
"""

from __future__ import annotations

import collections
import logging
from typing import Any

log = logging.getLogger(__name__)

ON_BAD_SAMPLE = ("skip", "error")

# Why a sample is left out; each is checked at one stage (see tokred_jax.data).
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
NO_IMAGE = "no image"
MALFORMED = "malformed conversation"
NO_ASSISTANT_TURN = "no assistant turn"
TOO_LONG = "too long"

# A summary names at most this many ids per reason; the build metadata keeps them all.
_IDS_SHOWN = 5


class BadSample(ValueError):
  """A sample that cannot be trained on, with its id and the reason."""

  def __init__(self, sample_id: str, reason: str, detail: str):
    # Kept as args too, so that the exception pickles across grain's worker processes.
    super().__init__(sample_id, reason, detail)
    self.sample_id = sample_id
    self.reason = reason
    self.detail = detail

  def __str__(self) -> str:
    return f"sample {self.sample_id!r}: {self.reason}: {self.detail}"


def check_mode(on_bad_sample: str) -> None:
  if on_bad_sample not in ON_BAD_SAMPLE:
    raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got "
                     f"{on_bad_sample!r}.")


class SkipLog:
  """Counts the samples seen at one stage and keeps those left out.

  Attributes:
    stage: what is being done, for messages (e.g. "building split 'train'").
    on_bad_sample: "skip" or "error".
    seen: samples looked at, good and bad.
    skipped: the bad ones, in the order seen.
  """

  def __init__(self, stage: str, on_bad_sample: str):
    check_mode(on_bad_sample)
    self.stage = stage
    self.on_bad_sample = on_bad_sample
    self.seen = 0
    self.skipped: list[BadSample] = []

  def record(self, bad: BadSample | None) -> bool:
    """Counts one sample; returns whether to keep it. Raises `bad` in "error" mode."""
    self.seen += 1
    if bad is None:
      return True
    if self.on_bad_sample == "error":
      raise BadSample(bad.sample_id, bad.reason,
                      f"{bad.detail} ({self.stage}; on_bad_sample='skip' leaves such "
                      "samples out)")
    self.skipped.append(bad)
    log.warning("%s: skipping %s (%d of %d samples skipped so far)", self.stage, bad,
                len(self.skipped), self.seen)
    return False

  def summary(self) -> str:
    """E.g. "building split 'train': skipped 2 of 9 samples: 2 too long (ids a, b)"."""
    if not self.skipped:
      return f"{self.stage}: skipped 0 of {self.seen} samples"
    by_reason = collections.defaultdict(list)
    for bad in self.skipped:
      by_reason[bad.reason].append(bad.sample_id)
    parts = []
    for reason, ids in by_reason.items():
      shown = ", ".join(ids[:_IDS_SHOWN]) + (", ..." if len(ids) > _IDS_SHOWN else "")
      parts.append(f"{len(ids)} {reason} (id{'s' if len(ids) > 1 else ''} {shown})")
    return (f"{self.stage}: skipped {len(self.skipped)} of {self.seen} samples: "
            + ", ".join(parts))

  def log_summary(self) -> None:
    """Logs `summary()`, as a warning when samples were left out."""
    log.log(logging.WARNING if self.skipped else logging.INFO, "%s", self.summary())

  def as_dict(self) -> dict[str, Any]:
    """JSON-ready record of the stage, for the data set's metadata."""
    return dict(seen=self.seen, skipped=[
        dict(id=bad.sample_id, reason=bad.reason, detail=bad.detail)
        for bad in self.skipped])
