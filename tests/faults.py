"""The table of bad inputs and faults the tests check (docs/FAULTS.md).

A test that feeds a bad input or plants a fault asserts the behaviour first, then calls
`record(...)` with what it saw. `record` itself asserts the message is one clean line
(no traceback). The table is regenerated from a full run:

  python -m pytest -q --fault-table=docs/FAULTS.md
"""

from __future__ import annotations

import dataclasses
import os
import re

ROWS: list["Fault"] = []
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


@dataclasses.dataclass(frozen=True)
class Fault:
  where: str     # entry point or API: "infer.py", "train.py", "Pipeline.generate", ...
  case: str      # the input or fault, as a user would write it
  message: str   # the one line the user got
  before: str    # the expensive work it was caught before ("weights load", "compile", ...)
  intact: str    # the state verified untouched ("-": no state at stake)
  test: str      # the test that checks it


def record(where: str, case: str, message: str, *, before: str, intact: str = "-"):
  """Adds one row; `message` is what the user saw (an exception's text or stderr)."""
  test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
  lines = [l for l in str(message).strip().splitlines() if l.strip()]
  assert lines, f"{where}: {case!r} gave no message"
  assert not any("Traceback" in l for l in lines), f"{where}: {case!r} printed a traceback"
  assert len(lines) == 1, f"{where}: {case!r} gave {len(lines)} lines, not one: {lines}"
  # Paths differ from run to run: pytest's temporary folders (under pytest-xdist, in a
  # folder per worker) show as <tmp>, the checkout's files relative to it.
  tmp = lambda text: re.sub(r"/tmp/pytest-of-[^/\s]+/pytest-\d+/(?:popen-gw\d+/)?[^/\s'\"]+",
                            "<tmp>", text).replace(ROOT, "")
  ROWS.append(Fault(where, tmp(case), tmp(lines[0]), before, intact, test))


def _cell(s: str) -> str:
  return s.replace("|", "\\|").replace("\n", " ")


def write_table(path: str):
  rows = sorted(set(ROWS), key=lambda r: (r.where, r.case, r.test, r.message))
  out = ["# Bad inputs and faults",
         "",
         "Every row is checked by a test (last column). *Caught before* is the expensive "
         "work that had not started when the message came; *intact* is the state the test "
         "verified unchanged. Regenerate with "
         "`python -m pytest -q --fault-table=docs/FAULTS.md`.",
         "",
         f"{len(rows)} cases.",
         "",
         "| where | input or fault | message | caught before | intact | test |",
         "|---|---|---|---|---|---|"]
  out += [f"| {_cell(r.where)} | `{_cell(r.case)}` | {_cell(r.message)} | {_cell(r.before)} "
          f"| {_cell(r.intact)} | {_cell(r.test)} |" for r in rows]
  with open(path, "w") as f:
    f.write("\n".join(out) + "\n")
