"""Up-front checks of a training run: its config, workdir, data and layout.

`trainer.train` and `trainer.export` call these before anything loads or compiles, so a
bad input ends in one ValueError naming the field and the fix, never in a crash (or a
silent misconfiguration) minutes later:

  check_config(config, dtypes)            # every field of configs/train_tiny.py
  check_workdir(workdir, create=True)
  check_data(config)                      # the TFDS directory holds the data set
  check_layout(config, mesh, param_paths) # freeze pattern, batch over the mesh
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from collections.abc import Callable, Iterable

import jax
import ml_collections
from jax.sharding import Mesh

from tokred_jax.core import sharding
from tokred_jax.core.suggest import closest
from tokred_jax.data import generated, skips

Check = tuple[str, Callable[[object], bool], str]


def _int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
  return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


_POSITIVE_INT = (lambda v: _int(v) and v > 0, "a positive integer")
# (dotted field, predicate, what it must be): one per field of train_tiny's config.
FIELDS: tuple[Check, ...] = (
    ("num_steps", *_POSITIVE_INT),
    ("seed", lambda v: _int(v) and 0 <= v < 2**32, "an integer in [0, 2**32)"),
    ("log_every", *_POSITIVE_INT),
    ("checkpoint_every", *_POSITIVE_INT),
    ("keep_checkpoints", lambda v: v is None or (_int(v) and v > 0),
     "a positive integer (or None: keep every checkpoint)"),
    ("data.batch_size", *_POSITIVE_INT),
    ("data.max_length", *_POSITIVE_INT),
    ("data.num_epochs", lambda v: v is None or (_int(v) and v > 0),
     "a positive integer (or None: repeat forever)"),
    ("data.worker_count", lambda v: _int(v) and v >= 0, "an integer >= 0"),
    ("data.num_frames", *_POSITIVE_INT),
    ("optim.learning_rate", lambda v: _number(v) and v > 0, "a positive number, e.g. 1e-4"),
    ("optim.end_learning_rate", lambda v: _number(v) and v >= 0, "a number >= 0"),
    ("optim.warmup_fraction", lambda v: _number(v) and 0 <= v <= 1,
     "the fraction of num_steps spent warming up, in [0, 1]"),
    ("optim.b1", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("optim.b2", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("optim.eps", lambda v: _number(v) and v > 0, "a positive number, e.g. 1e-8"),
    ("optim.weight_decay", lambda v: _number(v) and v >= 0, "a number >= 0"),
    ("optim.clip_norm", lambda v: _number(v) and v > 0, "a positive number, e.g. 1.0"),
    ("optim.accum_steps", *_POSITIVE_INT),
)


def _field(config: ml_collections.ConfigDict, dotted: str):
  node = config
  for key in dotted.split("."):
    if key not in node:
      raise ValueError(f"the config has no field {dotted!r}; start from a get_config() in "
                       "configs/train_*.py, which sets every field.")
    node = node[key]
  return node


def _refuse(dotted: str, value, must: str) -> ValueError:
  return ValueError(f"config.{dotted}={value!r}: must be {must}; set "
                    f"--config.{dotted}=...")


def check_config(config: ml_collections.ConfigDict, dtypes: Iterable[str]) -> None:
  """Every field's type and range, and the relations between them."""
  for dotted, ok, must in FIELDS:
    value = _field(config, dotted)
    if not ok(value):
      raise _refuse(dotted, value, must)
  optim = config.optim
  if optim.end_learning_rate > optim.learning_rate:
    raise _refuse("optim.end_learning_rate", optim.end_learning_rate,
                  f"at most optim.learning_rate ({optim.learning_rate}): the schedule decays")
  if config.data.batch_size % optim.accum_steps:
    raise _refuse("optim.accum_steps", optim.accum_steps,
                  f"a divisor of data.batch_size ({config.data.batch_size})")
  if jax.process_count() > 1 and _field(config, "data.num_epochs") is not None:
    # Hosts' shards of a finite stream differ in length (and in skipped samples): one
    # would run out of batches while the others wait for it in a collective.
    raise ValueError(f"config.data.num_epochs={config.data.num_epochs}: a job of several "
                     "hosts needs it unset (the data repeats forever and every host runs "
                     "num_steps steps); drop it and set --config.num_steps for the run's "
                     "length.")
  dtypes = tuple(dtypes)
  if _field(config, "model.dtype") not in dtypes:
    raise _refuse("model.dtype", config.model.dtype, f"one of {dtypes}")
  try:
    re.compile(_field(config, "optim.freeze"))
  except re.error as e:
    raise _refuse("optim.freeze", optim.freeze, f"a regular expression ({e})") from None
  try:
    sharding.parse_mesh(_field(config, "mesh"))
  except ValueError as e:
    raise ValueError(f"config.mesh: {e}") from None
  try:
    skips.check_mode(_field(config, "data.on_bad_sample"))
  except ValueError as e:
    raise ValueError(f"config.data.{e}") from None
  export_dir = _field(config, "export_dir")
  if export_dir:
    check_export_dir(export_dir)


def check_export_dir(path: str) -> None:
  """`path` can take an export: missing, empty or a checkpoint directory (the rule
  checkpoint.save_checkpoint applies, here before the run rather than after it)."""
  if os.path.exists(path) and not (os.path.isdir(path) and (
      os.path.isfile(os.path.join(path, "config.json")) or not os.listdir(path))):
    raise ValueError(f"the export directory {path} exists and is not a checkpoint "
                     "directory; set --config.export_dir to a new or empty directory.")


def check_workdir(workdir: str, *, create: bool) -> None:
  """A directory to write to (created if missing and `create`)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir {workdir} is a file, not a directory; choose a "
                     "directory (it is created if missing).")
  if not create and not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise ValueError(f"no checkpoints in --workdir {workdir} ({workdir}/checkpoints does "
                     "not exist); train first (the same command without --export_only) "
                     "or give the workdir of a run.")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ValueError(f"cannot create --workdir {workdir}: {e.strerror}; choose a "
                     "directory you can write to.") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise ValueError(f"cannot write to --workdir {workdir}; choose a directory you can "
                     "write to.")


def _prepared(data_dir: str) -> list[str]:
  """The data sets built in a TFDS directory: NAME or NAME/CONFIG."""
  found = set()
  for depth, parts in ((3, 1), (4, 2)):
    for info in glob.glob(os.path.join(data_dir, *["*"] * (depth - 1), "dataset_info.json")):
      found.add("/".join(os.path.relpath(info, data_dir).split(os.sep)[:parts]))
  return sorted(found)


def check_data(config: ml_collections.ConfigDict) -> None:
  """`config.data` names a data set that is there to read (TFDS would otherwise try to
  download or generate it into `data_dir`)."""
  name, data_dir = config.data.dataset, config.data.data_dir
  if name == "synthetic":
    return
  if not name:
    raise ValueError("no training data: set config.data.dataset (a TFDS name from "
                     "tokred_jax.data.build_dataset) and config.data.data_dir, or "
                     "dataset='synthetic'.")
  if data_dir is None:
    if generated.is_generated(name):
      return  # generated on the fly
    raise ValueError(f"config.data.data_dir is not set: give the TFDS directory that "
                     f"tokred_jax.data.build_dataset wrote {name!r} into.")
  if not os.path.isdir(data_dir):
    raise ValueError(f"config.data.data_dir={data_dir!r} is not a directory; give the "
                     "TFDS directory the data set was built in.")
  base, _, version = name.partition(":")
  infos = sorted(glob.glob(os.path.join(data_dir, *base.split("/"), version or "*",
                                        "dataset_info.json")))
  if not infos:
    found = _prepared(data_dir)
    raise ValueError(f"no data set {name!r} in {data_dir}{closest(base, found)} (it holds "
                     f"{', '.join(found) or 'none'}); fix config.data.dataset or data_dir, "
                     "or build it with tokred_jax.data.build_dataset (glyph_vqa: python "
                     "-m tokred_jax.data.glyph_vqa).")
  with open(infos[-1], encoding="utf-8") as f:
    splits = [s["name"] for s in json.load(f).get("splits", [])]
  split = config.data.get("split", "train")
  if splits and split not in splits:
    raise ValueError(f"data set {name!r} in {data_dir} has no split {split!r}"
                     f"{closest(split, splits)}; it has {', '.join(splits)} (set "
                     "config.data.split).")


def batch_devices(mesh: Mesh, rules: sharding.Rules = sharding.DEFAULT_RULES) -> int:
  """How many ways a batch is split: the product of the mesh axes "batch" maps to."""
  axes = sharding.batch_sharding(mesh, 2, rules).spec[0] or ()
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def check_layout(config: ml_collections.ConfigDict, mesh: Mesh, param_paths: list[str],
                 num_hosts: int = 1) -> None:
  """The freeze pattern leaves something to train and matches something; the global
  batch splits into accum_steps micro-batches over the mesh's batch axes."""
  freeze = config.optim.freeze
  frozen = [p for p in param_paths if freeze and re.search(freeze, p)]
  if freeze and not frozen:
    raise _refuse("optim.freeze", freeze, "a pattern that matches some parameter path "
                  f"(they look like {param_paths[0]!r}), or '' to freeze nothing")
  if len(frozen) == len(param_paths):
    raise _refuse("optim.freeze", freeze, "a pattern that leaves some parameter to train "
                  "(it matches them all)")
  batch, accum = config.data.batch_size * num_hosts, config.optim.accum_steps
  split = accum * batch_devices(mesh)
  if batch % split:
    raise _refuse("data.batch_size", config.data.batch_size,
                  f"such that the global batch ({batch}) splits into {accum} micro-"
                  f"batch(es) over the {batch_devices(mesh)} devices of the mesh's batch "
                  f"axes ({dict(mesh.shape)}): a multiple of {split // math.gcd(split, num_hosts)}"
                  " per host")
