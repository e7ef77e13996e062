"""Test setup: 8 fake CPU devices so sharding tests run anywhere; f32 on CPU."""
import os
import shutil
import tempfile

# Must run before jax is imported anywhere in the test process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

# One persistent compilation cache per test run, shared by the xdist workers: many tests build the
# same programs afresh (a tokenizer or generator loaded again compiles the same HLO), and compiling
# dominates small tests on this CPU. The controller picks a run-specific directory before it starts
# the workers, which inherit it through the environment.
_CACHE_DIR = os.path.join(tempfile.gettempdir(), f"videolm-test-jax-cache-{os.getpid()}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE_DIR)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def num_fake_devices():
    import jax
    return jax.device_count()


def pytest_sessionfinish(session, exitstatus):
    """The controller (or a run without xdist) removes the run's compilation cache."""
    if "PYTEST_XDIST_WORKER" not in os.environ and os.environ.get("JAX_COMPILATION_CACHE_DIR") == _CACHE_DIR:
        shutil.rmtree(_CACHE_DIR, ignore_errors=True)
