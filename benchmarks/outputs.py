"""The benchmarks' outputs: checked before the work, written together after it.

The JSON, PNG and BENCHMARKS.md blocks under this repository are shipped results; a run
that fails, is interrupted or is refused must leave them byte-identical. So every output
path is checked before any model work (`check_output`), and the files are written at the
end through `staged()`: each is rendered to a temporary file beside its target and only
when all of them are rendered are they renamed over the targets (a rename is atomic).

  with outputs.staged() as out:
    out.write_text(json_path, text)
    out.write_with(png_path, lambda tmp: fig.savefig(tmp))

`publish` is that end of a benchmark, printing what it wrote.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import stat
import tempfile
from typing import Callable, Iterator

PLOT_FORMATS = (".png", ".pdf", ".svg")


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage errors are one line, `prog: problem (see --help)`, not the usage
  text followed by the error."""

  def error(self, message: str):
    raise SystemExit(f"{self.prog}: {message} (see --help)")


def check_output(flag: str, path: str, formats: tuple[str, ...] | None = None):
  """ValueError unless `path` can be written (created or replaced by a rename): not a
  folder, in a folder that exists and is writable, with one of `formats`' suffixes."""
  where = f"{flag}={path}"
  if formats and os.path.splitext(path)[1].lower() not in formats:
    raise ValueError(f"{where}: name a {', '.join(formats)} file (the suffix picks the "
                     "format).")
  if os.path.isdir(path):
    raise ValueError(f"{where} is a folder; name the file to write.")
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise ValueError(f"{where}: the folder {folder} does not exist; create it or name "
                     "another path.")
  if not os.access(folder, os.W_OK | os.X_OK):
    raise ValueError(f"{where}: cannot write in {folder} (permission denied); name a "
                     "path in a writable folder.")


def markers(key: str) -> tuple[str, str]:
  return f"<!-- BEGIN {key} -->", f"<!-- END {key} -->"


def check_block(flag: str, path: str, key: str):
  """ValueError unless `path` (if it exists) is UTF-8 text whose block `key`, if there,
  has both of its markers in order: what `with_block` needs to replace only that block."""
  check_output(flag, path)
  if not os.path.exists(path):
    return
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"{flag}={path}: cannot read it as text ({e}); name another file "
                     "or '' to skip it.") from None
  begin, end = markers(key)
  if (begin in text) != (end in text) or (begin in text and
                                          text.index(begin) > text.index(end)):
    raise ValueError(f"{flag}={path}: the markers {begin} ... {end} are not a pair; "
                     "repair them by hand so that only the block between them is replaced.")


def with_block(text: str | None, key: str, body: str) -> str:
  """`text` (None: a new file) with the block between `key`'s markers replaced by `body`,
  or a section holding it appended; text around the block is kept."""
  begin, end = markers(key)
  block = f"{begin}\n{body}\n{end}"
  text = "# Benchmarks\n" if text is None else text
  if begin in text and end in text:
    head, rest = text.split(begin, 1)
    return head + block + rest.split(end, 1)[1]
  return text.rstrip("\n") + f"\n\n## {key}\n\n{block}\n"


def _read(path: str) -> str | None:
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return f.read()


class Staged:
  """Files rendered beside their targets, renamed over them by `commit`."""

  def __init__(self):
    self._files: list[tuple[str, str]] = []  # (temporary, target)

  def write_with(self, path: str, write: Callable[[str], None]):
    """Calls write(temporary_path) for a file that will replace `path`; the temporary
    path has `path`'s suffix (matplotlib picks the format from it)."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=os.path.splitext(name)[1])
    os.close(fd)
    self._files.append((tmp, path))
    write(tmp)

  def write_text(self, path: str, text: str):
    def write(tmp: str):
      with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    self.write_with(path, write)

  def write_block(self, path: str, key: str, body: str):
    """Replaces `key`'s block in the Markdown file `path` (see `with_block`)."""
    self.write_text(path, with_block(_read(path), key, body))

  def commit(self):
    mask = os.umask(0)
    os.umask(mask)
    for tmp, path in self._files:
      # mkstemp makes the file private; give it the target's mode, or a new file's.
      mode = (stat.S_IMODE(os.stat(path).st_mode) if os.path.exists(path)
              else 0o666 & ~mask)
      os.chmod(tmp, mode)
      os.replace(tmp, path)
    self._files = []

  def discard(self):
    for tmp, _ in self._files:
      with contextlib.suppress(OSError):
        os.remove(tmp)
    self._files = []


@contextlib.contextmanager
def staged() -> Iterator[Staged]:
  """Files staged in the block are committed when it ends, discarded if it raises
  (KeyboardInterrupt included): then no target is touched."""
  files = Staged()
  try:
    yield files
  except BaseException:
    files.discard()
    raise
  files.commit()


def write_block(path: str, key: str, body: str):
  """Replaces the text between `key`'s markers in `path` (or appends a section holding
  them), so that hand-written text around the block survives a rerun; atomically."""
  with staged() as out:
    out.write_block(path, key, body)


def publish(prog: str, body: str, *, json_path: str = "", json_text: str = "",
            plot_path: str = "", draw: Callable[[str], None] | None = None,
            markdown_path: str = "", block: str = ""):
  """A benchmark's end: writes the JSON text, the plot (draw(temporary_path)) and
  `body` into `block` of the Markdown file, each path skipped when empty, together
  through `staged()`; then prints `body` and what was written. A failed write is one
  line, `prog: cannot write the results (...)`, and leaves every file as it was."""
  try:
    with staged() as out:
      if json_path:
        out.write_text(json_path, json_text)
      if plot_path:
        out.write_with(plot_path, draw)
      if markdown_path:
        out.write_block(markdown_path, block, body)
  except OSError as e:  # a full disk, a file made read-only meanwhile
    raise SystemExit(f"{prog}: cannot write the results ({e}); the old files are as they "
                     "were.") from None
  print("\n" + body + "\n")
  for path in filter(None, (json_path, plot_path, markdown_path)):
    print(f"wrote {path}")
