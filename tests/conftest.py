"""Test session setup: 8 simulated CPU devices (sharding tests), float32 matmuls, quick
compilation, and the table of checked bad inputs (`--fault-table=PATH`, see tests/faults.py).

Compiling dominates the suite's time, so XLA skips its expensive optimisation passes
(the tests check what programs compute, not how fast; benchmarks/ measures speed with the
default options), and a persistent compilation cache in a directory of the session's own
lets every test, and the scripts they launch, reuse a program another one compiled.
"""

import atexit
import dataclasses
import os
import shutil
import tempfile

import pytest

# Must be set before jax is imported anywhere in the session; subprocesses inherit them.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0"
                           " --xla_llvm_disable_expensive_passes=true").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="tokred-jax-xla-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
pytest_plugins = ["tests.fixtures_ckpt"]


def pytest_addoption(parser):
  parser.addoption("--fault-table", default=None,
                   help="write the table of bad inputs and faults the run checked here")


def pytest_sessionfinish(session, exitstatus):
  from tests import faults
  if hasattr(session.config, "workeroutput"):  # a pytest-xdist worker: rows go to the controller
    session.config.workeroutput["faults"] = [dataclasses.asdict(r) for r in faults.ROWS]
    return
  path = session.config.getoption("--fault-table")
  if path and exitstatus == 0:
    faults.write_table(path)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
  """pytest-xdist, on the controller: one worker's table rows."""
  from tests import faults
  faults.ROWS.extend(faults.Fault(**row) for row in node.workeroutput.get("faults", []))
