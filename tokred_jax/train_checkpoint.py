"""Orbax checkpointing for `trainer`: the manager, restore, and the data-position handler.

The data iterator's position (`get_state()`, JSON) is saved in the same Orbax step as
the train state, one file per host (hosts reading different shards can stand at
different positions, e.g. after skipping different bad samples), so a resumed run
draws exactly the batches it would have drawn.

  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=IteratorStateSave(data_state)))
  state, data_state = restore(manager, step, abstract_state, shardings)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, TypeVar

import jax
import ml_collections
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


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: State,
            shardings: State) -> tuple[State, Any]:
  """(the TrainState of `step`, placed by `shardings`; the saved data-iterator state)."""
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract_state, shardings)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target), data=IteratorStateRestore()))
  return restored.state, restored.data
