"""Test set-up: 8 CPU devices, strict rank promotion, fml's own warnings as errors."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def rng():
    """A generator seeded per test: a module-wide one would draw different data
    under each xdist schedule."""
    return np.random.default_rng(0)


@pytest.fixture
def backend_compiles():
    """`start()` returns the list of XLA backend compilations from then on; the
    listener is removed after the test."""
    listeners = []

    def start() -> list:
        compiles = []

        def listen(event, seconds, **_):
            if event == "/jax/core/compile/backend_compile_duration":
                compiles.append(event)

        jax.monitoring.register_event_duration_secs_listener(listen)
        listeners.append(listen)
        return compiles

    yield start
    for listen in listeners:
        jax.monitoring.unregister_event_duration_listener(listen)
