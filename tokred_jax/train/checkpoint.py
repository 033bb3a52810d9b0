"""Orbax checkpointing for `trainer`: save, verified restore, the workdir lock, and
checkpoints on SIGTERM/SIGINT.

The data iterator's position (`get_state()`, JSON) is saved in the same Orbax step as
the train state, one file per host (hosts reading different shards can stand at
different positions, e.g. after skipping different bad samples), so a resumed run
draws exactly the batches it would have drawn. Each step also holds a digest of the
state (`digest`): a position-weighted checksum of every leaf's bits, which `restore`
recomputes, so damaged chunks are refused instead of resumed from.

  with workdir_lock(workdir), StopSignals() as signals:
    save(manager, step, state, data_state)
    state, data_state = restore(manager, step, abstract_state, shardings)
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import threading
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

State = TypeVar("State")


class IteratorStateHandler(ocp.CheckpointHandler):
  """Orbax handler for data-iterator positions: each host writes and reads its own
  iterator's `get_state()` as JSON (process_I-of-N.json)."""

  @staticmethod
  def _file(directory):
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

  def save(self, directory, args: IteratorStateSave):
    self._file(directory).write_text(json.dumps(args.state))

  def restore(self, directory, args: IteratorStateRestore | None = None) -> Any:
    del args
    if not self._file(directory).exists():
      raise ValueError(f"{directory} holds no data position for this host "
                       f"({self._file(directory).name}); resume with as many hosts as "
                       "the run that saved it.")
    return json.loads(self._file(directory).read_text())


@ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class IteratorStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class IteratorStateRestore(ocp.args.CheckpointArgs):
  pass


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict
                       ) -> ocp.CheckpointManager:
  """Async saves every `checkpoint_every` steps into WORKDIR/checkpoints, the last
  `keep_checkpoints` kept. Orbax writes each step to a temporary directory and renames
  it when complete, and lists only complete ones, so resume never sees a partial one."""
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(
          save_interval_steps=config.checkpoint_every, max_to_keep=config.keep_checkpoints,
          enable_async_checkpointing=True, cleanup_tmp_directories=True))


class NonFiniteState(ValueError):
  """A state to be saved holds NaN or infinite values."""


class Stopped(Exception):
  """The run stopped before `num_steps`, on purpose; str(e) is one line for the user and
  `exit_code` the process's exit status."""
  exit_code = 1


class Diverged(Stopped):
  """A step's loss or gradient was NaN or infinite; nothing from that step on was saved."""


class Interrupted(Stopped):
  """A SIGTERM/SIGINT arrived; the step it arrived in was saved."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + signum  # as if the signal had ended the process


def _leaf_digest(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(u32[] checksum, bool[] all finite) of one array. The checksum is the sum of each
  element's bits times (its flat index * an odd constant + 1), mod 2**32: integer sums
  do not depend on the order of the reduction, so any sharding gives the same value,
  and the weights make moved values count too."""
  width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  bits = (jax.lax.bitcast_convert_type(x, width) if x.dtype != jnp.bool_ else x
          ).astype(jnp.uint32)
  weights = jax.lax.iota(jnp.uint32, x.size).reshape(x.shape) * jnp.uint32(2654435761) + 1
  finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else True
  return jnp.sum(bits * weights, dtype=jnp.uint32), jnp.asarray(finite)


_digest = jax.jit(lambda leaves: [_leaf_digest(x) for x in leaves])


def digest(state) -> dict[str, tuple[int, bool]]:
  """{leaf path: (checksum, all finite)} of a pytree of arrays (e.g. a TrainState)."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  results = jax.device_get(_digest([x for _, x in leaves]))
  return {jax.tree_util.keystr(path, simple=True, separator="/"): (int(c), bool(f))
          for (path, _), (c, f) in zip(leaves, results)}


def non_finite(leaf_digests: dict[str, tuple[int, bool]]) -> list[str]:
  """The paths of the leaves with NaN or infinite values."""
  return [path for path, (_, finite) in leaf_digests.items() if not finite]


def save(manager: ocp.CheckpointManager, step: int, state, data_state) -> None:
  """Saves `state` (async: returns once it is copied off the devices), the data position
  and the state's digest as step `step`. Non-finite state is never saved:
  NonFiniteState naming the leaves."""
  leaf_digests = digest(state)
  if bad := non_finite(leaf_digests):
    raise NonFiniteState(f"step {step}: the state holds NaN or infinite values "
                         f"({bad[:3]}), so it was not saved.")
  manager.save(step, force=True, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=IteratorStateSave(data_state),
      digest=ocp.args.JsonSave({k: c for k, (c, _) in leaf_digests.items()})))


def diverged(manager: ocp.CheckpointManager, problem: str) -> Diverged:
  """`problem`, then which checkpoint is left to resume from."""
  manager.wait_until_finished()  # the saves in flight are of good steps
  last = manager.latest_step()
  kept = (f"{manager.directory} keeps step {last}, the last good one" if last is not None
          else "no checkpoint was saved")
  return Diverged(f"{problem} Training stopped: {kept}; lower optim.learning_rate or "
                  "check the data, then rerun to resume.")


def check_finite(steps: list[tuple[int, dict[str, jax.Array]]],
                 manager: ocp.CheckpointManager) -> None:
  """Diverged at the first of `steps` whose loss or gradient norm is not finite."""
  for step, metrics in jax.device_get(steps):
    for name in ("loss", "grad_norm"):
      if not np.isfinite(metrics[name]):
        raise diverged(manager, f"step {step}: the {name} is {metrics[name]}, so no state "
                        "from this step on was saved.")


def _damaged(manager: ocp.CheckpointManager, step: int, problem: str,
             unreadable: bool = False) -> ValueError:
  earlier = [s for s in manager.all_steps() if s < step]
  fix = (f"delete that directory to resume from step {max(earlier)}" if earlier else
         "delete that directory to start again from the model checkpoint")
  if unreadable:  # maybe not damaged at all: saved under another config
    fix = ("if the config changed since it was saved (model, freeze pattern, optimizer), "
           f"rerun with the one that saved it; if not, it is damaged: {fix}")
  return ValueError(f"checkpoint {manager.directory / str(step)} {problem}; {fix}, or "
                    "use another --workdir.")


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: State,
            shardings: State) -> tuple[State, Any]:
  """(the TrainState of `step`, placed by `shardings`; the saved data-iterator state).

  Verified: ValueError (naming the fix) if the step cannot be read as this state, if
  its digest differs from the one saved with it, or if it holds non-finite values.
  """
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract_state, shardings)
  items = dict(state=ocp.args.StandardRestore(target), data=IteratorStateRestore())
  # Checkpoints saved before digests existed have none: they are only checked finite.
  has_digest = (manager.directory / str(step) / "digest").is_dir()
  if has_digest:
    items["digest"] = ocp.args.JsonRestore()
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except ValueError as e:
    if "data position" in str(e):  # IteratorStateHandler's own message
      raise
    raise _damaged(manager, step, f"cannot be read as this config's train state "
                   f"({_first_line(e)})", unreadable=True) from None
  except Exception as e:  # pylint: disable=broad-except
    # Tensorstore and Orbax report unreadable chunks with many kinds of exceptions.
    raise _damaged(manager, step, f"cannot be read ({type(e).__name__}: "
                   f"{_first_line(e)})", unreadable=True) from None
  leaf_digests = digest(restored.state)
  if has_digest:
    changed = [k for k, (c, _) in leaf_digests.items() if restored.digest.get(k) != c]
    if changed:
      raise _damaged(manager, step, f"is damaged: {changed[:3]} differ from the checksums "
                     "saved with them")
  if bad := non_finite(leaf_digests):
    raise _damaged(manager, step, f"holds NaN or infinite values ({bad[:3]})")
  return restored.state, restored.data


def _first_line(error: Exception) -> str:
  lines = [l.strip() for l in str(error).strip().splitlines() if l.strip()]
  return lines[0][:200] if lines else type(error).__name__


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds an exclusive lock on WORKDIR/.lock while the block runs (the OS releases it
  when the process dies, so a killed run leaves no stale lock); ValueError at once if
  another process holds it. Only process 0 locks: every host of a run shares WORKDIR."""
  if jax.process_index() != 0:
    yield
    return
  path = os.path.join(workdir, ".lock")
  with open(path, "a+", encoding="utf-8") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      owner = f.read().strip() or "?"
      raise ValueError(f"{workdir} is in use by another run (pid {owner}, holding "
                       f"{path}); wait for it to end or choose another --workdir.") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


class StopSignals:
  """While entered, the first SIGTERM or SIGINT is recorded in `received` (its number)
  instead of ending the process, so the loop can save and stop; the handlers then revert,
  and a second signal acts at once. Nothing is installed outside the main thread (Python
  cannot take signals there) or on several hosts: there each host's signal comes at its
  own step while saving is collective, so the trainer asks JAX's preemption sync point
  (`CheckpointManager.reached_preemption`), which picks one step for all."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    self.received = signum
    self._restore()

  def _restore(self):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def __enter__(self) -> StopSignals:
    if (threading.current_thread() is threading.main_thread()
        and jax.process_count() == 1):
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def __exit__(self, *exc):
    self._restore()
