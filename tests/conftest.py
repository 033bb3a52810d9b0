"""Test session setup: 8 simulated CPU devices (sharding tests), float32 matmuls, and the
table of checked bad inputs (`--fault-table=PATH`, see tests/faults.py)."""

import os

# Must be set before jax is imported anywhere in the session.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
pytest_plugins = ["tests.fixtures_ckpt"]


def pytest_addoption(parser):
  parser.addoption("--fault-table", default=None,
                   help="write the table of bad inputs and faults the run checked here")


def pytest_sessionfinish(session, exitstatus):
  path = session.config.getoption("--fault-table")
  if path and exitstatus == 0:
    from tests import faults
    faults.write_table(path)
