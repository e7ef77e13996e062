"""Test setup: 8 fake CPU devices so sharding tests run anywhere; f32 on CPU."""
import os

# Must run before jax is imported anywhere in the test process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def num_fake_devices():
    import jax
    return jax.device_count()
