"""Test session setup: 8 simulated CPU devices (sharding tests), float32 matmuls."""

import os

# Must be set before jax is imported anywhere in the session.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
pytest_plugins = ["tests.fixtures_ckpt"]
