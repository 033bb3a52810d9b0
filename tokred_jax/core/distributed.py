"""One job over several processes: JAX's multi-controller runtime (`jax.distributed`).

Every host of a TPU pod slice (or every GPU host) runs the same command; each process
sees all devices of the job in `jax.devices()`, feeds its own share of every batch, and
joins every compiled program in the same order.

  distributed.initialize(Options(auto=True))           # TPU pod, Slurm, Open MPI: detected
  distributed.initialize(Options("10.0.0.2:8476", 2, 0))  # elsewhere: say it
  distributed.initialize(Options())                    # one process: nothing to do

train.py, infer.py and benchmarks/evaluate.py take the options as flags
(`--distributed=auto`, or `--coordinator_address=HOST:PORT --num_processes=N
--process_id=I`); `python -m tokred_jax.core.localhost` runs such a job as several
processes on this machine (the tests do).
"""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

HELP = {
    "distributed": "'auto': join a multi-process job whose layout JAX detects (Cloud TPU "
                   "pod slices, Slurm, Open MPI); '' (default) unless the flags below "
                   "are given: one process.",
    "coordinator_address": "HOST:PORT of process 0's coordinator, the same on every "
                           "process of the job.",
    "num_processes": "the number of processes in the job.",
    "process_id": "this process's index, 0 .. num_processes - 1.",
}


@dataclasses.dataclass(frozen=True)
class Options:
  """How this process joins a job; the default is a job of one process."""
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  auto: bool = False
  timeout_s: int = 300  # waiting for the other processes to join

  @property
  def explicit(self) -> bool:
    return any(v is not None for v in (self.coordinator_address, self.num_processes,
                                       self.process_id))

  def check(self) -> None:
    """ValueError naming the flag to fix; before any JAX work."""
    if self.auto and self.explicit:
      raise ValueError("--distributed=auto detects the coordinator, process count and id; "
                       "drop --coordinator_address/--num_processes/--process_id or "
                       "--distributed=auto.")
    if not self.explicit:
      return
    missing = [name for name, v in (("coordinator_address", self.coordinator_address),
                                    ("num_processes", self.num_processes),
                                    ("process_id", self.process_id)) if v is None]
    if missing:
      raise ValueError(f"a multi-process job needs --{', --'.join(missing)} too (every "
                       "process gives the same --coordinator_address and --num_processes, "
                       "and its own --process_id); or --distributed=auto on a TPU pod.")
    if not re.fullmatch(r"\[?[\w.:-]+\]?:\d{1,5}", self.coordinator_address):
      raise ValueError(f"--coordinator_address={self.coordinator_address!r}: give it as "
                       "HOST:PORT, e.g. 10.0.0.2:8476 (process 0's address).")
    if self.num_processes < 1:
      raise ValueError(f"--num_processes={self.num_processes}: must be at least 1.")
    if not 0 <= self.process_id < self.num_processes:
      raise ValueError(f"--process_id={self.process_id}: must be in 0 .. "
                       f"{self.num_processes - 1} for --num_processes={self.num_processes}.")


def initialize(options: Options) -> None:
  """Joins the job `options` describe (a no-op for one process or when already joined).

  Must run before anything touches a device; every process of the job calls it, and it
  returns once all have joined (or raises after `timeout_s`).
  """
  options.check()
  if jax.distributed.is_initialized() or not (options.auto or options.explicit):
    return
  if options.explicit and options.num_processes == 1:
    return
  if options.explicit and options.process_id > 0:
    _wait_for_coordinator(options.coordinator_address, options.timeout_s)
  jax.distributed.initialize(options.coordinator_address, options.num_processes,
                             options.process_id, initialization_timeout=options.timeout_s)


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
  """ValueError unless process 0's coordinator at HOST:PORT accepts a connection within
  `timeout_s`: JAX's runtime would end the process with a C++ stack trace instead."""
  host, port = address.rsplit(":", 1)
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
        return
    except OSError as e:
      if time.monotonic() > deadline:
        raise ValueError(f"--coordinator_address={address}: nothing answered there in "
                         f"{timeout_s:g} s ({e.strerror or e}); start process 0 first, "
                         "with the same address, or correct it.") from None
      time.sleep(0.5)


def is_main() -> bool:
  """Whether this process writes what the job writes once (files, logs, progress)."""
  return jax.process_index() == 0


def gather(value: Any) -> list[Any]:
  """Every process's `value` (anything JSON can hold), in process order, on every process.

  A collective: every process of the job calls it, the same number of times. Values may
  differ in size between processes (each is sent as its JSON bytes, padded to the
  longest).
  """
  if jax.process_count() == 1:
    return [value]
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.int32(data.size))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  rows = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:size])) for row, size in zip(rows, sizes)]
