"""A multi-process job on this one machine: what a pod slice runs, without the pod.

Starts N copies of a command, each with its own simulated CPU devices and the flags
that join them into one job (`--coordinator_address` on a free local port,
`--num_processes`, `--process_id`; see core/distributed.py). When one process fails or
the time runs out, the others are stopped too, as a real job's scheduler would.

  python -m tokred_jax.core.localhost --processes=2 --devices=2 -- \
      python train.py --config=configs/train_tiny.py:synthetic --workdir=/tmp/run

Each process's output goes to LOGDIR/process_I.log (--logdir, default a new temporary
directory), printed when it fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence

_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_env(devices: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
  """`base` (default os.environ) with JAX on `devices` simulated CPU devices."""
  env = dict(os.environ if base is None else base)
  flags = _DEVICE_FLAG.sub("", env.get("XLA_FLAGS", "")).split()
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("JAX_NUM_CPU_DEVICES", None)
  return env


@dataclasses.dataclass
class Job:
  """The processes of one running job and their log files."""
  processes: list[subprocess.Popen]
  logs: list[str]

  def stop(self) -> None:
    """SIGKILL to every process still running (their whole process groups)."""
    for p in self.processes:
      if p.poll() is None:
        try:
          os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
          pass
    for p in self.processes:
      p.wait()

  def wait(self, timeout_s: float) -> list[int]:
    """The exit codes, once all processes ended; at the first failure (or after
    `timeout_s`, code -9 for those stopped) the others are stopped."""
    deadline = time.monotonic() + timeout_s
    try:
      while any(p.poll() is None for p in self.processes):
        if any(p.returncode not in (None, 0) for p in self.processes):
          break
        if time.monotonic() > deadline:
          break
        time.sleep(0.2)
    finally:
      self.stop()
    return [p.returncode for p in self.processes]

  def output(self, index: int) -> str:
    with open(self.logs[index], encoding="utf-8", errors="replace") as f:
      return f.read()


def start(command: Sequence[str], num_processes: int, devices: int, log_dir: str,
          env: Mapping[str, str] | None = None, cwd: str | None = None) -> Job:
  """Launches `command` as processes 0 .. num_processes - 1 of one job."""
  if num_processes < 1 or devices < 1:
    raise ValueError(f"--processes={num_processes} and --devices={devices} must both be "
                     "at least 1.")
  os.makedirs(log_dir, exist_ok=True)
  address = f"localhost:{free_port()}"
  processes, logs = [], []
  for i in range(num_processes):
    logs.append(os.path.join(log_dir, f"process_{i}.log"))
    with open(logs[-1], "w", encoding="utf-8") as log:
      processes.append(subprocess.Popen(
          [*command, f"--coordinator_address={address}", f"--num_processes={num_processes}",
           f"--process_id={i}"], stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
          env=process_env(devices, env), start_new_session=True))
  return Job(processes, logs)


def run(command: Sequence[str], num_processes: int, devices: int, timeout_s: float,
        log_dir: str, env: Mapping[str, str] | None = None, cwd: str | None = None
        ) -> tuple[list[int], Job]:
  """`start`, then `Job.wait`: (exit codes, the job)."""
  job = start(command, num_processes, devices, log_dir, env, cwd)
  return job.wait(timeout_s), job


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m tokred_jax.core.localhost", description=__doc__.split("\n\n")[0])
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--devices", type=int, default=2, help="CPU devices per process")
  parser.add_argument("--timeout", type=float, default=3600, help="seconds for the job")
  parser.add_argument("--logdir", default=None)
  parser.add_argument("command", nargs=argparse.REMAINDER,
                      help="after --: the command every process runs")
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command to run after --, e.g. -- python train.py ...")
  log_dir = args.logdir or tempfile.mkdtemp(prefix="tokred-jax-job-")
  try:
    codes, job = run(command, args.processes, args.devices, args.timeout, log_dir)
  except ValueError as e:
    parser.error(str(e))
  for i, code in enumerate(codes):
    if code:
      sys.stderr.write(f"--- process {i} exited with {code}; its output "
                       f"({job.logs[i]}):\n{job.output(i)[-4000:]}\n")
  print(f"exit codes {codes}; logs in {log_dir}")
  return next((c for c in codes if c), 0)


if __name__ == "__main__":
  sys.exit(main())
