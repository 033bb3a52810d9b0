"""Entry-point plumbing shared by train.py, infer.py and the benchmarks: absl flags whose
user errors end in one line naming the problem and the fix, never a traceback.

  cli.run(main)        # instead of app.run(main)

User errors are `ValueError`s (the library raises them, `config.ConfigError` included, for
anything the caller can fix) and missing files; every other exception is a bug and keeps
its traceback.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from tokred_jax.core import distributed

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError)


def one_line(message) -> str:
  """A message folded onto one line (absl and ml_collections errors span several)."""
  return " ".join(part.strip() for part in str(message).strip().splitlines() if part.strip())


def fail(message) -> SystemExit:
  """SystemExit with `prog: message` on one line (raise it)."""
  return SystemExit(f"{os.path.basename(sys.argv[0])}: {one_line(message)}")


def _config_overrides(argv) -> list[str]:
  """The dotted field names of every --NAME.FIELD=VALUE override in argv."""
  return [m.group(1) for a in argv if (m := re.match(r"--?\w+\.([\w.]+)", a))]


def _unknown_field(error: Exception, argv) -> str:
  """What an ml_collections AttributeError/KeyError on an override means, in one line."""
  text = one_line(str(error).replace("\\n", "\n").replace("\\'", "'"))
  name = re.match(r"['\"]?([\w.]+)", text.strip("'\" "))
  name = name.group(1) if name else text
  given = [o for o in _config_overrides(argv) if name in o.split(".")]
  field = given[0] if given else name
  hint = re.search(r'Did you mean "([\w.]+)"', text)
  fix = (f'did you mean "{hint.group(1)}"?' if hint else
         "see the config file's get_config() for the fields there are")
  return f"the config has no field {field!r} (from --config.{field}=...): {fix}"


def define_config(name: str, default: str | None, help_string: str, **kwargs):
  """config_flags.DEFINE_config_file whose override errors are one line. With a default
  file, ml_collections applies the --NAME.FIELD overrides here, at import."""
  try:
    return config_flags.DEFINE_config_file(name, default, help_string, **kwargs)
  except (AttributeError, KeyError) as e:
    raise fail(_unknown_field(e, sys.argv)) from None
  except flags.Error as e:
    raise fail(e) from None


def _check_config_files():
  """ml_collections defers a config file's load error to its first use: surface it."""
  for flag in flags.FLAGS._flags().values():  # pylint: disable=protected-access
    if type(flag).__name__ == "_ConfigFlag":
      try:
        flag.value.get("_")
      except OSError as e:
        cause = str(e).strip().splitlines()[-1].strip()
        raise fail(f"--{flag.name}: cannot load the config file: {cause}") from None


def _config_file_error(error: flags.Error) -> str | None:
  """ml_collections puts the traceback of a get_config() that raised into its flag error:
  "flag --config=F:ARG: the exception's message", or None for other flag errors."""
  text = str(error)
  if "Traceback (most recent call last)" not in text:
    return None
  flag = text.split(": Error whilst parsing config file")[0]
  last = [l for l in text.strip().splitlines() if l.strip()][-1]
  return f"{flag}: {re.sub(r'^[A-Za-z_.]*(Error|Exception): ', '', last.strip())}"


def parse_flags(argv):
  """absl's flag parser (`app.run(..., flags_parser=parse_flags)`) with one-line errors."""
  try:
    rest = flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of no field
    raise fail(_unknown_field(e, argv)) from None
  except flags.Error as e:
    raise fail(f"{_config_file_error(e) or e} (see --helpshort)") from None
  except USER_ERRORS as e:  # a config file's get_config() refusing its argument
    raise fail(e) from None
  _check_config_files()
  return rest


def define_distributed_flags():
  """The flags that make this process one of a multi-process job (core/distributed.py);
  `run` joins the job before `main` starts."""
  flags.DEFINE_enum("distributed", "", ["", "auto"], distributed.HELP["distributed"])
  flags.DEFINE_string("coordinator_address", None, distributed.HELP["coordinator_address"])
  flags.DEFINE_integer("num_processes", None, distributed.HELP["num_processes"])
  flags.DEFINE_integer("process_id", None, distributed.HELP["process_id"])


def distributed_options() -> distributed.Options:
  f = flags.FLAGS
  return distributed.Options(f.coordinator_address, f.num_processes, f.process_id,
                             auto=f.distributed == "auto")


def run(main):
  """app.run(main) where user errors (see USER_ERRORS) print one line and exit 1; with
  `define_distributed_flags`, the process first joins its job."""
  def guarded(argv):
    try:
      if "num_processes" in flags.FLAGS:
        distributed.initialize(distributed_options())
      return main(argv)
    except USER_ERRORS as e:
      raise fail(e) from None
  app.run(guarded, flags_parser=parse_flags)
